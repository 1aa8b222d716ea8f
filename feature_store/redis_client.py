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


#: A query parameter, as the text has it: its name and its value.
_PARAM = re.compile(r"(?:^|(?<=[&;]))([^=&;#]*)=([^&;#]*)")


def _is_password(name: str) -> bool:
    return unquote(name).lower() == "password"


def _masked(param: re.Match[str]) -> str:
    return f"{param[1]}=***" if _is_password(param[1]) else param[0]


def redacted(url: str, text: str | None = None) -> str:
    """``text`` (by default ``url`` itself) for a message about ``url``, with nothing of a
    password in it. The URL is parsed as redis-py parses it: its user part (``user:password@``)
    and each ``password`` query value are ``***``, and so are they (as written, decoded, or
    quoted with ``!r``) wherever ``text`` holds them. A URL that may hold credentials (an ``@``
    or a ``password``) but whose server part does not parse (a password with an unencoded
    ``/``, ``?`` or ``#`` turns its tail into a port) is shown as its scheme alone, and a
    parser's words about it not at all: they may quote any piece of it."""
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018  (its check: a port that is no number raises)
        # an @ past the server part: a password's tail, its first / taken for the path's
        stray = "@" in _PARAM.sub(_masked, parsed.query) + parsed.path + parsed.fragment
    except ValueError:
        stray = True
    if stray:
        if "@" not in url and "password" not in unquote(url).lower():
            return url if text is None else text  # nothing of a password to hide
        scheme = url.partition("://")[0] if "://" in url else ""
        if text is None:
            return f"{scheme}://***" if scheme else "***"
        return ": it does not parse (the reason is not shown: it may quote the password)"
    userinfo, _, hostport = parsed.netloc.rpartition("@")
    secrets = [userinfo, parsed.password or ""]
    for name, value in _PARAM.findall(parsed.query):
        if _is_password(name):
            secrets += [value, unquote(value)]
    secrets += [repr(x)[1:-1] for x in secrets]  # as an error's !r quotes it
    if text is None:
        head = f"{parsed.scheme}://" if url.startswith(f"{parsed.scheme}://") else ""
        tail = url[len(head) + len(parsed.netloc) :]
        path, q, query = tail.partition("?")
        query = _PARAM.sub(_masked, query)
        return f"{head}{'***@' if userinfo else ''}{hostport}{path}{q}{query}"
    for secret in sorted({x for x in secrets if x}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


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
