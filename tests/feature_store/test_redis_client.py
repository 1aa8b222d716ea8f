"""Which client ``CLV_REDIS_URL`` gives, before anything is connected."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from feature_store.redis_client import check_url, cluster_mode, connect


@pytest.mark.parametrize(
    ("url", "cluster", "given"),
    [
        ("redis+cluster://node-1:7000", True, "redis://node-1:7000"),
        ("redis://node-1:7000/0?cluster=true", True, "redis://node-1:7000/0"),
        # Fails if only the exact text "cluster=true" counts: "True" or "1" reached redis-py
        # as a connection option (a TypeError at the first command), "false" too.
        (
            "redis://node-1:7000/0?cluster=True&socket_timeout=3",
            True,
            "redis://node-1:7000/0?socket_timeout=3",
        ),
        (
            "redis://cache:6379/0?socket_timeout=3&cluster=1",
            True,
            "redis://cache:6379/0?socket_timeout=3",
        ),
        ("redis://cache:6379/0?cluster=false", False, "redis://cache:6379/0"),
        ("rediss://:p%40ss@cache:6380/1?cluster=no", False, "rediss://:p%40ss@cache:6380/1"),
        ("unix:///run/redis.sock?db=2", False, "unix:///run/redis.sock?db=2"),
        ("unix:///run/redis.sock?cluster=false&db=2", False, "unix:///run/redis.sock?db=2"),
    ],
)
def test_the_cluster_flag_is_read_and_never_passed_on(url: str, cluster: bool, given: str) -> None:
    from clv.stack import _plain_redis

    assert cluster_mode(url) == (cluster, given)
    # Fails if `clv up` reads the flag another way (it did: only "cluster=true" was a cluster,
    # so for "cluster=1" it started a plain redis-server the cluster client could not use).
    assert _plain_redis(url) == (not cluster and url.startswith("redis://"))
    client = connect(url)
    assert isinstance(client, RedisCluster if cluster else Redis)
    check_url(url)


def test_an_option_redis_py_does_not_take_is_refused_before_any_connection() -> None:
    with pytest.raises(ValueError, match="redis-py takes no option 'foo'"):
        check_url("redis://cache:6379/0?foo=bar")
    with pytest.raises(ValueError, match="neither true nor false"):
        cluster_mode("redis://cache:6379/0?cluster=perhaps")
