"""Online caller of the feature definition: per-user state in Redis, written atomically.

One hash per user, ``<prefix>:{<user_id>}``, holding a binary header record, day buckets and
the dedup set; the braces make the user id the Redis Cluster hash tag, so everything the service
keeps for a user (state, scores, alert state) lives in one slot.
A batch is applied by one Lua script (``lua/apply_batch.lua``) that deduplicates by event id,
updates the state and records the consumer's progress together: a crash either applied all of
the batch or none of it, and a redelivered event changes nothing.

On a single Redis the batches' script calls are pipelined (:class:`_OrderedCalls`): each is
written as soon as it is submitted, on one connection, so Redis has the next batch's request in
hand when it finishes one and runs them in the order submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import struct
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import msgspec
import numpy as np
import pandas as pd
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterCrossSlotError,
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from clv.errors import StoreError, StoreUnavailable
from feature_store.events import ValidEvent
from feature_store.features import RETENTION_DAYS, UserState, compute_features

_SCRIPT = files("feature_store").joinpath("lua/apply_batch.lua").read_text()
_pack = msgspec.msgpack.Encoder().encode

AnyRedis = Redis | RedisCluster

#: Error replies that say Redis is away for now, by their code (redis-py keeps the code in the
#: message of the replies it has no class for). ``CLVORDER`` is the apply script's own: the
#: batch before was not applied.
_AWAY_REPLIES = (
    "BUSY ",
    "LOADING",
    "MASTERDOWN",
    "NOREPLICAS",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "CLVORDER",
)


def redis_away(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis is away for now rather than refusing the request: no
    connection, no answer within the socket timeout, still loading its data, busy with another
    script, a replica not yet promoted in a failover (``READONLY``), a cluster slot without a
    master, or a batch refused because the one before it failed for one of these. Refused
    credentials are not (a retry would not mend them). ``ConnectionError`` (the builtin) is how
    a call outstanding on a connection that failed under another call is failed."""
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return False
    if isinstance(
        exc,
        RedisConnectionError
        | RedisTimeoutError
        | ConnectionError
        | TimeoutError
        | ReadOnlyError
        | TryAgainError
        | SlotNotCoveredError,
    ):
        return True
    if isinstance(exc, ClusterError):  # down, master down, redirections run out ("TTL")
        return not isinstance(exc, ClusterCrossSlotError)
    if isinstance(exc, RedisClusterException):  # no node answers, or a slot has no master
        return any(text in str(exc) for text in ("cannot be connected", "not covered"))
    return isinstance(exc, ResponseError) and str(exc).startswith(_AWAY_REPLIES)


def _apply_failed(exc: BaseException) -> StoreError:
    """The error a failed apply raises: :class:`StoreUnavailable` when Redis is away."""
    kind = StoreUnavailable if redis_away(exc) else StoreError
    return kind(f"applying a batch failed: {exc}")


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
    digest: str  # of the state (state_digest): equal digests, equal features on any day


@dataclass(frozen=True, slots=True)
class StoredStates:
    """Many users' states as :meth:`FeatureStore.read_states` reads them: ``state`` has a row
    for each user Redis knows, ``known`` their positions in the users asked for, and
    ``digests`` one :func:`state_digest` per row, ``headers`` the raw header each row was read
    with (every change of a state rewrites its header)."""

    state: UserState
    known: list[int]
    digests: list[str]
    headers: list[bytes]


def state_digest(raw: dict[bytes, bytes]) -> str:
    """A digest of what the features are computed from (the header and the day records, not
    the seen event ids): a stored score computed from a state with this digest is the score
    of this state."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(k for k in raw if k[:1] in (b"h", b"o", b"v")):
        value = raw[name]
        h.update(len(name).to_bytes(2, "little") + name + len(value).to_bytes(4, "little") + value)
    return h.hexdigest()


@dataclass(slots=True)
class ApplyResult:
    applied: int
    duplicates: int
    too_late: list[int]  # indexes into the applied sequence, rejected as too late


class _Held:
    """A connection taken from the pool for pipelined calls, with the calls outstanding on it.

    It goes back to the pool once nobody uses it: ``users`` counts the writer sending on it
    (under the lock) and its reader task. Dead (a send or a read failed, or was cancelled: a
    request may be half written, a reply half read) it is disconnected before it goes back,
    and no call is written on it again.
    """

    __slots__ = ("conn", "dead", "reader", "reading", "users", "waiting")

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.reader: asyncio.Task[None] | None = None
        self.reading = False  # the reader has run: cancelling it now runs its ``finally``
        self.users = 0
        self.dead = False


class _OrderedCalls:
    """``EVAL`` calls on one connection, each written when made and answered in that order.

    Redis runs a connection's requests in the order it receives them, so the calls run in the
    order they were made, and the next one waits in Redis's input buffer, not in this client,
    while Redis runs the one before. The connection is taken from the client's pool while calls
    are outstanding and given back when none are. Each call carries the script itself (a few
    KiB against a batch's hundreds), so that a ``SCRIPT FLUSH`` while calls are outstanding
    fails none of them (an ``EVALSHA`` written before a reload could not be sent again in
    order). A call answered with an error fails alone; a connection that fails fails every call
    outstanding on it (whether Redis ran them is unknown: the caller retries the batches, which
    deduplication makes safe), and no task of this object touches it once it is back in the
    pool.
    """

    def __init__(self, redis: Redis, script: str) -> None:
        self._pool = redis.connection_pool
        self._script = script
        self._held: _Held | None = None  # the connection new calls are written on
        self._writing = asyncio.Lock()  # one request's bytes at a time

    async def call(self, keys: list[str], args: list[bytes | int]) -> asyncio.Future[Any]:
        """Write the call; the future is its answer."""
        async with self._writing:
            held = self._held
            if held is None:
                held = self._held = _Held(await self._pool.get_connection())
            held.users += 1
            answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            held.waiting.append(answer)
            try:
                try:
                    await held.conn.send_command(
                        "EVAL", self._script, len(keys), *keys, *args, check_health=False
                    )
                except BaseException as exc:  # half a request may be on the wire
                    answer.cancel()  # the caller gets ``exc``, not the future
                    if not answer.cancelled():
                        answer.exception()  # failed by the reader already: seen here
                    self._kill(held, exc)
                    raise
                if held.reader is None:
                    held.users += 1
                    held.reader = asyncio.create_task(self._read(held))
            finally:
                try:
                    await self._leave(held)
                except BaseException:  # cancelled while giving the dead connection back
                    if not answer.cancel() and not answer.cancelled():
                        answer.exception()  # failed with the connection: nobody gets it now
                    raise
            return answer

    async def _read(self, held: _Held) -> None:
        """Answer the calls outstanding on ``held`` in order; give it back when none is left."""
        held.reading = True
        try:
            if held.dead:  # killed before this task first ran: nothing to read
                return
            while True:
                while held.waiting:
                    try:
                        reply: Any = await held.conn.read_response()
                    except ResponseError as exc:  # this call's own error: it alone
                        reply = exc
                    answer = held.waiting.popleft()
                    if not answer.done():
                        if isinstance(reply, Exception):
                            answer.set_exception(reply)
                        else:
                            answer.set_result(reply)
                async with self._writing:
                    if held.waiting:
                        continue  # a call was written while this one waited for the lock
                    if self._held is held:
                        self._held = None  # the next call takes a connection again
                    return
        except BaseException as exc:  # the connection: every call outstanding on it
            self._kill(held, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            await self._leave(held)

    def _kill(self, held: _Held, exc: BaseException) -> None:
        """Fail every call outstanding on ``held`` and write none on it again; its reader
        (unless that is who calls) is cancelled, so that it lets go of the connection now and
        not when the old socket's end comes through."""
        if held.dead:
            return
        held.dead = True
        if self._held is held:
            self._held = None
        error = exc if isinstance(exc, Exception) else ConnectionError("a call was cancelled")
        while held.waiting:
            answer = held.waiting.popleft()
            if not answer.done():
                answer.set_exception(error)
        reader = held.reader
        # A reader that has not run yet is left to run: cancelled now, its coroutine would be
        # closed before its ``try``, and its ``finally`` (giving the connection back) never run.
        if (
            reader is not None
            and held.reading
            and reader is not asyncio.current_task()
            and not reader.done()
        ):
            reader.cancel()

    async def _leave(self, held: _Held) -> None:
        held.users -= 1
        if held.users == 0:
            # Shielded: a second cancellation of the task leaving must not leak the connection.
            await asyncio.shield(self._give_back(held))

    async def _give_back(self, held: _Held) -> None:
        if held.dead:
            with contextlib.suppress(Exception):
                await held.conn.disconnect(nowait=True)
        await self._pool.release(held.conn)


class FeatureStore:
    """Reads and writes per-user feature state in Redis (or Redis Cluster)."""

    def __init__(
        self,
        redis: AnyRedis,
        *,
        prefix: str = "clv",
        retention_days: int = RETENTION_DAYS,
        script: str = _SCRIPT,  # the apply script (``make bench-apply`` compares variants)
    ):
        self._redis = redis
        self._prefix = prefix
        self._retention = retention_days
        self._script = redis.register_script(script)
        self._ordered = None if isinstance(redis, RedisCluster) else _OrderedCalls(redis, script)
        self._last: asyncio.Task[ApplyResult] | None = None  # Redis Cluster: the last submitted

    # -- keys ---------------------------------------------------------------------------------
    def user_key(self, user_id: str) -> str:
        return user_key(self._prefix, user_id)

    def progress_key(self, group: str) -> str:
        return f"{self._prefix}:progress:{{{group}}}"

    def changed_key(self) -> str:
        """The set of users whose events were applied since the scorer last took them."""
        return f"{self._prefix}:changed"

    # -- the scorer's side ----------------------------------------------------------------------
    async def mark_changed(self, user_ids: Iterable[str]) -> None:
        """Tell the scorer these users' features changed (after their batch is applied)."""
        users = sorted(set(user_ids))
        for i in range(0, len(users), 10_000):
            await self._redis.sadd(self.changed_key(), *users[i : i + 10_000])

    async def take_changed(self, count: int) -> list[str]:
        """Up to ``count`` users marked changed, taken off the set (scorer replicas share it)."""
        got = await self._redis.spop(self.changed_key(), count)
        return sorted(_s(u) for u in got or ())

    async def forget(self, user_id: str) -> bool:
        """Erase the user's state (features, seen event ids) and change mark; whether Redis
        knew the user."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.user_key(user_id))
            pipe.srem(self.changed_key(), user_id)
            gone, _ = await pipe.execute()
        return bool(gone)

    async def missing(self, user_ids: Sequence[str]) -> list[str]:
        """Those of ``user_ids`` with no state (erased, or never seen)."""
        keys = [self.user_key(u) for u in user_ids]
        if not keys or await self._redis.exists(*keys) == len(keys):
            return []  # the usual answer, in one command (split by slot on a cluster)
        async with self._redis.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.exists(k)
            found = await pipe.execute()
        return [u for u, n in zip(user_ids, found, strict=True) if not n]

    async def headers(self, user_ids: Sequence[str]) -> list[bytes | None]:
        """Each user's state header as it is now (``None``: no state): every change of a
        state rewrites it, so an equal header is the state read before."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for u in user_ids:
                pipe.hget(self.user_key(u), "h")
            return list(await pipe.execute())

    async def read_states(self, user_ids: Sequence[str]) -> StoredStates:
        """The stored state of those of ``user_ids`` Redis knows (one pipelined read)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for u in user_ids:
                pipe.hgetall(self.user_key(u))
            raws = await pipe.execute()
        known = [i for i, raw in enumerate(raws) if b"h" in raw]
        return StoredStates(
            states_from_hashes([(user_ids[i], raws[i]) for i in known]),
            known,
            [state_digest(raws[i]) for i in known],
            [raws[i][b"h"] for i in known],
        )

    async def scan_users(self, count: int = 1000) -> AsyncGenerator[list[str], None]:
        """Every user with state, in chunks of about ``count`` (SCAN: no blocking of Redis)."""
        pattern = _glob_escape(f"{self._prefix}:{{") + "*"
        chunk: list[str] = []
        async for key in self._redis.scan_iter(match=pattern, count=count):
            chunk.append(_user_of_key(_s(key), self._prefix))
            if len(chunk) >= count:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    # -- writes -------------------------------------------------------------------------------
    async def apply(
        self,
        events: Sequence[ValidEvent],
        *,
        group: str,
        progress: dict[str, int],
        now_ms: int,
        after: dict[str, int] | None = None,
    ) -> ApplyResult:
        """Apply ``events`` (in arrival order) and record ``progress`` (``"topic:partition" ->
        offset``) atomically: :meth:`submit`, then its answer."""
        pending = await self.submit(
            events, group=group, progress=progress, now_ms=now_ms, after=after
        )
        return await pending

    async def submit(
        self,
        events: Sequence[ValidEvent],
        *,
        group: str,
        progress: dict[str, int],
        now_ms: int,
        after: dict[str, int] | None = None,
    ) -> Awaitable[ApplyResult]:
        """Queue the apply of ``events`` (in arrival order) with ``progress`` behind the batches
        submitted before it, and return its pending result. Batches are applied in the order
        submitted; the caller may submit the next before this one's result is in.

        ``after`` (``"topic:partition" -> offset``): where the batches submitted before this one
        ended. When the recorded progress is short of any of them, one of those was not applied
        (Redis refused it while away, and was back by this one), and this batch is refused
        with it, unapplied (:class:`StoreUnavailable`): no batch is applied ahead of one before
        it, which would make the earlier one's events late against the later one's.

        On a single Redis a batch is one script call; on Redis Cluster one call per hash slot
        (each atomic), then the progress: per-event deduplication keeps a retried batch from
        counting twice either way. Events dated at or before the user's latest event day minus
        the retention come back (as indexes) in ``too_late``, unapplied: the caller dead-letters
        them.
        """
        clock = max((e.ts_ms for e in events), default=-1)
        if self._ordered is None:
            self._last = asyncio.create_task(
                self._apply_cluster(events, group, progress, now_ms, clock, self._last, after)
            )
            return self._last
        keys, payload = self._encode(events)
        args = self._args(payload, progress, now_ms, clock)
        if after:
            args.append(_pack(list(after.items())))
        try:
            answer = await self._ordered.call([self.progress_key(group), *keys], args)
        except Exception as exc:
            raise _apply_failed(exc) from exc
        return self._result(answer)

    @staticmethod
    async def _result(answer: Awaitable[Any]) -> ApplyResult:
        """The script's answer, or a StoreError carrying Redis's message."""
        try:
            res = await answer
        except Exception as exc:  # redis errors carry the script's message
            raise _apply_failed(exc) from exc
        return ApplyResult(int(res[0]), int(res[1]), [int(i) for i in res[2]])

    async def _apply_cluster(
        self,
        events: Sequence[ValidEvent],
        group: str,
        progress: dict[str, int],
        now_ms: int,
        clock: int,
        previous: asyncio.Task[ApplyResult] | None,
        after: dict[str, int] | None,
    ) -> ApplyResult:
        if previous is not None:
            # Its failure, or its caller's cancellation, is its caller's to see, not this one's
            # (``await previous`` would cancel this batch with it).
            await asyncio.wait([previous])
            if not previous.cancelled():
                previous.exception()  # seen here too: no "never retrieved" if its caller left
        if after:  # as the script's check on a single Redis (the batch before has finished)
            fields = list(after)
            try:
                stored = await self._redis.hmget(self.progress_key(group), fields)
            except Exception as exc:
                raise _apply_failed(exc) from exc
            for field, value in zip(fields, stored, strict=True):
                if int(value if value is not None else -1) < after[field]:
                    raise _apply_failed(  # the script's own refusal, word for word
                        ResponseError(
                            f"CLVORDER the batch before this one on {field} "
                            f"(to offset {after[field]}) was not applied"
                        )
                    )
        by_slot: dict[int, list[int]] = {}  # slot -> positions in ``events``, in order
        for i, ev in enumerate(events):
            slot = self._redis.keyslot(self.user_key(ev.user_id))  # type: ignore[union-attr]
            by_slot.setdefault(slot, []).append(i)
        result = ApplyResult(0, 0, [])
        for positions in by_slot.values():
            keys, payload = self._encode(events[i] for i in positions)
            # No progress in a slot's call, so KEYS[1] goes unused: a same-slot stand-in.
            part = await self._run([keys[0], *keys], payload, {}, now_ms, clock=-1)
            result.applied += part.applied
            result.duplicates += part.duplicates
            result.too_late.extend(positions[i] for i in part.too_late)
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

    def _args(
        self, payload: bytes, progress: dict[str, int], now_ms: int, clock: int
    ) -> list[bytes | int]:
        return [payload, _pack(list(progress.items())), now_ms, self._retention, clock]

    async def _run(
        self,
        keys: list[str],
        payload: bytes,
        progress: dict[str, int],
        now_ms: int,
        *,
        clock: int,
    ) -> ApplyResult:
        args = self._args(payload, progress, now_ms, clock)
        return await self._result(self._script(keys=keys, args=args))

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
        updated_ms = int(_HEADER.unpack(raw[b"h"])[8])
        return StoredState(state_from_hash(user_id, raw), updated_ms, state_digest(raw))

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


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _user_of_key(key: str, prefix: str) -> str:
    """The user id of a :func:`user_key`."""
    rest = key[len(prefix) + 2 :]  # after "<prefix>:{"
    if rest.startswith("~") and "}:" in rest:  # an id with a "}": its hash is the tag
        return rest.split("}:", 1)[1]
    return rest[:-1]


def states_from_hashes(items: Sequence[tuple[str, dict[bytes, bytes]]]) -> UserState:
    """Decode many users' stored hashes into one :class:`UserState` (one row per user)."""
    ones = [state_from_hash(u, raw) for u, raw in items]
    names = [f.name for f in dataclasses.fields(UserState)]
    if not ones:
        return UserState(
            **{n: np.zeros(0, dtype=object if n == "user_id" else np.int64) for n in names}
        )
    cat = {n: np.concatenate([getattr(o, n) for o in ones]) for n in names if n != "days_user"}
    cat["days_user"] = np.repeat(np.arange(len(ones)), [len(o.days_day) for o in ones])
    return UserState(**cat)


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
