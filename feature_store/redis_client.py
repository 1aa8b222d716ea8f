"""Redis clients for every process, built from ``CLV_REDIS_URL``.

Standalone URLs (``redis://``, ``unix://``) get a connection that packs commands with hiredis'
C packer: redis-py's asyncio connection packs in Python, re-joining its buffer per argument,
which costs more than the feature script itself for a batch with thousands of user keys.
``redis+cluster://`` (or ``?cluster=true``) gives a Redis Cluster client.

Every client waits at most :data:`TIMEOUTS` for a connection and for an answer, whatever the
redis-py version (before 8.0 its default was to wait forever, so a Redis that hung without
closing held a consumer until it answered); ``?socket_timeout=`` and
``?socket_connect_timeout=`` in ``CLV_REDIS_URL`` override them.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlparse

import hiredis
from redis.asyncio import Connection, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

#: Seconds to wait for a connection, and for each answer. A batch's script runs for
#: milliseconds; the answer's wait leaves room for Redis's own stalls (a fork for a snapshot,
#: a slow fsync) before the consumer takes Redis for away and goes back to its commits.
TIMEOUTS: dict[str, Any] = {"socket_connect_timeout": 5.0, "socket_timeout": 10.0}


class HiredisPackConnection(Connection):
    """A standalone connection whose commands are packed by hiredis (same wire bytes)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        return [hiredis.pack_command(args)]


#: How ``?cluster=`` may be spelled (any case).
_YES, _NO = ("true", "yes", "1"), ("false", "no", "0", "")


def cluster_mode(url: str) -> tuple[bool, str]:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, or ``?cluster=`` true), and
    the URL redis-py is given: ``redis://``, without the ``cluster`` parameter. Raises
    ValueError for a ``cluster`` value that is neither true nor false."""
    parsed = urlparse(url)
    if parsed.scheme == "redis+cluster":
        url = "redis" + url[len("redis+cluster") :]
    query = parse_qsl(parsed.query, keep_blank_values=True)
    flags = [v.lower() for k, v in query if k == "cluster"]
    if not flags:
        return parsed.scheme == "redis+cluster", url  # the query as written
    if len(flags) > 1:
        raise ValueError("cluster= is given more than once")
    if flags[0] not in _YES + _NO:
        raise ValueError(f"cluster={flags[0]!r} is neither true nor false")
    rest = urlencode([(k, v) for k, v in query if k != "cluster"])
    base = url.split("?", 1)[0]
    return parsed.scheme == "redis+cluster" or flags[0] in _YES, f"{base}?{rest}" if rest else base


def _secrets(url: str) -> list[str]:
    """What in ``url`` may be (part of) a password: the pieces of everything before its last
    ``@`` (a password may hold ``:``, ``/``, ``?`` or ``#`` unencoded, and a parser's error
    may quote any piece), and each ``password`` value of its query, as written and decoded."""
    rest = url.partition("://")[2] or url
    userinfo = rest.rpartition("@")[0]
    found = [userinfo, *re.split(r"[:/?#]", userinfo)]
    for key, value in re.findall(r"(?:^|[?&])([^=&#?]*)=([^&#]*)", rest):
        if unquote(key).lower() == "password":
            found += [value, unquote(value)]
    found += [repr(f)[1:-1] for f in found]  # as an error's !r quotes it
    return sorted({f for f in found if f}, key=len, reverse=True)


def redacted(url: str, text: str | None = None) -> str:
    """``text`` (by default ``url`` itself) for a message about ``url``: every part of ``url``
    that may be a password written ``***``. Any text is taken, a URL too broken to parse
    included."""
    shown = url if text is None else text
    for secret in _secrets(url):
        shown = shown.replace(secret, "***")
    return shown


def connect(url: str) -> Redis | RedisCluster:
    """A client for ``url``; nothing is connected until the first command."""
    cluster, plain = cluster_mode(url)
    if cluster:
        return RedisCluster.from_url(plain, **TIMEOUTS)
    if urlparse(plain).scheme == "redis":
        return Redis.from_url(plain, connection_class=HiredisPackConnection, **TIMEOUTS)
    return Redis.from_url(plain, **TIMEOUTS)


def check_url(url: str) -> None:
    """Raise ValueError when redis-py would refuse ``url``'s options (a query parameter it does
    not take, a cluster flag it cannot read) once the first command makes a connection: the
    client and a connection object are built, nothing is connected."""
    try:
        client = connect(url)
        if isinstance(client, Redis):
            client.connection_pool.make_connection()
    except (TypeError, ValueError, RedisError, RedisClusterException) as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if unknown:  # say it as the user wrote it, not as a constructor's signature
            raise ValueError(f"redis-py takes no option {unknown[1]!r}") from None
        raise ValueError(str(exc)) from None
