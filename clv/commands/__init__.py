"""Command functions of the ``clv`` console script, and what every command shares.

Bad input ends in one line on stderr and a non-zero exit, never a traceback:
``raise fail(...)`` (exit 2 for bad input, 1 for a failure while running).
"""

from __future__ import annotations

import datetime as dt
from typing import overload

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


@overload
def parse_date(text: str, what: str = ...) -> dt.date: ...
@overload
def parse_date(text: None, what: str = ...) -> None: ...
def parse_date(text: str | None, what: str = "date") -> dt.date | None:
    """``YYYY-MM-DD`` -> a date; anything else is a one-line CLI error naming ``what``."""
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise fail(f"{what} {text!r} is not a date (YYYY-MM-DD)") from None
