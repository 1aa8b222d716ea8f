"""Redis clients for every process, built from ``CLV_REDIS_URL``.

Standalone URLs (``redis://``, ``unix://``) get a connection that packs commands with hiredis'
C packer: redis-py's asyncio connection packs in Python, re-joining its buffer per argument,
which costs more than the feature script itself for a batch with thousands of user keys.
``redis+cluster://`` (or ``?cluster=true``) gives a Redis Cluster client.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

import hiredis
from redis.asyncio import Connection, Redis
from redis.asyncio.cluster import RedisCluster


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
        return RedisCluster.from_url(plain.rstrip("?&"))
    if parsed.scheme == "redis":
        return Redis.from_url(url, connection_class=HiredisPackConnection)
    return Redis.from_url(url)
