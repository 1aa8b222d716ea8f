"""Online caller of the feature definition: per-user state in Redis, written atomically.

One hash per user, ``<prefix>:{<user_id>}``, holding a binary header record, day buckets and
the dedup set; the braces make the user id the Redis Cluster hash tag, so everything the service
keeps for a user (state, scores, alert state) lives in one slot.
A batch is applied by one Lua script (``lua/apply_batch.lua``) that deduplicates by event id,
updates the state and records the consumer's progress together: a crash either applied all of
the batch or none of it, and a redelivered event changes nothing.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import msgspec
import numpy as np
import pandas as pd
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from clv.errors import StoreError
from feature_store.events import ValidEvent
from feature_store.features import RETENTION_DAYS, UserState, compute_features

_SCRIPT = files("feature_store").joinpath("lua/apply_batch.lua").read_text()
_pack = msgspec.msgpack.Encoder().encode

AnyRedis = Redis | RedisCluster


def user_key(prefix: str, user_id: str) -> str:
    """``<prefix>:{<user_id>}``: the user id is the Redis Cluster hash tag. An id with a ``}``
    would cut the tag short (or empty it), so such ids get a tag made of their hash instead;
    every key of one user then still shares one slot."""
    if "}" not in user_id:
        return f"{prefix}:{{{user_id}}}"
    tag = hashlib.blake2b(user_id.encode(), digest_size=8).hexdigest()
    return f"{prefix}:{{~{tag}}}:{user_id}"


@dataclass(frozen=True, slots=True)
class StoredState:
    state: UserState  # one row
    updated_ms: int  # wall-clock ms of the last change


@dataclass(slots=True)
class ApplyResult:
    applied: int
    duplicates: int
    too_late: list[int]  # indexes into the applied sequence, rejected as too late


class FeatureStore:
    """Reads and writes per-user feature state in Redis (or Redis Cluster)."""

    def __init__(
        self, redis: AnyRedis, *, prefix: str = "clv", retention_days: int = RETENTION_DAYS
    ):
        self._redis = redis
        self._prefix = prefix
        self._retention = retention_days
        self._script = redis.register_script(_SCRIPT)
        self._cluster = isinstance(redis, RedisCluster)

    # -- keys ---------------------------------------------------------------------------------
    def user_key(self, user_id: str) -> str:
        return user_key(self._prefix, user_id)

    def progress_key(self, group: str) -> str:
        return f"{self._prefix}:progress:{{{group}}}"

    # -- writes -------------------------------------------------------------------------------
    async def apply(
        self,
        events: Sequence[ValidEvent],
        *,
        group: str,
        progress: dict[str, int],
        now_ms: int,
    ) -> ApplyResult:
        """Apply ``events`` (in arrival order) and record ``progress`` (``"topic:partition" ->
        offset``) atomically.

        On a single Redis this is one script call; on Redis Cluster one call per hash slot (each
        atomic), then the progress: per-event deduplication keeps a retried batch from counting
        twice either way. Events dated at or before the user's latest event day minus the
        retention come back (as indexes) in ``too_late``, unapplied: the caller dead-letters them.
        """
        clock = max((e.ts_ms for e in events), default=-1)
        if not self._cluster:
            keys, payload = self._encode(events)
            a, d, late = await self._run(
                [self.progress_key(group), *keys], payload, progress, now_ms, clock=clock
            )
            return ApplyResult(a, d, late)
        by_slot: dict[int, list[int]] = {}  # slot -> positions in ``events``, in order
        for i, ev in enumerate(events):
            slot = self._redis.keyslot(self.user_key(ev.user_id))  # type: ignore[union-attr]
            by_slot.setdefault(slot, []).append(i)
        result = ApplyResult(0, 0, [])
        for positions in by_slot.values():
            keys, payload = self._encode(events[i] for i in positions)
            # No progress in a slot's call, so KEYS[1] goes unused: a same-slot stand-in.
            a, d, late = await self._run([keys[0], *keys], payload, {}, now_ms, clock=-1)
            result.applied += a
            result.duplicates += d
            result.too_late.extend(positions[i] for i in late)
        result.too_late.sort()  # arrival order, as from a single Redis
        if progress:
            await self._run(
                [self.progress_key(group)],
                _pack([]),
                progress,
                now_ms,
                clock=clock,
            )
        return result

    def _encode(self, events: Iterable[ValidEvent]) -> tuple[list[str], bytes]:
        index: dict[str, int] = {}
        rows: list[tuple[int, str, int, int, int, int]] = []
        prefix = self._prefix
        for ev in events:
            ki = index.get(ev.user_id)
            if ki is None:
                ki = index[ev.user_id] = len(index) + 2  # KEYS[1] is the progress hash
            rows.append(
                (ki, ev.event_id, ev.day, ev.ts_ms, ev.cents, 1 if ev.type == "purchase" else 0)
            )
        keys = [user_key(prefix, uid) for uid in index]
        return keys, _pack(rows)

    async def _run(
        self,
        keys: list[str],
        payload: bytes,
        progress: dict[str, int],
        now_ms: int,
        *,
        clock: int,
    ) -> tuple[int, int, list[int]]:
        args: list[bytes | int] = [
            payload,
            _pack(list(progress.items())),
            now_ms,
            self._retention,
            clock,
        ]
        try:
            res = await self._script(keys=keys, args=args)
        except Exception as exc:  # redis errors carry the script's message
            raise StoreError(f"applying a batch failed: {exc}") from exc
        return int(res[0]), int(res[1]), [int(i) for i in res[2]]

    async def delete_user(self, user_id: str) -> bool:
        return bool(await self._redis.delete(self.user_key(user_id)))

    # -- reads --------------------------------------------------------------------------------
    async def progress(self, group: str) -> dict[str, int]:
        """Last applied offset per ``"topic:partition"``."""
        raw = await self._redis.hgetall(self.progress_key(group))
        return {_s(k): int(v) for k, v in raw.items() if _s(k) != "event_clock"}

    async def event_clock_ms(self, group: str) -> int | None:
        """Largest event time the group has applied (``now`` when ``CLV_CLOCK=event``)."""
        v = await self._redis.hget(self.progress_key(group), "event_clock")
        return None if v is None else int(v)

    async def read_state(self, user_id: str) -> StoredState | None:
        """The user's state and when it last changed (one read), or None for an unknown user."""
        raw: dict[bytes, bytes] = await self._redis.hgetall(self.user_key(user_id))  # type: ignore[assignment]
        if b"h" not in raw:
            return None
        return StoredState(state_from_hash(user_id, raw), int(_HEADER.unpack(raw[b"h"])[8]))

    async def features(self, user_id: str, as_of_day: int | None = None) -> pd.DataFrame | None:
        """One user's features; ``as_of_day`` defaults to the user's latest event day and must
        not be earlier than it (earlier dates are the offline event log's job)."""
        stored = await self.read_state(user_id)
        if stored is None:
            return None
        return online_features(stored.state, as_of_day)


def online_features(state: UserState, as_of_day: int | None = None) -> pd.DataFrame:
    """The feature definition over one user's online state; ``as_of_day`` defaults to the
    user's latest event day and must not be earlier than it (earlier dates are the offline
    event log's job)."""
    latest = int(state.latest_day[0])
    day = latest if as_of_day is None else as_of_day
    if day < latest:
        raise StoreError(
            f"as_of day {day} is before the user's latest event day {latest}; "
            "online state answers from the latest event on"
        )
    return compute_features(state, day)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# The header record apply_batch.lua writes (see its header comment).
_HEADER = struct.Struct("<ididdididi")
_HEADER_NAMES = (
    "orders",
    "cents",
    "purchase_days",
    "first_ms",
    "last_ms",
    "first_day",
    "first_day_cents",
    "latest_day",
    "updated_ms",
    "oldest_day",
)


def decode_hash(raw: dict[bytes, bytes], dedup: bool = True) -> dict[str, Any]:
    """One user's stored state, by name; the seen event ids under ``"dedup"`` unless ``dedup``
    is false (the feature read needs only the header and the day records)."""
    out: dict[str, Any] = {
        k: int(v) for k, v in zip(_HEADER_NAMES, _HEADER.unpack(raw[b"h"]), strict=True)
    }
    days: dict[int, list[int]] = {}
    seen: dict[str, int] = {}
    for name, value in raw.items():
        tag = name[:1]
        if tag in (b"o", b"v"):
            days.setdefault(int(name[1:]), [0, 0])[0 if tag == b"o" else 1] = int(value)
        elif dedup and tag == b"#":
            seen[name[1:].decode()] = int(value)
    out["days"] = {d: (o, c) for d, (o, c) in days.items()}
    if dedup:
        out["dedup"] = seen
    return out


def state_from_hash(user_id: str, raw: dict[bytes, bytes]) -> UserState:
    """Decode one user's stored hash into a one-row :class:`UserState`."""
    state = decode_hash(raw, dedup=False)
    rows = sorted(state["days"].items())
    one = lambda v: np.asarray([v], dtype=np.int64)  # noqa: E731
    return UserState(
        user_id=np.asarray([user_id], dtype=object),
        orders_total=one(state["orders"]),
        cents_total=one(state["cents"]),
        purchase_days=one(state["purchase_days"]),
        first_ts_ms=one(state["first_ms"]),
        last_ts_ms=one(state["last_ms"]),
        first_day=one(state["first_day"]),
        first_day_cents=one(state["first_day_cents"]),
        latest_day=one(state["latest_day"]),
        days_user=np.zeros(len(rows), dtype=np.int64),
        days_day=np.asarray([d for d, _ in rows], dtype=np.int64),
        days_orders=np.asarray([o for _, (o, _) in rows], dtype=np.int64),
        days_cents=np.asarray([c for _, (_, c) in rows], dtype=np.int64),
    )
