"""Run the API in this process's event loop until ``stop`` (``clv serve``, and ``clv up``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator

import uvicorn

from clv.errors import ClvError
from clv.settings import Settings
from service.app import create_app

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: clv's ``stop`` event ends it, as it
    ends every other component (uvicorn's would swallow a Ctrl-C meant for the whole stack)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(settings: Settings) -> socket.socket:
    """The listening socket, bound now, so an address in use is one line before any work.
    The address family is the host's (IPv4 where it has an IPv4 address; ``::`` listens on
    both where the system can)."""
    host, port = settings.api_host, settings.api_port
    try:
        found = socket.getaddrinfo(  # ("": every address, as None)
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        families = [info[0] for info in found]
        family = socket.AF_INET if socket.AF_INET in families else families[0]
        dual = family == socket.AF_INET6 and host == "::" and socket.has_dualstack_ipv6()
        sock = socket.create_server((host, port), family=family, backlog=2048, dualstack_ipv6=dual)
    except OSError as exc:
        raise ClvError(
            f"cannot serve the API at {settings.api_host}:{settings.api_port} "
            f"(CLV_API_HOST, CLV_API_PORT): {_reason(exc)}"
        ) from exc
    # Accepted connections inherit it. asyncio sets TCP_NODELAY on the connections of a server
    # it binds itself, not of one handed a socket: without it each answer waited on Nagle and
    # the client's delayed ACK, and /healthz ran at a sixth of its rate (bench-serving).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def api_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches an API listening on ``host``:``port`` at (a
    wildcard address is reached at the loopback; an IPv6 address in brackets)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _reason(exc: OSError) -> str:
    """What went wrong, without the socket module's "(while attempting to bind ...)"; a host
    name that does not resolve has a negative errno, which ``os.strerror`` does not know."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        return (exc.strerror or str(exc)).split(" (while attempting", 1)[0]
    return os.strerror(exc.errno)


async def serve_api(
    settings: Settings, stop: asyncio.Event, sock: socket.socket | None = None
) -> None:
    """Serve until ``stop`` is set; requests in flight are finished first."""
    sock = sock or bind(settings)
    stopping = asyncio.Event()
    config = uvicorn.Config(
        create_app(settings, stopping=stopping),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    host, port = sock.getsockname()[:2]
    log.info("API at %s (OpenAPI: /docs)", api_url(host, port))
    try:
        waiting = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:  # it ended by itself: a failed start (its lifespan raised)
            waiting.cancel()
            task.result()
            raise ClvError(f"the API at {host}:{port} stopped: it could not start")
        stopping.set()  # /readyz answers 503 from now: a load balancer takes it out
        if settings.api_drain_seconds:
            log.info("API draining for %gs (CLV_API_DRAIN_SECONDS)", settings.api_drain_seconds)
            await asyncio.sleep(settings.api_drain_seconds)
        log.info("API stopping")
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
