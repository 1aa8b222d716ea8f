"""Command functions of the ``clv`` console script, and what every command shares.

Bad input ends in one line on stderr and a non-zero exit, never a traceback:
``raise fail(...)`` (exit 2 for bad input, 1 for a failure while running).
"""

from __future__ import annotations

import typer
from pydantic import ValidationError

from clv.settings import Settings


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``clv: error: message`` on stderr; the caller raises the returned exit."""
    typer.echo(f"clv: error: {message}", err=True)
    return typer.Exit(code)


def load_settings() -> Settings:
    """The settings from the environment, or a one-line error naming the bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise fail(f"bad setting CLV_{str(first['loc'][0]).upper()}: {first['msg']}") from None
