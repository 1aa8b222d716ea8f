"""``clv serve`` and ``clv score`` as processes: served until SIGTERM, bad settings in one line."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from clv.local_stack import LocalProcess, free_port
from clv.settings import Settings
from tests.test_cli import _env, clv

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("host", "url_host"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("::", "[::1]")]
)
def test_serve_answers_until_sigterm_then_exits_0(
    api_settings: Settings, host: str, url_host: str
) -> None:
    # Fails if (server.py) an IPv6 CLV_API_HOST is bound as IPv4 ("Address family for hostname
    # not supported"), or its URL is written without the brackets.
    api_settings = api_settings.model_copy(update={"api_host": host})
    proc = subprocess.Popen(
        [sys.executable, "-m", "clv", "serve"],
        env=_env(api_settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://{url_host}:{api_settings.api_port}"
        for _ in range(300):  # a bound, not a timing
            try:
                ready = httpx.get(f"{url}/readyz", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
        else:
            raise AssertionError("clv serve did not answer")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        if host == "::":  # every address, IPv4's too
            assert httpx.get(f"http://127.0.0.1:{api_settings.api_port}/healthz").is_success
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert f"API at {url} (OpenAPI" in err


def test_serve_on_an_address_in_use_is_one_line(api_settings: Settings) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = clv(api_settings.model_copy(update={"api_port": port}), "serve")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"clv: error: cannot serve the API at 127.0.0.1:{port} (CLV_API_HOST, CLV_API_PORT): "
        "Address already in use"
    ]


def test_score_without_redis_is_one_line(broker: LocalProcess, api_settings: Settings) -> None:
    settings = api_settings.model_copy(
        update={
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",
            "kafka_bootstrap": broker.address,
        }
    )
    done = clv(settings, "score")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("clv: error: cannot reach a server:") and "CLV_REDIS_URL" in line


def test_serve_on_a_host_that_does_not_resolve_is_one_line(api_settings: Settings) -> None:
    done = clv(api_settings.model_copy(update={"api_host": "no-such-host.invalid"}), "serve")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("clv: error: cannot serve the API at no-such-host.invalid:")
    assert "Unknown error" not in line and "while attempting" not in line


def test_the_api_socket_sends_answers_without_waiting_on_nagle(api_settings: Settings) -> None:
    # Fails without TCP_NODELAY: asyncio sets it only on servers it binds itself, and each
    # answer waited on the client's delayed ACK (/healthz at a sixth of its rate).
    from service.server import bind

    with bind(api_settings) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_an_empty_api_host_listens_on_every_address(api_settings: Settings) -> None:
    # Fails if (server.py) "" is looked up as a host name ("Name or service not known")
    # instead of meaning every address, as it did when the socket module resolved it.
    from service.server import bind

    with bind(api_settings.model_copy(update={"api_host": ""})) as sock:
        assert sock.getsockname()[0] == "0.0.0.0"
