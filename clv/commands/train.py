"""``clv train``: train from the event log, register the model, promote it only if it wins."""

from __future__ import annotations

import json
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
) -> None:
    """Train from CLV_EVENT_LOG_DIR, register the model, promote it only if it wins.

    The model is registered in CLV_MODEL_DIR.

    It becomes the champion only if it beats the champion on validation, or with --force.
    When a model was already trained on this same event log with the same code, libraries and
    settings, nothing is trained (training is deterministic: it would register a copy)."""
    from clv import STARTED
    from feature_store.features import day_date
    from training.progress import StderrProgress
    from training.train import train as run_training

    settings = load_settings()
    progress = False if quiet else StderrProgress("train", t0=STARTED)
    try:
        result = run_training(settings, progress=progress, force=force, again=again)
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
