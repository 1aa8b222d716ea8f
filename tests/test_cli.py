"""The command line end to end: replay a file, consume it, read features back; bad input."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from aiokafka.errors import KafkaConnectionError
from redis.exceptions import ConnectionError as RedisConnectionError

from clv.local_stack import LocalProcess
from clv.settings import Settings
from tests.consumers.kafka_helpers import unique_settings
from tests.consumers.test_archiver import _archive_all
from tests.consumers.test_feature_consumer import _run_group
from tests.processes import lines_until


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLV_")}
    return {**env, **settings.as_env()}


def clv(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clv", *args],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
async def test_replay_then_features(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path
) -> None:
    settings = unique_settings(
        broker.address, redis_server.address, event_log_dir=tmp_path / "events", clock="event"
    )
    orders = tmp_path / "orders.csv"
    orders.write_text(
        "user_id,order_id,ts,amount,type\n"
        "alice,o1,2024-01-01T10:00:00Z,10.00,purchase\n"
        "alice,o2,2024-02-01T10:00:00Z,30.00,purchase\n"
        "alice,o2,2024-02-03T10:00:00Z,5.00,refund\n"
        "bob,o3,2024-01-15,7.50,purchase\n"
    )
    out = clv(settings, "replay", str(orders))
    assert out.returncode == 0, out.stderr
    assert "published 4 order events" in out.stdout
    await _run_group(settings, 1)

    out = clv(settings, "features", "alice")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["source"] == "redis" and body["as_of"] == "2024-02-03"  # the event clock
    assert body["features_updated_at"].endswith("Z")
    f = body["features"]
    assert f["orders_total"] == 2 and f["revenue_total"] == 35.0 and f["frequency"] == 1
    assert f["avg_repeat_value"] == 25.0 and f["first_order_at"] == "2024-01-01T10:00:00Z"

    later = json.loads(clv(settings, "features", "alice", "--as-of", "2024-12-31").stdout)
    assert later["features"]["orders_30d"] == 0 and later["features"]["age_days"] == 365

    # Before the user's latest event: point in time, from the archiver's event log.
    await _archive_all(settings)
    earlier = json.loads(clv(settings, "features", "alice", "--as-of", "2024-01-15").stdout)
    assert earlier["source"] == "event_log" and earlier["features_updated_at"] is None
    assert earlier["features"]["orders_total"] == 1 and earlier["features"]["age_days"] == 14

    # ... and with no event log there, an error, not "no events" (exit 0) as if it had been read
    no_log = settings.model_copy(update={"event_log_dir": tmp_path / "moved"})
    missing = clv(no_log, "features", "alice", "--as-of", "2024-01-15")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip() == (
        f"clv: error: the event log {tmp_path / 'moved'} (CLV_EVENT_LOG_DIR) does not exist; "
        "dates before the user's latest event (2024-02-03) are read from it"
    )

    unknown = clv(settings, "features", "nobody")
    assert unknown.returncode == 1 and "unknown user" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_bad_input_is_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:1/0")
    cases = [
        ("features", "alice", "--as-of", "31/12/2024"),
        ("features", "two words"),
        ("replay", str(tmp_path / "missing.csv")),
        ("replay", str(tmp_path), "--format", "xml"),
        ("features", "alice"),  # nothing listens on the configured Redis
    ]
    for args in cases:
        out = clv(settings, *args)
        assert out.returncode != 0, args
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clv: error:"), (args, out.stderr)
    bad_setting = subprocess.run(
        [sys.executable, "-m", "clv", "features", "x"],
        env={**os.environ, "CLV_HORIZON_DAYS": "-3"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_setting.returncode == 2 and "CLV_HORIZON_DAYS" in bad_setting.stderr


def test_offline_commands_answer_bad_input_in_one_line(tmp_path: Path) -> None:
    orders = tmp_path / "orders.csv"
    orders.write_text("user_id,order_id,ts,amount\nu1,o1,2024-01-01,10\n")
    huge = tmp_path / "huge.csv"
    huge.write_text("user_id,order_id,ts,amount\nu1,o1,2024-01-01,1e300\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "dir.csv").mkdir()
    bad_log = tmp_path / "bad_log" / "date=2024-01-01"
    bad_log.mkdir(parents=True)
    (bad_log / "part-0.parquet").write_text("not parquet")
    foreign_log = tmp_path / "foreign_log" / "date=2024-06-01"
    foreign_log.mkdir(parents=True)
    pq.write_table(pa.table({"foo": [1, 2]}), foreign_log / "part-foreign.parquet")
    not_empty = tmp_path / "not_empty"
    not_empty.mkdir()
    (not_empty / "keep.txt").write_text("mine")
    corrupt = tmp_path / "corrupt.csv.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbagegarbage")
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    bt = ("backtest", "--orders", str(orders), "--cutoff", "2024-01-01")
    under_a_file = ("--report", str(a_file / "sub"))
    cases: list[tuple[int, Settings, tuple[str, ...]]] = [
        # usage errors: exit 2, one line, not a usage panel
        (2, Settings(), ("nosuch",)),
        (2, Settings(), ("backtest", "--orders", str(orders))),
        (2, Settings(), (*bt, "--horizon-days", "abc", "--out", "p.csv")),
        (2, Settings(), ("synth", "--users", "0", "--orders", "5", "--out", "x.csv")),
        # bad values
        (
            2,
            Settings(),
            (*bt, "--horizon-days", "5", "--out", str(tmp_path / "p.csv"), "--report", str(a_file)),
        ),
        (
            2,
            Settings(),
            (*bt, "--horizon-days", "5", "--out", str(tmp_path / "p.csv"), *under_a_file),
        ),
        (
            2,
            Settings(),
            (
                "backtest",
                "--orders",
                str(huge),
                "--cutoff",
                "2024-01-01",
                "--horizon-days",
                "5",
                "--out",
                str(tmp_path / "h.csv"),
            ),
        ),
        (
            2,
            Settings(),
            (
                "synth",
                "--users",
                "5",
                "--orders",
                "9",
                "--start",
                "9999-12-01",
                "--out",
                str(tmp_path / "s.csv"),
            ),
        ),
        (
            2,
            Settings(),
            ("synth", "--users", "5", "--orders", "9", "--out", str(tmp_path / "dir.csv")),
        ),
        (2, Settings(), ("synth", "--users", "5", "--orders", "9", "--seed", "-1", "--out", "x")),
        (2, Settings(), ("synth", "--users", "5", "--orders", "9", "--out", str(not_empty))),
        # a file in another format: not made into an event-log directory
        (
            2,
            Settings(),
            ("synth", "--users", "5", "--orders", "9", "--out", str(tmp_path / "x.pq")),
        ),
        (
            2,
            Settings(),
            ("synth", "--users", "5", "--orders", "9", "--start", "1960-01-01", "--out", "y.csv"),
        ),
        (
            2,
            Settings(),
            (
                "backtest",
                "--orders",
                str(corrupt),
                "--cutoff",
                "2024-01-01",
                "--horizon-days",
                "5",
                "--out",
                str(tmp_path / "c.csv"),
            ),
        ),
        # outputs that are not a place for a file: never replaced
        (2, Settings(), ("synth", "--users", "5", "--orders", "9", "--out", "")),
        (2, Settings(), ("synth", "--users", "5", "--orders", "9", "--out", str(fifo))),
        (2, Settings(), ("synth", "--users", "5", "--orders", "9", "--out", str(a_file))),
        (2, Settings(), (*bt, "--horizon-days", "5", "--out", str(fifo))),
        (2, Settings(), (*bt, "--horizon-days", "5", "--out", " ")),
        (2, Settings(), (*bt, "--horizon-days", "5", "--out", str(loop / "p.csv"))),
        (2, Settings(), (*bt, "--horizon-days", "5", "--out", "p2.csv", "--report", str(loop))),
        (2, Settings(), ("synth", "--users", "5", "--orders", "9", "--out", str(loop / "x.csv"))),
        # standard output, by any name: the staged file cannot be renamed onto it
        (2, Settings(), (*bt, "--horizon-days", "5", "--out", "/dev/stdout")),
        (2, Settings(), (*bt, "--horizon-days", "5", "--out", "/proc/self/fd/1")),
        (2, Settings(), (*bt, "--horizon-days", "5", "--out", "-")),
        (2, Settings(), ("synth", "--users", "5", "--orders", "9", "--out", "/dev/stdout")),
        # what the environment points at
        (1, Settings(model_dir=a_file, event_log_dir=tmp_path / "none"), ("train", "-q")),
        (1, Settings(model_dir=tmp_path / "m", event_log_dir=bad_log.parent), ("train", "-q")),
        (1, Settings(model_dir=tmp_path / "m", event_log_dir=foreign_log.parent), ("train", "-q")),
    ]
    for code, settings, args in cases:
        out = clv(settings, *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == code, (args, out.returncode, out.stderr)
        # progress lines may come first; the error is one line, the last, and no traceback
        errors = [line for line in lines if line.startswith("clv: error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "p.csv").exists()  # refused before any work: nothing written
    assert not (tmp_path / "x.pq").exists()
    assert list((tmp_path / "dir.csv").iterdir()) == []
    assert not list(tmp_path.glob(".*.tmp"))  # synth left no temporary file
    assert [p.name for p in not_empty.iterdir()] == ["keep.txt"]
    assert fifo.is_fifo() and a_file.read_text() == "x"
    for name in ("/dev/stdout", "-"):  # said as what it is, not as a failed rename
        said = clv(Settings(), *bt, "--horizon-days", "5", "--out", name).stderr
        assert "standard output" in said and "Errno" not in said, said
    unknown = clv(Settings(), "nosuch")
    assert unknown.stderr.strip() == "clv: error: No such command 'nosuch'."


def test_bad_settings_and_unusable_directories_end_in_one_line_before_any_work(
    tmp_path: Path,
) -> None:
    # Raw variables, as a user would set them: each is refused in one line before a server is
    # started, a topic made or an event replayed.
    orders = tmp_path / "orders.csv"
    orders.write_text("user_id,order_id,ts,amount\nu1,o1,2024-01-01,10\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    closed = {"CLV_KAFKA_BOOTSTRAP": "127.0.0.1:1", "CLV_REDIS_URL": "redis://127.0.0.1:1/0"}
    bt = ("backtest", "--orders", str(orders), "--horizon-days", "5", "--out", "p.csv")
    cases: list[tuple[dict[str, str], tuple[str, ...], int, str]] = [
        ({"CLV_REDIS_URL": "notaurl"}, ("features", "u1"), 2, "bad setting CLV_REDIS_URL:"),
        ({"CLV_REDIS_URL": "redis://127.0.0.1:abc/0"}, ("consume",), 2, "CLV_REDIS_URL"),
        ({"CLV_KAFKA_BOOTSTRAP": "127.0.0.1:abc"}, ("replay", str(orders)), 2, "not a server"),
        ({"CLV_ORDERS_TOPIC": ""}, ("replay", str(orders)), 2, "CLV_ORDERS_TOPIC"),
        ({"CLV_ORDERS_TOPIC": "bad topic!"}, ("archive",), 2, "not a Kafka topic name"),
        ({"CLV_DLQ_TOPIC": "orders"}, ("consume",), 2, "bad settings: CLV_DLQ_TOPIC is"),
        ({}, ("up", "--retrain-every", "-5"), 2, "--retrain-every"),
        ({}, ("up", "--retrain-every", "nan"), 2, "--retrain-every"),
        ({}, ("up", "--retrain-every", "1e-9"), 2, "--retrain-every must be 0 (off) or 1 second"),
        ({}, ("up", "--retrain-every", "inf"), 2, "--retrain-every must be 0 (off) or 1 second"),
        ({"CLV_MODEL_DIR": str(a_file)}, ("up",), 1, f"directory {a_file} (CLV_MODEL_DIR) cannot"),
        (
            {"CLV_MODEL_DIR": str(a_file)},
            ("demo",),
            1,
            f"directory {a_file} (CLV_MODEL_DIR) cannot",
        ),
        ({"CLV_EVENT_LOG_DIR": str(a_file / "x")}, ("up",), 1, "(CLV_EVENT_LOG_DIR) cannot be"),
        ({"CLV_EVENT_LOG_DIR": str(a_file / "x")}, ("archive",), 1, f"{a_file} is not a dir"),
        (closed, ("replay", str(orders)), 1, "cannot reach a server: KafkaConnectionError"),
        (closed, ("replay", str(orders)), 1, "(Kafka at CLV_KAFKA_BOOTSTRAP; `clv up` runs a"),
        (closed, ("features", "u1"), 1, "(Redis at CLV_REDIS_URL; `clv up` runs a local stack)"),
        ({}, (*bt, "--cutoff", "2999-01-01"), 2, "--cutoff 2999-01-01 is in the future"),
        ({}, ("backtest", "--orders", str(tmp_path), *bt[3:], "--cutoff", "2024-01-01"), 2, "is a"),
        # Fails if a file on the way to an output is found only at the write, as "File exists"
        # (the words of its mkdir), not as what it is.
        (
            {},
            ("synth", "--users", "5", "--orders", "9", "--out", str(a_file / "x.csv")),
            2,
            f"--out {a_file / 'x.csv'}: {a_file} is not a directory",
        ),
        (
            {},
            (*bt[:5], "--out", str(a_file / "d" / "p.csv"), "--cutoff", "2024-01-01"),
            2,
            f"{a_file} is not a directory",
        ),
        (
            {},
            (*bt, "--report", str(a_file / "r"), "--cutoff", "2024-01-01"),
            2,
            f"--report {a_file / 'r'}: {a_file} is not a directory",
        ),
    ]
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLV_")}
    for env, args, code, says in cases:
        out = subprocess.run(
            [sys.executable, "-m", "clv", *args],
            env={**base, **closed, **env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == code, (env, args, out.returncode, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clv: error: "), (env, args, out.stderr)
        assert says in lines[0], (env, args, lines[0])
    # nothing was started, made or written: no local stack folder, no output, the file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "orders.csv"]
    assert a_file.read_text() == "x"


ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "clv" / "data" / "CDNOW_sample.txt.gz"


def _terminate_when(proc: subprocess.Popen[str], ready: Callable[[str], bool]) -> str:
    """SIGTERM ``proc`` once ``ready(line)`` holds for a line of its stderr; its whole stderr."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if ready(line):
            proc.send_signal(signal.SIGTERM)
            break
    seen.append(proc.stderr.read())
    proc.wait(timeout=60)
    return "".join(seen)


@pytest.mark.parametrize("stage", ["validation: fitting", "final fit:"])
def test_a_terminated_backtest_leaves_nothing_behind(tmp_path: Path, stage: str) -> None:
    """SIGTERM (``timeout``, ``docker stop``) mid-run: like Ctrl-C, the staged predictions, the
    report's staging folder and the folders this run made are removed; exit 143."""
    out = tmp_path / "new" / "deeper" / "p.csv"
    report = tmp_path / "report"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clv", "backtest", "--format", "cdnow", "--orders", str(SAMPLE),
         "--cutoff", "1997-09-30", "--horizon-days", "91", "--out", str(out),
         "--report", str(report)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    err = _terminate_when(proc, lambda line: stage in line)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "clv: terminated"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def _terminated_synth(
    root: Path, out: Path, staged: Callable[[], bool], placed: Callable[[], bool]
) -> None:
    """Run ``clv synth --out out`` (under the empty folder ``root``), SIGTERM it while it
    writes (``staged()`` sees its staged output, ``placed()`` nothing moved into place yet),
    and check it ends as a terminated run: exit 143, one line. It is frozen (SIGSTOP) to
    check that it still writes before the SIGTERM goes (it lands when the run goes on); a run
    that got past its staging between the poll and the freeze (a loaded machine) is let
    finish and run again, at most ten times, so the signal always lands mid-write."""
    for _ in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-m", "clv", "synth", "--users", "200000", "--orders", "2000000",
             "--start", "2020-01-01", "--out", str(out), "-q"],
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        while proc.poll() is None and not staged():
            time.sleep(0.005)
        proc.send_signal(signal.SIGSTOP)
        if proc.poll() is None and staged() and not placed():
            break  # frozen mid-write
        proc.send_signal(signal.SIGCONT)
        proc.communicate(timeout=60)
        assert proc.returncode == 0
        for made in root.iterdir():  # its output, and the folders it made
            shutil.rmtree(made) if made.is_dir() else made.unlink()
    else:
        pytest.fail("clv synth was never caught while writing")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "clv: terminated"


def test_a_terminated_synth_leaves_no_partial_log(tmp_path: Path) -> None:
    out = tmp_path / "log"
    _terminated_synth(  # (big enough that writing lasts seconds)
        tmp_path,
        out,
        lambda: any(out.glob(".synth.*/date=*/*.parquet")),
        lambda: any(out.glob("date=*")),
    )
    assert list(tmp_path.iterdir()) == []


def test_a_terminated_synth_csv_leaves_neither_file_nor_the_folders_it_made(
    tmp_path: Path,
) -> None:
    out = tmp_path / "new" / "deeper" / "orders.csv"
    _terminated_synth(tmp_path, out, lambda: any(out.parent.glob(".orders.csv.*.tmp")), out.exists)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("raised", "starts_stack", "says"),
    [
        (
            KafkaConnectionError("down"),
            False,
            "cannot reach a server: KafkaConnectionError: down (Kafka at CLV_KAFKA_BOOTSTRAP; "
            "`clv up` runs a local stack)",
        ),
        (
            RedisConnectionError("refused"),
            False,
            "cannot reach a server: refused (Redis at CLV_REDIS_URL; `clv up` runs a local stack)",
        ),
        (  # `clv up` and `clv demo` start the stack themselves: no advice to run it
            RedisConnectionError("refused"),
            True,
            "cannot reach a server: refused (Redis at CLV_REDIS_URL)",
        ),
        (ConnectionRefusedError(111, "Connection refused"), False, "cannot reach a server: "),
        (  # a file, not a server
            PermissionError(13, "Permission denied", "/var/log/x"),
            False,
            "[Errno 13] Permission denied: '/var/log/x'",
        ),
    ],
)
def test_an_unreachable_server_is_named_by_its_setting(
    raised: BaseException, starts_stack: bool, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from clv.cli import run_async

    async def main(_stop: object) -> None:
        raise raised

    with pytest.raises(typer.Exit) as done:
        run_async(main, starts_stack=starts_stack)  # type: ignore[arg-type]
    assert done.value.exit_code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("clv: error: ") and says in err
    assert err.endswith(says) or says.endswith(": ")


def test_version() -> None:
    from clv import __version__

    out = clv(Settings(), "--version")
    assert (out.returncode, out.stdout, out.stderr) == (0, f"clv {__version__}\n", "")


def test_bad_input_exits_2_and_a_failure_while_running_1(tmp_path: Path) -> None:
    """Not just non-zero: bad input is 2, a failure while running is 1 (docs/contract.md)."""
    settings = Settings(kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:1/0")
    cases = [
        (2, ("features", "alice", "--as-of", "31/12/2024")),
        (2, ("features", "two words")),
        (2, ("replay", str(tmp_path / "missing.csv"))),
        (2, ("replay", str(tmp_path), "--format", "xml")),
        (1, ("features", "alice")),  # nothing listens on the configured Redis
    ]
    for code, args in cases:
        out = clv(settings, *args)
        assert out.returncode == code, (args, out.returncode, out.stderr)
        assert out.stderr.strip().startswith("clv: error:") and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("sig", "code", "says"),
    [(signal.SIGINT, 130, "clv: interrupted"), (signal.SIGHUP, 129, "clv: hung up")],
    ids=["ctrl-c", "hangup"],
)
def test_an_interrupted_backtest_exits_130_and_leaves_nothing_behind(
    tmp_path: Path, sig: int, code: int, says: str
) -> None:
    """Ctrl-C (SIGINT) mid-run: exit 130, no traceback, the staged output and made folders gone.
    (typer turns KeyboardInterrupt into Exit(130) itself; clv says so in one line, as it says
    "clv: terminated" for SIGTERM.) A hangup (a dropped ssh session) the same, exit 129: fails
    if it ends the run by the signal, its staging and made folders left behind."""
    out = tmp_path / "new" / "p.csv"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clv", "backtest", "--format", "cdnow", "--orders", str(SAMPLE),
         "--cutoff", "1997-09-30", "--horizon-days", "91", "--out", str(out),
         "--report", str(tmp_path / "report")],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if "validation: fitting" in line:
            proc.send_signal(sig)
            break
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == says, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_up_runs_the_number_of_consumers_asked_for_on_servers_already_running(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path
) -> None:
    settings = unique_settings(broker.address, redis_server.address, event_log_dir=tmp_path / "ev")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clv", "up", "--consumers", "2", "--retrain-every", "0"],
        env=_env(settings),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        lines = lines_until(proc, "clv is up")
        up = [line for line in lines if line.startswith("clv is up")]
        assert up and up[0].startswith("clv is up: consumers=2 "), "".join(lines)
        assert not any(line.startswith("started") for line in lines)  # both servers ran
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, "".join(lines) + proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
async def test_replay_makes_the_topics_and_publishes_each_order_keyed_by_its_user_in_time_order(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path
) -> None:
    from consumers.kafka import end_offsets, read_topic

    # A deployment in euros; a file out of time order, with its currency.
    settings = unique_settings(broker.address, redis_server.address, currency="EUR").model_copy(
        update={"orders_partitions": 3}
    )
    orders = tmp_path / "orders.csv"
    orders.write_text(
        "user_id,order_id,ts,amount,currency\n"
        "alice,o2,2024-02-01T10:00:00Z,30.00,EUR\n"
        "bob,o3,2024-01-15T10:00:00Z,7.50,EUR\n"
        "alice,o1,2024-01-01T10:00:00Z,10.00,EUR\n"
    )
    out = clv(settings, "replay", str(orders))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"published 3 order events to {settings.orders_topic}"
    # the topics as clv makes them (the broker would make the orders topic itself otherwise)
    assert len(await end_offsets(settings, settings.orders_topic, 10)) == 3
    assert len(await end_offsets(settings, settings.alerts_topic, 10)) == 3
    records = await read_topic(settings, settings.orders_topic)
    values = [json.loads(r.value) for r in records]
    assert all(r.key == v["user_id"].encode() for r, v in zip(records, values, strict=True))
    assert all(v["currency"] == "EUR" for v in values)
    alice = [v["order_id"] for v in values if v["user_id"] == "alice"]  # one partition: in order
    assert alice == ["o1", "o2"]


@pytest.mark.integration
async def test_features_default_to_the_users_latest_day_and_say_when_a_date_precedes_them(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path
) -> None:
    from clv.lookup import lookup_features
    from clv.replay import publish
    from consumers.kafka import ensure_topics
    from tests.consumers.test_archiver import _archive_all
    from tests.consumers.test_feature_consumer import _run_group

    # By the wall clock, with an order two days ahead (within a tolerance of three): "now" is
    # before the user's latest day, which online state still answers exactly.
    ahead = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=2)
    settings = unique_settings(
        broker.address,
        redis_server.address,
        event_log_dir=tmp_path / "events",
        future_tolerance_seconds=3 * 86_400,
    )
    from feature_store.events import encode_event

    orders = [("o1", "2024-03-01T10:00:00Z", 10.0), ("o2", f"{ahead.isoformat()}T00:00:00Z", 20.0)]
    await ensure_topics(settings)
    await publish(
        settings,
        [
            (b"carol", encode_event(event_id=o, user_id="carol", order_id=o, amount=a, ts=ts))
            for o, ts, a in orders
        ],
    )
    await _run_group(settings, 1)
    await _archive_all(settings)

    now = await lookup_features(settings, "carol", None)
    assert now is not None and now["source"] == "redis" and now["as_of"] == ahead.isoformat()
    assert now["features"]["orders_total"] == 2  # type: ignore[index]

    # Before her first event she was unknown, and says so as an unknown user does (exit 1, one
    # line). Fails if it is a success with null features (it was: exit 0, another shape).
    from clv.lookup import UnknownThen

    with pytest.raises(UnknownThen) as info:
        await lookup_features(settings, "carol", dt.date(2024, 2, 1))
    assert str(info.value) == (
        "user 'carol' has no events on or before 2024-02-01 in the event log "
        "(2 after it, the first on 2024-03-01)"
    )


@pytest.mark.parametrize("text", ["19971231", "1997-W01-3", "1997W013"])
def test_a_date_option_is_yyyy_mm_dd_only(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--cutoff, --as-of and --start say YYYY-MM-DD, as the orders files' dates are: Python's
    fromisoformat alone would also take the basic and week forms (a CSV's ts is refused
    in them), so a typo could pass as some other day."""
    from clv.commands import parse_date

    assert parse_date("1997-12-31", "--cutoff") == dt.date(1997, 12, 31)
    with pytest.raises(typer.Exit) as info:
        parse_date(text, "--cutoff")
    assert info.value.exit_code == 2
    assert capsys.readouterr().err == f"clv: error: --cutoff {text!r} is not a date (YYYY-MM-DD)\n"


@pytest.mark.integration
@pytest.mark.parametrize("rate", ["inf", "1e400"])
async def test_replay_refuses_an_infinite_rate_in_one_line_before_making_a_topic(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path, rate: str
) -> None:
    # Fails if `clv replay --rate inf` gets past the option check: the topics are made, then
    # the chunk size int(inf // 10) raises a ValueError, printed as a traceback (exit 1).
    from consumers.kafka import topic_partitions

    settings = unique_settings(broker.address, redis_server.address)
    orders = tmp_path / "orders.csv"
    orders.write_text("user_id,order_id,ts,amount\nu1,o1,2024-01-01,10\n")
    out = clv(settings, "replay", str(orders), "--rate", rate)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("clv: error: --rate") and len(out.stderr.splitlines()) == 1
    assert await topic_partitions(settings, settings.orders_topic, timeout=0) == []


def test_replay_tells_the_format_by_the_content_not_the_name(tmp_path: Path) -> None:
    import gzip

    from clv.replay import load_events
    from training.datasets import DatasetError, orders_format

    named_cdnow = tmp_path / "cdnow_export.csv"  # an orders CSV, whatever its name says
    named_cdnow.write_text("\ufeffuser_id,order_id,ts,amount\nu1,o1,2024-01-01,10\n")
    plain = tmp_path / "orders.txt.gz"  # CDNOW records, gzipped, under a neutral name
    with gzip.open(plain, "wt") as f:
        f.write("00001 19970101 1 11.77\n00002 19970112 2 89.00\n")
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('"ts","amount","user_id","order_id"\n2024-01-01,10,u1,o1\n')
    odd = tmp_path / "odd.txt"
    odd.write_text("what,is,this\n")
    # Fails if the name decides (it did: "cdnow" in the name read a CSV as CDNOW, and the
    # error said to leave out a --format cdnow the user never gave).
    assert orders_format(named_cdnow.read_text("utf-8-sig")) == "csv"
    assert orders_format(quoted.read_text()) == "csv"
    assert orders_format(gzip.decompress(plain.read_bytes()).decode()) == "cdnow"
    assert orders_format(odd.read_text()) == "csv"  # the CSV reader then says which header
    with pytest.raises(DatasetError, match="CSV lacks column"):
        load_events(odd, "auto")
    with pytest.raises(DatasetError, match="orders file not found"):  # the reader says so
        load_events(tmp_path / "missing.csv", "auto")
    assert load_events(named_cdnow, "auto")["user_id"].tolist() == ["u1"]
    assert load_events(quoted, "auto")["user_id"].tolist() == ["u1"]
    assert len(load_events(plain, "auto")) == 2
    blank_first = tmp_path / "blank_first.txt"  # the CDNOW reader skips blank lines
    blank_first.write_text("\n\n00001 19970101 1 11.77\n")
    tabs = tmp_path / "tabs.tsv"  # a header naming user_id, by tabs: the CSV reader's to refuse
    tabs.write_text("user_id\torder_id\tts\tamount\nu1\to1\t2024-01-01\t10\n")
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(gzip.compress(b"00001 19970101 1 11.77\n" * 50)[:30] + b"\xff" * 40)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # never opened: reading a pipe with no writer would block for good
    assert orders_format(blank_first.read_text()) == "cdnow"
    assert len(load_events(blank_first, "auto")) == 1
    assert orders_format(tabs.read_text()) == "csv"
    with pytest.raises(DatasetError, match="CSV lacks column"):
        load_events(tabs, "auto")
    # what cannot be read as text is the reader's to refuse, in one line, before any guess
    with pytest.raises(DatasetError, match="is not valid gzip"):
        load_events(corrupt, "auto")
    with pytest.raises(DatasetError, match="is not a regular file"):
        load_events(fifo, "auto")


@pytest.mark.parametrize(
    ("name", "content", "code", "says"),
    [
        # parsed as CDNOW whatever its name: it gets as far as the broker (closed here)
        ("orders.csv", "00001 19970101 1 11.77\n", 1, "cannot reach a server"),
        ("cdnow_export.csv", "user_id,order_id,ts,amount\nu1,o1,2024-01-01,10\n", 1, "reach"),
        ("fifo", None, 2, "is not a regular file (a pipe or a device)"),
        ("corrupt.gz", b"\x1f\x8b\x08\x00" + b"\xff" * 40, 2, "is not valid gzip"),
    ],
)
def test_replay_auto_format_from_the_command_line(
    tmp_path: Path, name: str, content: str | bytes | None, code: int, says: str
) -> None:
    # Fails if `clv replay` decides by the name (a CSV named *cdnow* read as CDNOW), or reads
    # the file before checking it (a pipe blocked it, a corrupt gzip gave a traceback).
    path = tmp_path / name
    if content is None:
        os.mkfifo(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLV_")}
    out = subprocess.run(
        [sys.executable, "-m", "clv", "replay", str(path)],
        env={**base, "CLV_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code and len(lines) == 1, out.stderr
    assert says in lines[0], lines


def test_replay_of_an_orders_file_it_may_not_read_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Fails if `clv replay` lets the OSError of reading its file through (a file of another
    # user's, mode 600; an I/O error): a traceback instead of one line. Simulated, as the
    # tests may run as root, who may read any file.
    from clv.cli import main

    orders = tmp_path / "orders.csv"
    orders.write_text("user_id,order_id,ts,amount\nu1,o1,2024-01-01,10\n")
    read_bytes = Path.read_bytes

    def refused(self: Path) -> bytes:
        if self == orders:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refused)
    monkeypatch.setenv("CLV_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    assert main(["replay", str(orders)]) == 1
    assert capsys.readouterr().err == f"clv: error: [Errno 13] Permission denied: '{orders}'\n"


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (signal.SIGINT, 130, "clv: interrupted"),
        (signal.SIGTERM, 143, "clv: terminated"),
    ],
)
def test_a_signal_while_python_imports_clv_ends_it_in_one_line(
    tmp_path: Path, sig: int, code: int, line: str
) -> None:
    # Fails if Ctrl-C in the first half second (Python still importing pandas and the rest)
    # prints a KeyboardInterrupt traceback, or SIGTERM there ends it by the bare signal (-15).
    proc = subprocess.Popen(
        [sys.executable, "-m", "clv", "features", "u1"],
        env={**os.environ, "CLV_REDIS_URL": "redis://127.0.0.1:1/0"},
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    maps = Path(f"/proc/{proc.pid}/maps")
    for _ in range(2000):  # until it is importing: pydantic comes before pandas
        if proc.poll() is not None or "pydantic_core" in maps.read_text():
            break
        time.sleep(0.001)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.strip()) == (code, line)


def _entry_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A module ``name`` whose import notes the SIGTERM handler in force, with a ``main``."""
    (tmp_path / f"{name}.py").write_text(
        "import signal\nDURING = signal.getsignal(signal.SIGTERM)\n"
        "def main() -> int:\n    return 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_the_import_guard_gives_back_the_handlers_it_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if clv._start.guarded leaves its mid-import handler in place once the module is
    # imported: a SIGTERM later in the command would then os._exit(143) past its cleanup.
    import importlib

    from clv._start import guarded

    _entry_module(tmp_path, monkeypatch, "guarded_entry")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    said = {signal.SIGINT: (b"x\n", 130), signal.SIGTERM: (b"x\n", 143)}
    assert guarded("guarded_entry", said)() == 7
    assert importlib.import_module("guarded_entry").DURING not in (signal.SIG_DFL, None)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_the_import_guard_leaves_an_ignored_signal_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if clv._start.guarded replaces a signal the process was started with ignored
    # (nohup): a SIGTERM during the imports would then end a run that was to ignore it.
    import importlib

    from clv._start import guarded

    _entry_module(tmp_path, monkeypatch, "guarded_ignored")
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert guarded("guarded_ignored", {signal.SIGTERM: (b"x\n", 143)})() == 7
        assert importlib.import_module("guarded_ignored").DURING == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_import_guard_gives_back_the_handlers_when_the_import_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if a module whose import raises leaves clv._start.guarded's handler in place: a
    # caller that handles the error and goes on would be ended by a later SIGTERM with
    # os._exit, past its own cleanup.
    from clv._start import guarded

    (tmp_path / "guarded_broken.py").write_text("raise RuntimeError('broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="broken"):
        guarded("guarded_broken", {signal.SIGTERM: (b"x\n", 143)})
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (None, 0, ""),
        (signal.SIGINT, 130, "clv: interrupted"),
        (signal.SIGTERM, 143, "clv: terminated"),
        (signal.SIGHUP, 129, "clv: hung up"),
    ],
    ids=["finished", "ctrl-c", "sigterm", "hangup"],
)
def test_a_demo_stopped_before_its_end_exits_as_the_signal_says(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    sig: int | None,
    code: int,
    line: str,
) -> None:
    # Fails if a demo cut short exits 0, as one that ran to its end (or one that ran to its end
    # does not), or if a SIGTERM (timeout, docker stop) or a hangup reads as a Ctrl-C.
    import asyncio

    import clv.demo
    from clv.cli import main

    async def run_demo(_settings: object, stop: asyncio.Event, **_: object) -> bool:
        if sig is None:
            return True
        os.kill(os.getpid(), sig)  # through clv's own handlers, as from a terminal or a kill
        await asyncio.wait_for(stop.wait(), 60)  # else a TimeoutError, not the exit expected
        return False

    monkeypatch.setattr(clv.demo, "run_demo", run_demo)
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == code
    assert capsys.readouterr().err.strip() == line


@pytest.mark.integration
@pytest.mark.parametrize(("sig", "code", "line"), [(signal.SIGINT, 130, "clv: interrupted")])
async def test_a_replay_stopped_while_it_publishes_ends_and_says_how_far_it_got(
    broker: LocalProcess, redis_server: LocalProcess, tmp_path: Path, sig: int, code: int, line: str
) -> None:
    # Fails if clv replay goes on publishing after a Ctrl-C (it ignored every signal until the
    # file was out: at --rate 10, hours), or does not say how much of the file went.
    import asyncio

    from consumers.kafka import end_offsets, read_topic

    settings = unique_settings(broker.address, redis_server.address)
    orders = tmp_path / "orders.csv"
    rows = [f"u{i % 50},o{i},2024-01-01T10:00:{i % 60:02d}Z,1.00" for i in range(3000)]
    orders.write_text("user_id,order_id,ts,amount\n" + "\n".join(rows) + "\n")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "clv", "replay", str(orders), "--rate", "100"),  # 30 s in all
        env=_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(1200):  # a bound, not a timing: until some orders are on the topic
            await asyncio.sleep(0.1)
            if proc.returncode is not None:
                break
            try:
                if sum((await end_offsets(settings, settings.orders_topic, 5)).values()):
                    break
            except Exception:  # the topic is not made yet
                continue
        proc.send_signal(sig)
        try:
            said_out, said_err = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            pytest.fail("clv replay still published 60 s after the signal")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out, err = said_out.decode(), said_err.decode()
    assert proc.returncode == code, err
    said = err.strip().splitlines()
    assert said[-1] == line, err
    sent = len(await read_topic(settings, settings.orders_topic))
    assert 0 < sent < 3000
    assert said[-2] == (
        f"stopped after publishing {sent} of 3000 order events to {settings.orders_topic} "
        f"(the first {sent} of the file in time order)"
    ), err
    assert out.strip() == ""  # no "published ..." line


@pytest.mark.integration
async def test_a_replay_stopped_while_the_broker_hangs_ends_with_what_was_acknowledged(
    redis_server: LocalProcess, tmp_path: Path
) -> None:
    # Fails if (replay.py) the wait for the chunk's acknowledgements is not raced with the
    # stop: with the broker hung, a Ctrl-C (and every signal after it) did nothing until the
    # client gave up (40 s), which ended it as an error, saying nothing of how far it got.
    import asyncio

    from clv.local_stack import free_port, start_broker
    from clv.replay import publish
    from consumers.kafka import ensure_topics

    broker = start_broker(free_port(), tmp_path / "kafka")
    try:
        settings = unique_settings(broker.address, redis_server.address)
        await ensure_topics(settings)
        messages = [(b"u", f'{{"n": {i}}}'.encode()) for i in range(3000)]
        acked: list[int] = []
        stop = asyncio.Event()
        run = asyncio.create_task(
            publish(settings, messages, rate=100, progress=acked.append, stop=stop)
        )
        while not acked:  # (bounded by the wait_for below failing the test otherwise)
            await asyncio.sleep(0.05)
            assert not run.done()
        broker.proc.send_signal(signal.SIGSTOP)  # hung: it accepts, and answers nothing
        await asyncio.sleep(0.5)
        stop.set()
        sent = await asyncio.wait_for(run, 30)  # a bound, not a timing (the client's is 40 s)
        assert 0 < sent == sum(acked) < len(messages)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
        broker.stop()


@pytest.mark.parametrize(
    ("sig", "code", "line"),
    [
        (signal.SIGINT, 130, "clv: interrupted"),
        (signal.SIGTERM, 143, "clv: terminated"),
        (signal.SIGHUP, 129, "clv: hung up"),
    ],
)
def test_features_stopped_while_redis_does_not_answer_ends(
    tmp_path: Path, sig: int, code: int, line: str
) -> None:
    # Fails if clv features ignores a Ctrl-C while it waits for Redis: it waited out the
    # client's timeout (10 s; longer when the URL sets one) and said it could not reach Redis.
    # Also if the stop cancels the look-up only once: Python 3.11's wait_for, which redis-py
    # sends through, lost that cancellation under load (clv.stopping.RECANCEL_AFTER_S).
    code_said, err = signalled_while_redis_is_mute(tmp_path, sig, "features", "u1")
    assert (code_said, err.strip()) == (code, line)


def signalled_while_redis_is_mute(
    tmp_path: Path, sig: int, *args: str, **env_set: str
) -> tuple[int, str]:
    """``clv ARGS`` against a Redis that accepts and never answers (socket timeout 300 s),
    sent ``sig`` once it has connected: its exit code and stderr."""
    import socket

    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # accepted by the kernel, never answered
        mute.settimeout(60)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLV_")}
        env["CLV_REDIS_URL"] = f"redis://127.0.0.1:{mute.getsockname()[1]}/0?socket_timeout=300"
        env.update(env_set)
        proc = subprocess.Popen(
            [sys.executable, "-m", "clv", *args],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = mute.accept()  # clv has connected and waits for an answer
            with conn:
                proc.send_signal(sig)
                try:  # a bound, not a timing: the socket timeout is 300 s
                    _, err = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"clv {args[0]} still waited 60 s after the signal")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("ignored", [signal.SIGHUP, signal.SIGINT], ids=["hangup", "interrupt"])
def test_a_signal_ignored_at_start_stays_ignored_and_handlers_come_back(ignored: int) -> None:
    # Fails if `nohup clv up` stops when its terminal hangs up, or `clv up &` from a script
    # (started with SIGINT ignored by a shell without job control) on the script's Ctrl-C:
    # run_async listened to the signal whatever the start said. Also if run_async leaves
    # SIGTERM at the default once it ends (a second SIGTERM in the teardown killed the process
    # by the signal, with no word).
    import asyncio

    from clv.cli import run_async

    def custom(_signum: int, _frame: object) -> None:
        return None

    before = {s: signal.getsignal(s) for s in (ignored, signal.SIGTERM)}
    signal.signal(ignored, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, custom)
    try:

        async def main(stop: asyncio.Event) -> None:
            os.kill(os.getpid(), ignored)  # handled before the next line runs
            os.kill(os.getpid(), signal.SIGTERM)
            await stop.wait()

        received: list[int] = []
        run_async(main, received=received)
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is custom
        assert signal.getsignal(ignored) == signal.SIG_IGN
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("csv", "user_id,order_id,ts,amount,type\nv1," + "a" * 125 + ",2026-01-01,10,purchase\n"),
        (
            "csv",
            "user_id,order_id,ts,amount,type\n"
            "v2," + "b" * 110 + ",2026-01-01,10,purchase\n"
            "v2," + "b" * 110 + ",2026-01-03,4,refund\n",
        ),
        ("csv", 'user_id,order_id,ts,amount,type\nv3,"x\ty",2026-01-01,10,purchase\n'),
        ("cdnow", "9" * 120 + " 19970101 1 10.00\n"),  # order id user:date:n: over 128
    ],
)
def test_every_event_a_replay_makes_passes_the_consumers_validation(
    tmp_path: Path, fmt: str, text: str
) -> None:
    # Fails if (feature_store/offline.py) the id made for a row without an event_id is left
    # invalid (an order id near the length limit, or with a tab, which the contract allows):
    # clv replay published events the consumers dead-lettered, and exited 0.
    from clv.replay import encode_rows, load_events
    from feature_store.events import validate

    orders = tmp_path / "orders.txt"
    orders.write_text(text)
    settings = Settings()
    events = load_events(orders, fmt, settings)
    messages = encode_rows(events, settings.max_event_bytes)
    assert len(messages) == text.count("\n") - (fmt == "csv")
    made = [validate(value) for _, value in messages]  # raises InvalidEvent if not
    assert [e.event_id for e in made] == events["event_id"].tolist()  # training's ids too
    assert len({e.event_id for e in made}) == len(made)


@pytest.mark.parametrize(
    ("env", "row", "says"),
    [
        (
            {"CLV_FUTURE_TOLERANCE_SECONDS": "60"},
            "u1,o2,{in_2h},6",
            "is in the future",
        ),
        (
            {"CLV_MAX_EVENT_BYTES": "256"},
            "U" * 100 + "," + "O" * 100 + ",2026-01-02,7",
            "over CLV_MAX_EVENT_BYTES (256), which the consumers refuse",
        ),
    ],
)
def test_replay_refuses_what_the_consumers_settings_refuse_before_publishing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    row: str,
    says: str,
) -> None:
    # Fails if clv replay checks a file against fixed limits, not the deployment's settings:
    # an order two hours ahead under a 60 s tolerance, or an event over CLV_MAX_EVENT_BYTES,
    # was published (exit 0) and dead-lettered by the consumers.
    from clv.cli import main

    in_2h = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    orders = tmp_path / "orders.csv"
    orders.write_text(
        "user_id,order_id,ts,amount\nu1,o1,2026-01-01,5\n" + row.format(in_2h=in_2h) + "\n"
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CLV_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # nothing there: none sent
    assert main(["replay", str(orders)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clv: error: ") and says in err and err.count("\n") == 1, err


def test_a_replay_takes_a_time_the_deployments_tolerance_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the other way: a week's tolerance takes an order two days ahead, as the consumers do
    from clv.replay import load_events

    ahead = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    orders = tmp_path / "orders.csv"
    orders.write_text(f"user_id,order_id,ts,amount\nu1,o1,{ahead},5\n")
    monkeypatch.setenv("CLV_FUTURE_TOLERANCE_SECONDS", str(7 * 86_400))
    assert len(load_events(orders, "csv", Settings())) == 1


@pytest.mark.integration
async def test_a_paced_replay_ends_when_its_last_event_is_acknowledged(
    broker: LocalProcess, redis_server: LocalProcess
) -> None:
    # Fails if (clv/replay.py) --rate waits once more after the last chunk: one event at
    # --rate 0.001 was acknowledged, then the replay waited 1,000 s with nothing left to send.
    import asyncio

    from clv.replay import publish

    settings = unique_settings(broker.address, redis_server.address)
    try:
        sent = await asyncio.wait_for(publish(settings, [(b"u1", b"{}")], rate=0.001), 120)
    except TimeoutError:
        pytest.fail("the replay waited on after its last event")
    assert sent == 1
