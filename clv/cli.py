"""The ``clv`` command line: thin entry points that build settings and hand them inward.

Bad input ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisClusterException, RedisError

from clv.commands import fail, load_settings, parse_date
from clv.commands.backtest import backtest
from clv.commands.synth import synth
from clv.commands.train import train
from clv.errors import ClvError, Terminated
from clv.files import stops_unwind

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="clv: streaming customer lifetime value.",
)
T = TypeVar("T")


def _version(value: bool) -> None:
    if value:
        from clv import __version__

        typer.echo(f"clv {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """clv: streaming customer lifetime value."""


#: The packages whose INFO lines a long-running command shows: where it serves metrics, each
#: retraining's outcome. The Kafka client's own stay out.
OWN_LOGGERS = ("clv", "consumers", "feature_store", "service", "training")


def run_async(
    main: Callable[[asyncio.Event], Awaitable[T]],
    *,
    one_shot: bool = False,
    starts_stack: bool = False,
    service: bool = False,
    received: list[int] | None = None,
) -> T:
    """Run ``main(stop)`` with SIGINT/SIGTERM/SIGHUP setting ``stop`` (a clean shutdown, not a
    kill); each signal that came is appended to ``received``.

    A server that cannot be reached is named by its setting; ``starts_stack`` commands (``up``,
    ``demo``) are not told that ``clv up`` would start one.

    ``one_shot`` commands (not services) end in one line: the Kafka client's own log lines (it
    logs a failed connection before raising it) are left out, and the error says it all.
    ``service`` commands (``up``, ``consume``, ``archive``, ``train --every``) also log what
    clv's own code says at INFO (:data:`OWN_LOGGERS`)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if one_shot:
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if service:
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)

    async def runner() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGHUP too: a closed terminal stops the stack and the servers it started (they run
        # in a process group of their own, out of the terminal's reach)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if handlers[sig] == signal.SIG_IGN:
                # ignored at the start, it stays ignored: `nohup clv up` (a hangup), `clv up &`
                # from a script (a shell without job control starts it with SIGINT ignored, so
                # that the script's Ctrl-C does not reach its background commands)
                continue
            loop.add_signal_handler(sig, _stopping, stop, sig, received)
        return await main(stop)

    handlers = {
        sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        return asyncio.run(runner())
    except ClvError as exc:
        raise fail(str(exc), 1) from None
    except (RedisError, RedisClusterException, KafkaError) as exc:
        which = (
            "Kafka at CLV_KAFKA_BOOTSTRAP"
            if isinstance(exc, KafkaError)
            else "Redis at CLV_REDIS_URL"
        )
        hint = "" if starts_stack else "; `clv up` runs a local stack"
        raise fail(f"cannot reach a server: {exc} ({which}{hint})", 1) from None
    except ConnectionError as exc:  # refused, reset: a server again, of unknown kind
        raise fail(f"cannot reach a server: {exc}", 1) from None
    except OSError as exc:  # a file or directory, not a server
        raise fail(str(exc), 1) from None
    finally:
        # asyncio.run's end set them to the default, so a second signal in the teardown killed
        # the process by the signal, with no word: those in force before come back (main's
        # unwinding: `clv: terminated`, 143; Ctrl-C: `clv: interrupted`, 130)
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


def _stopping(stop: asyncio.Event, sig: int, received: list[int] | None) -> None:
    if received is not None:
        received.append(sig)
    stop.set()


def stopped_by(received: list[int]) -> BaseException:
    """What ends a one-shot command that a signal stopped before its end, by the first signal
    in ``received`` (as :func:`run_async` fills it): exit 130 and ``clv: interrupted`` for a
    Ctrl-C, 129 and ``clv: hung up`` for a hangup, 143 and ``clv: terminated`` for SIGTERM."""
    if received[:1] == [signal.SIGINT]:
        return typer.Exit(130)  # main says `clv: interrupted`
    if received[:1] == [signal.SIGHUP]:
        typer.echo("clv: hung up", err=True)
        return typer.Exit(129)
    return Terminated()  # main says `clv: terminated`, 143


@app.command()
def up(
    consumers: Annotated[int, typer.Option(min=1, help="feature consumers in the group")] = 1,
    retrain_every: Annotated[
        float, typer.Option(help="seconds between retrainings (0: off)")
    ] = 3600,
) -> None:
    """Run the stack in the foreground (local Redis and broker where none run); Ctrl-C stops it."""
    from clv.stack import run_stack

    if retrain_every != 0 and not 1 <= retrain_every < math.inf:  # (nan too; 1e-9 would spin)
        raise fail(f"--retrain-every must be 0 (off) or 1 second or more, not {retrain_every}")
    settings = load_settings()
    run_async(
        lambda stop: run_stack(
            settings, stop, consumers=consumers, retrain_every_s=retrain_every or None
        ),
        starts_stack=True,
        service=True,
    )


@app.command()
def demo(
    keep_running: Annotated[bool, typer.Option(help="stay up after the show until Ctrl-C")] = False,
) -> None:
    """Start the stack as `clv up` does, replay CDNOW as live order events, show the service."""
    from clv.demo import run_demo

    settings = load_settings()
    received: list[int] = []
    finished = run_async(
        lambda stop: run_demo(settings, stop, keep_running=keep_running),
        starts_stack=True,
        received=received,
    )
    if not finished:  # stopped before its end: said and exited as train's and backtest's stops
        raise stopped_by(received)


@app.command()
def consume() -> None:
    """Run one feature consumer (a member of CLV_CONSUMER_GROUP) until SIGTERM/Ctrl-C."""
    from consumers.feature_consumer import run_feature_consumer

    settings = load_settings()
    stats = run_async(lambda stop: run_feature_consumer(settings, stop), service=True)
    typer.echo(json.dumps(stats.__dict__), err=True)


@app.command()
def serve() -> None:
    """Run the HTTP API on CLV_API_HOST:CLV_API_PORT until SIGTERM/Ctrl-C."""
    from service.server import serve_api

    settings = load_settings()
    run_async(lambda stop: serve_api(settings, stop), service=True)


@app.command()
def score() -> None:
    """Run the scorer (scores in Redis, churn-risk alerts) until SIGTERM/Ctrl-C."""
    from service.scorer import serve_scorer

    settings = load_settings()
    run_async(lambda stop: serve_scorer(settings, stop), service=True)


@app.command()
def archive() -> None:
    """Run the archiver (orders topic -> Parquet event log) until SIGTERM/Ctrl-C."""
    from consumers.archiver import run_archiver

    settings = load_settings()
    n = run_async(lambda stop: run_archiver(settings, stop), service=True)
    typer.echo(f"archived {n} events", err=True)


@app.command()
def replay(
    file: Annotated[Path, typer.Argument(help="orders CSV or CDNOW text file (.gz accepted)")],
    rate: Annotated[float | None, typer.Option(min=0.001, help="events per second")] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="csv, cdnow or auto (by the content)")
    ] = "auto",
) -> None:
    """Publish the orders of FILE (in time order) to the orders topic."""
    from rich.progress import Progress

    from clv.replay import encode_rows, load_events, publish

    if rate is not None and not math.isfinite(rate):  # (nan is refused by the option's min)
        raise fail(f"--rate must be a finite number of events per second, not {rate}")
    settings = load_settings()
    if fmt not in ("csv", "cdnow", "auto"):  # auto: by the content, as the reader reads it
        raise fail(f"unknown --format {fmt!r} (csv, cdnow or auto)")
    try:
        messages = encode_rows(load_events(file, fmt, settings), settings.max_event_bytes)
    except ClvError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # a file it may not read, an I/O error: as `clv backtest` says them
        raise fail(str(exc), 1) from None

    async def main(stop: asyncio.Event) -> int:
        from clv.stopping import StoppedWhileStarting, unless_stopped
        from consumers.kafka import ensure_topics

        try:
            await unless_stopped(stop, ensure_topics(settings))
        except StoppedWhileStarting:
            return 0
        with Progress(transient=True) as bar:
            task = bar.add_task(f"replaying {file.name}", total=len(messages))
            return await publish(
                settings,
                messages,
                rate=rate,
                progress=lambda n: bar.advance(task, n),
                stop=stop,
            )

    received: list[int] = []
    sent = run_async(main, one_shot=True, received=received)
    if sent < len(messages):  # a stop: the first `sent` orders of the file went, in time order
        typer.echo(
            f"stopped after publishing {sent} of {len(messages)} order events to "
            f"{settings.orders_topic} (the first {sent} of the file in time order)",
            err=True,
        )
        raise stopped_by(received)
    typer.echo(f"published {sent} order events to {settings.orders_topic}")


@app.command()
def features(
    user_id: Annotated[str, typer.Argument(help="the user id")],
    as_of: Annotated[str | None, typer.Option("--as-of", help="YYYY-MM-DD (default: now)")] = None,
) -> None:
    """Print a user's features as JSON, read from Redis (earlier dates: from the event log)."""
    from clv.lookup import lookup_features
    from clv.stopping import StoppedWhileStarting

    settings = load_settings()
    day = parse_date(as_of, "--as-of")
    if (
        not user_id
        or len(user_id) > 128
        or not user_id.isprintable()
        or any(c.isspace() for c in user_id)
    ):
        raise fail("user id must be 1 to 128 printable characters without white space")

    async def main(stop: asyncio.Event) -> dict[str, object] | None:
        from clv.stopping import unless_stopped

        return await unless_stopped(stop, lookup_features(settings, user_id, day))

    received: list[int] = []
    try:
        result = run_async(main, one_shot=True, received=received)
    except StoppedWhileStarting:  # a Redis slow to answer (a read of the event log ends first)
        raise stopped_by(received) from None
    if result is None:
        raise fail(f"unknown user {user_id!r}", 1)
    typer.echo(json.dumps(result, indent=2, ensure_ascii=False))


app.command("train")(train)
app.command("backtest")(backtest)
app.command("synth")(synth)


def main(argv: list[str] | None = None) -> int:
    """The console entry: usage errors (a missing option, a value of the wrong type, an unknown
    command) are one line on stderr and exit 2, like every other bad input, not a usage panel.
    A hangup (a closed terminal, a dropped ssh session) ends a command as SIGTERM does, with
    its cleanup, and says ``clv: hung up`` (exit 129), unless it was to be ignored (``nohup``)."""
    hung_up: list[bool] = []

    def hangup(_signum: int, _frame: object) -> None:
        hung_up.append(True)
        os.kill(os.getpid(), signal.SIGTERM)  # unwound as a SIGTERM is: staging removed

    previous = signal.getsignal(signal.SIGHUP)
    if previous != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, hangup)
    try:
        return _main(argv, hung_up)
    finally:
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)


def _main(argv: list[str] | None, hung_up: list[bool]) -> int:
    try:
        with stops_unwind():  # a terminated run cleans up as an interrupted one does
            code = app(args=argv, prog_name="clv", standalone_mode=False)
    except Terminated:
        if hung_up:
            typer.echo("clv: hung up", err=True)
            return 129
        typer.echo("clv: terminated", err=True)
        return 143
    except KeyboardInterrupt:  # raised again where the block ends (see stops_unwind)
        typer.echo("clv: interrupted", err=True)
        return 130
    except typer.Abort:
        typer.echo("clv: aborted", err=True)
        return 130
    except typer.TyperException as exc:  # typer's click exceptions: usage and parameter errors
        ctx = getattr(exc, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None and ctx.parent is not None else ""
        text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if text.strip():  # (no arguments at all: the help was the answer)
            typer.echo(f"clv: error: {where}{text}", err=True)
        return int(getattr(exc, "exit_code", 2))
    if code == 130:  # Ctrl-C: typer turns KeyboardInterrupt into Exit(130) itself, silently
        typer.echo("clv: interrupted", err=True)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # `python -m clv.cli` as well as `python -m clv` and `clv`
    raise SystemExit(main())
