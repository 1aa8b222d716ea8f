"""``clv train``: train from the event log, register the model, promote it only if it wins."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer

from clv.commands import fail, load_settings
from clv.errors import ClvError


def train(
    force: Annotated[
        bool, typer.Option("--force", help="promote the new model even if it does not win")
    ] = False,
    again: Annotated[
        bool,
        typer.Option(
            "--again",
            help="train even if a registered model was trained on this same event log with "
            "the same code, libraries and settings (--force implies it)",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress on stderr")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    until: Annotated[
        str | None,
        typer.Option(
            "--until",
            metavar="YYYY-MM-DD",
            help="train on the events dated on or before this day only (the model as it would "
            "have been trained then)",
        ),
    ] = None,
    every: Annotated[
        float | None,
        typer.Option(
            "--every",
            metavar="SECONDS",
            help="keep running: train now and every SECONDS until SIGTERM/Ctrl-C, each run in "
            "a child process and skipped when the event log has not changed (as clv up does)",
        ),
    ] = None,
) -> None:
    """Train from CLV_EVENT_LOG_DIR, register the model, promote it only if it wins.

    The model is registered in CLV_MODEL_DIR.

    It becomes the champion only if it beats the champion on validation, or with --force.
    When a model was already trained on this same event log with the same code, libraries and
    settings, nothing is trained (training is deterministic: it would register a copy)."""
    from clv import STARTED
    from clv.commands import parse_date
    from feature_store.features import day_date, day_number
    from training.progress import StderrProgress
    from training.train import train as run_training

    if every is not None:
        if until is not None:
            raise fail("--every takes no --until: each run trains on the whole event log")
        _train_every(every, force=force, again=again, as_json=as_json, quiet=quiet)
        return
    until_date = parse_date(until, "--until")
    settings = load_settings()
    progress = False if quiet else StderrProgress("train", t0=STARTED)
    try:
        result = run_training(
            settings,
            progress=progress,
            force=force,
            again=again,
            until_day=None if until_date is None else day_number(until_date),
        )
    except ClvError as exc:
        raise fail(str(exc), 1) from None
    except MemoryError:
        raise fail("not enough memory to train on this event log", 1) from None
    except OSError as exc:  # e.g. a model directory that cannot be written
        raise fail(str(exc), 1) from None
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "version": result.version,
                    "model": result.model_name,
                    "promoted": result.promoted,
                    "skipped": result.skipped,
                    "reason": result.decision.reason,
                    "champion_version": result.champion_version,
                    "cutoff_day": result.cutoff_day,
                    "cutoff_date": day_date(result.cutoff_day).isoformat(),
                    "horizon_days": result.horizon_days,
                    "requested_horizon_days": result.requested_horizon_days,
                    "validation": result.validation.to_json(),
                    "timings": {k: round(v, 2) for k, v in result.timings.items()},
                },
                indent=2,
            )
        )
    else:
        typer.echo(result.summary())


def _train_every(every: float, *, force: bool, again: bool, as_json: bool, quiet: bool) -> None:
    """``clv train --every SECONDS``: periodic retraining on its own, for a deployment whose
    consumers and archiver run elsewhere (``docker-compose.yml``'s trainer). Each outcome is a
    log line (none with ``-q`` but failures)."""
    from clv.cli import run_async
    from training.registry import ModelRegistry
    from training.train import retrain_until

    if not 1 <= every < math.inf:  # (nan too; 1e-9 would spin)
        raise fail(f"--every must be 1 second or more, not {every}")
    given = [
        name for name, on in (("--force", force), ("--again", again), ("--json", as_json)) if on
    ]
    if given:
        raise fail(f"--every takes no {', '.join(given)}: each run is decided on validation")
    settings = load_settings()
    try:  # a model directory it cannot write: said now, not at the first run's end
        ModelRegistry(settings.model_dir).check_writable()
    except ClvError as exc:
        raise fail(str(exc), 1) from None
    run_async(lambda stop: retrain_until(settings, every, stop), service=not quiet)
