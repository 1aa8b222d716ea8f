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

from typing import Any
from urllib.parse import parse_qs, urlparse

import hiredis
from redis.asyncio import Connection, Redis
from redis.asyncio.cluster import RedisCluster

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


def connect(url: str) -> Redis | RedisCluster:
    """A client for ``url``; nothing is connected until the first command."""
    parsed = urlparse(url)
    if parsed.scheme == "redis+cluster" or parse_qs(parsed.query).get("cluster") == ["true"]:
        plain = url.replace("redis+cluster://", "redis://", 1).replace("cluster=true", "")
        return RedisCluster.from_url(plain.rstrip("?&"), **TIMEOUTS)
    if parsed.scheme == "redis":
        return Redis.from_url(url, connection_class=HiredisPackConnection, **TIMEOUTS)
    return Redis.from_url(url, **TIMEOUTS)
