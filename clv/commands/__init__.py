"""Command functions of the ``clv`` console script, and what every command shares.

Bad input ends in one line on stderr and a non-zero exit, never a traceback:
``raise fail(...)`` (exit 2 for bad input, 1 for a failure while running).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import overload

import typer
from pydantic import ValidationError

from clv.errors import ClvError
from clv.files import loops, missing_dirs, replaceable
from clv.settings import Settings, settings_error
from feature_store.features import iso_date


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``clv: error: message`` on stderr; the caller raises the returned exit."""
    typer.echo(f"clv: error: {message}", err=True)
    return typer.Exit(code)


def load_settings() -> Settings:
    """The settings from the environment, or a one-line error naming the bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise fail(settings_error(exc)) from None


@overload
def parse_date(text: str, what: str = ...) -> dt.date: ...
@overload
def parse_date(text: None, what: str = ...) -> None: ...
def parse_date(text: str | None, what: str = "date") -> dt.date | None:
    """``YYYY-MM-DD`` -> a date; anything else is a one-line CLI error naming ``what``."""
    if text is None:
        return None
    try:
        return iso_date(text)
    except ValueError:
        raise fail(f"{what} {text!r} is not a date (YYYY-MM-DD)") from None


def output_path(text: str, flag: str, *, file: bool = True) -> Path:
    """An output path from the command line. Empty is a mistake, not the current directory; a
    link that loops is refused, and with ``file`` so is anything there that writing the file
    would not replace (:func:`clv.files.replaceable`): checked before any work."""
    if not text.strip():
        raise fail(f"{flag} must be a path, not empty")
    if text == "-":
        raise fail(f"{flag} -: writing to standard output is not supported; give a file path")
    path = Path(text)
    if not file:
        if loops(path):
            raise fail(f"{flag} {path} is (or lies under) a symbolic link that loops")
    else:
        try:
            replaceable(path)
        except ClvError as exc:
            raise fail(f"{flag}: {exc}") from None
    # The folders on the way must be folders: a file among them was only found at the write,
    # in the words of its mkdir ("File exists"), not as what it is.
    folder = path.parent if file else path
    missing = missing_dirs(folder)
    base = missing[-1].parent if missing else folder
    if (missing or file) and not base.is_dir():
        raise fail(f"{flag} {path}: {base} is not a directory")
    return path
