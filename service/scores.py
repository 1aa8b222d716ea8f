"""Stored scores: one hash per user in the user's Redis Cluster slot, and the rankings.

``<prefix>:score:{<user>}`` holds the latest score (value, purchases expected, ``p_alive``,
churn risk, segment, model version, as-of day, when) and the alert state: the reference value a
drop is measured from and the id of the alert already sent for that drop.
``<prefix>:answer:{<user>}`` holds what the API answers from (:class:`StoredAnswer`): the score
again, the features, the explanation and the digest of the state they were computed from, in
one value, so that a reader never sees half of one write and half of another. A value of its
own also keeps the score hash small: Redis keeps a hash of short fields as one compact list,
and a field over 64 bytes turns it into a table (on CDNOW, 2,452 bytes a user with the
features in the hash against 386 without: docs/benchmarks.md, "Serving").
``{<prefix>:top}`` ranks every scored user by value; ``{<prefix>:top}:<segment>`` each
segment. The rankings share one hash slot, so that a chunk of a batch's ranking is one
script on a cluster too: two replicas ranking a user at once apply one after the other,
never leaving it on two segments' rankings nor on none.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from feature_store.features import FEATURE_NAMES, TIMESTAMP_FEATURES
from feature_store.redis_store import AnyRedis, user_key
from service.scoring import SEGMENTS

#: What ``/users/top`` and the scorer read back of a stored score.
PUBLIC_FIELDS = (
    "clv",
    "expected_orders",
    "p_alive",
    "churn_risk",
    "segment",
    "model_version",
    "as_of",
    "scored_at",
)


#: The features a stored answer holds, in the order it holds them.
ANSWER_FEATURES = (*FEATURE_NAMES, *TIMESTAMP_FEATURES)


def code_digest(sources: Sequence[str]) -> str:
    """A digest of Python sources as code, not text: their syntax trees without docstrings,
    written back as source, so an edit of a comment, a docstring or the layout leaves it as
    it is, as does the Python version (a new digest makes every answer stale and starts new
    alert references)."""
    h = hashlib.blake2b(digest_size=6)
    for source in sources:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        # unparsed, not dumped: a dump lists the node fields of the running Python (3.12 added
        # type_params, 3.13 leaves out empty ones), and one code must have one tag on all
        h.update(ast.unparse(tree).encode())
        h.update(b"\0")
    return h.hexdigest()


def _code_tag() -> str:
    """A digest of the code an answer comes from besides the model's parameters (the feature
    definition and its online decoding, the model classes the pickled champion runs, the
    scoring rules: segments, churn risk, the explanation, the scorer's rules for a new score,
    and this layout) and of the feature names: answers and sweeps of other code are not
    current. The sources are read, not imported (the API does not import the scorer)."""
    import importlib.util

    def source(module: str) -> Path:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None, module
        return Path(spec.origin)

    models = source("training.models").parent
    files = [
        source("feature_store.features"),
        source("feature_store.redis_store"),
        *sorted(models.glob("*.py")),
        source("service.scoring"),
        source("service.scorer"),
        Path(__file__),
    ]
    sources = [repr(ANSWER_FEATURES)] + [p.read_text(encoding="utf-8") for p in files]
    return code_digest(sources)


#: Stored answers and sweeps by other code (an older scorer) are not current.
CODE_TAG = _code_tag()
#: Starts each trace in the last sweep's record (:class:`SweepRecord`); no basis holds it.
TRACE = "~"


def reference_basis(model_version: str, horizon_days: int) -> str:
    """What a score is a value of: the model, the horizon and the code (:data:`CODE_TAG`).
    Each moves every value at once, so a change of it makes a sweep due and starts new alert
    references (``service.scorer.next_score``)."""
    return f"{model_version}:{horizon_days}d:{CODE_TAG}"


def basis_tag(basis: str) -> str:
    """A short name of a basis for the traces in the sweep record."""
    return hashlib.sha256(basis.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class SweepRecord:
    """What the scorers share about the ranking: the last sweep's ``day:basis``, then a trace
    (``~`` and :func:`basis_tag`) of each basis whose values were ranked while the record did
    not vouch for them. A clean record (no trace) says every ranked value is of the swept
    basis: a sweep rewrote them all and nothing else was ranked since. Traces are left
    before the values are ranked, with ``APPEND`` (atomic, a single key: Redis Cluster too),
    and are cleared only by a sweep that saw none added while it ran
    (:meth:`ScoreStore.finish_sweep`)."""

    raw: str | None  # as stored; None before the first sweep
    basis: str | None
    traces: tuple[str, ...]

    @classmethod
    def parse(cls, raw: str | None) -> SweepRecord:
        if raw is None:
            return cls(None, None, ())
        mark, *traces = raw.split(TRACE)
        return cls(raw, mark.partition(":")[2], tuple(traces))

    def vouches_for(self, basis: str) -> bool:
        """Every ranked value is of ``basis`` (before the first sweep: taken as so, the
        ranking having had one basis' values only, a champion replaced before it aside)."""
        return self.raw is None or (self.basis == basis and not self.traces)

    def needs_trace(self, basis: str) -> bool:
        """Values of ``basis`` ranked now must first leave their trace."""
        return not self.vouches_for(basis) and basis_tag(basis) not in self.traces


class StoredAnswer(msgspec.Struct, frozen=True, array_like=True):
    """The scorer's score of one user with what the API answers beside it; stored as one JSON
    array (names are the code's, not repeated in every value)."""

    code_tag: str
    model_version: str
    horizon_days: int
    as_of: str
    state: str  # feature_store.redis_store.state_digest of the state scored
    scored_at: str
    clv: float
    expected_orders: float
    p_alive: float
    churn_risk: float
    segment: str
    feature_values: list[int | float | str | None]  # in ANSWER_FEATURES order
    effects: list[tuple[str, float, float]]  # factor, value, effect

    @classmethod
    def of(
        cls,
        fields: Mapping[str, str],
        *,
        horizon_days: int,
        state: str,
        features: Mapping[str, Any],
        explanation: Sequence[Mapping[str, Any]],
    ) -> StoredAnswer:
        """The answer for a score's stored ``fields`` (:func:`service.scorer.next_score`)."""
        return cls(
            code_tag=CODE_TAG,
            model_version=fields["model_version"],
            horizon_days=horizon_days,
            as_of=fields["as_of"],
            state=state,
            scored_at=fields["scored_at"],
            clv=float(fields["clv"]),
            expected_orders=float(fields["expected_orders"]),
            p_alive=float(fields["p_alive"]),
            churn_risk=float(fields["churn_risk"]),
            segment=fields["segment"],
            feature_values=[features[n] for n in ANSWER_FEATURES],
            effects=[
                (str(e["factor"]), float(e["value"]), float(e["effect"])) for e in explanation
            ],
        )

    @property
    def features(self) -> dict[str, Any]:
        return dict(zip(ANSWER_FEATURES, self.feature_values, strict=True))

    @property
    def explanation(self) -> list[dict[str, Any]]:
        return [{"factor": f, "value": v, "effect": e} for f, v, e in self.effects]


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(StoredAnswer).decode

#: A score and its answer, written only if the user's features exist and, given the header
#: of the state they were computed from (ARGV[2]; empty: not checked), still have it: an
#: erasure that lands while a batch is scored leaves nothing of the user behind, even if the
#: scorer dies before its check after the write (which remains, for the rankings in other
#: slots), and a state begun again or changed meanwhile gets no score of the one before.
_WRITE_IF_KNOWN = (
    "local h = redis.call('HGET', KEYS[1], 'h') "
    "if not h or (ARGV[2] ~= '' and h ~= ARGV[2]) then return 0 end "
    "redis.call('HSET', KEYS[2], unpack(ARGV, 3)) "
    "redis.call('SET', KEYS[3], ARGV[1]) "
    "return 1"
)


#: The sweep record set to ARGV[2] if it is ARGV[1] (missing: ""), else to ARGV[3] unless
#: that is "" (then left). Whether it was ARGV[1].
_SWAP = (
    "local cur = redis.call('GET', KEYS[1]) or '' "
    "if cur == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end "
    "if ARGV[3] ~= '' then redis.call('SET', KEYS[1], ARGV[3]) end return 0"
)
#: A chunk of a ranking kept under the names before the rankings shared a slot (ARGV:
#: member, score, ...; KEYS: everyone's ranking and the segment's, under the new names):
#: each member not yet on everyone's ranking goes on it and on the segment's, so a user
#: ranked since under the new names keeps that ranking and is never on two segments'. Which
#: members went on (1) or not (0).
_ADOPT = (
    "local out = {} "
    "for i = 1, #ARGV, 2 do "
    "out[#out + 1] = 0 "
    "if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then "
    "redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i]) "
    "redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i]) "
    "out[#out] = 1 end end "
    "return out"
)

#: A chunk of a batch's ranking, in one step (KEYS: everyone's ranking, then each segment's in
#: :data:`SEGMENTS` order; ARGV: user, value, its segment's position from 1, ...): each user on
#: everyone's ranking and its segment's, and off every other segment's. One step: two replicas
#: ranking a user at once apply one after the other, never leaving it on two segments'
#: rankings nor on none. A script, not a MULTI/EXEC: redis-py's cluster transactions run each
#: queued command in a thread of its own, which the event loop waits for.
_RANK = (
    "for i = 1, #ARGV, 3 do "
    "local user, value, own = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]) + 1 "
    "redis.call('ZADD', KEYS[1], value, user) "
    "for k = 2, #KEYS do "
    "if k == own then redis.call('ZADD', KEYS[k], value, user) "
    "else redis.call('ZREM', KEYS[k], user) end end end "
    "return 0"
)

#: Users a batch's ranking moves in one step: Redis runs nothing else meanwhile.
RANK_CHUNK = 500

#: Users (ARGV) off every ranking (KEYS, as for :data:`_RANK`) in one step, so that no
#: ranking of a score lands between two of the removals; how many were on one.
_UNRANK = (
    "local n = 0 "
    "for i = 1, #ARGV do "
    "local was = 0 "
    "for k = 1, #KEYS do was = was + redis.call('ZREM', KEYS[k], ARGV[i]) end "
    "if was > 0 then n = n + 1 end end "
    "return n"
)


def text_of(v: Any) -> str:
    """A Redis reply's bytes as text."""
    return v.decode() if isinstance(v, bytes) else str(v)


class ScoreStore:
    def __init__(self, redis: AnyRedis, *, prefix: str = "clv") -> None:
        self._redis = redis
        self._prefix = prefix

    def score_key(self, user_id: str) -> str:
        return user_key(f"{self._prefix}:score", user_id)

    def answer_key(self, user_id: str) -> str:
        return user_key(f"{self._prefix}:answer", user_id)

    def top_key(self, segment: str | None = None) -> str:
        top = f"{{{self._prefix}:top}}"  # one slot for every ranking (a hash tag)
        return top if segment is None else f"{top}:{segment}"

    def legacy_top_key(self, segment: str | None = None) -> str:
        """A ranking's name up to 1f1e89c (:meth:`adopt_legacy_rankings`)."""
        return f"{self._prefix}:top" if segment is None else f"{self._prefix}:top:{segment}"

    async def adopt_legacy_rankings(
        self,
        count: int = 1000,
        after: Callable[[list[str]], Awaitable[object]] | None = None,
    ) -> int:
        """Move the rankings kept under the names before they shared a slot
        (:meth:`legacy_top_key`: an upgrade) to the current names, then delete them; how many
        users were ranked from them. A user ranked under the current names keeps that
        ranking. ``after`` is given each chunk's users once the chunk is adopted: the scorer
        takes those erased meanwhile off again (an erasure by the current code takes a user
        off the current names only)."""
        n = 0
        for segment in SEGMENTS:
            async for chunk in self._scan(self.legacy_top_key(segment), count):
                n += await self._adopt(segment, chunk, after)
        for name in (None, *SEGMENTS):  # one at a time: each is in a slot of its own
            await self._redis.unlink(self.legacy_top_key(name))
        return n

    async def _adopt(
        self,
        segment: str,
        chunk: list[tuple[str, float]],
        after: Callable[[list[str]], Awaitable[object]] | None,
    ) -> int:
        args = [x for member in chunk for x in member]
        went = await self._redis.eval(_ADOPT, 2, self.top_key(), self.top_key(segment), *args)
        if after is not None:
            # every member, not only those put on now: a run cut short after the script (a
            # lost reply, Redis away in ``after``, a kill) left them on the current names,
            # where the run after it finds them ranked already
            await after([user for user, _ in chunk])
        return sum(int(w) for w in went)

    @property
    def _rankings(self) -> list[str]:
        """Everyone's ranking, then each segment's (in :data:`SEGMENTS` order)."""
        return [self.top_key(), *(self.top_key(s) for s in SEGMENTS)]

    async def _scan(self, key: str, count: int) -> AsyncIterator[list[tuple[str, float]]]:
        """A sorted set's members and scores in chunks of about ``count`` (ZSCAN: Redis is
        not blocked)."""
        chunk: list[tuple[str, float]] = []
        async for member, score in self._redis.zscan_iter(key, count=count):
            chunk.append((text_of(member), score))
            if len(chunk) >= count:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    # The scorers' shared records: which clock the scores follow, the last sweep (a
    # SweepRecord: "day:basis" and traces), the lock of the sweep in progress.
    @property
    def clock_key(self) -> str:
        return f"{self._prefix}:clock"

    @property
    def swept_key(self) -> str:
        return f"{self._prefix}:swept"

    @property
    def lock_key(self) -> str:
        return f"{self._prefix}:sweep-lock"

    async def recorded_clock(self) -> str | None:
        raw = await self._redis.get(self.clock_key)
        return None if raw is None else text_of(raw)

    async def record_clock(self, clock: str) -> str:
        """Record ``clock`` unless one is recorded; the clock recorded."""
        await self._redis.set(self.clock_key, clock, nx=True)
        return await self.recorded_clock() or clock

    @staticmethod
    def sweep_mark(day: int, model_version: str, horizon_days: int) -> str:
        """What the last sweep records: a sweep is due when the day or the basis
        (:func:`reference_basis`) differs from the last one's."""
        return f"{day}:{reference_basis(model_version, horizon_days)}"

    async def last_sweep(self) -> str | None:
        raw = await self._redis.get(self.swept_key)
        return None if raw is None else text_of(raw)

    async def sweep_record(self) -> SweepRecord:
        return SweepRecord.parse(await self.last_sweep())

    async def leave_trace(self, basis: str) -> None:
        """Record, before they are ranked, that values of ``basis`` join a ranking the record
        does not vouch for them in (:class:`SweepRecord`)."""
        await self._redis.append(self.swept_key, TRACE + basis_tag(basis))

    async def start_sweep(self, basis: str) -> str:
        """The record a sweep of ``basis`` starts from, to hand to :meth:`finish_sweep`. When
        it does not vouch for ``basis``, the record keeps only this sweep's own trace, so that
        any trace left while the sweep runs is one it can see at its end. Before the first
        sweep (no record) it makes one that vouches for no basis, so another model's values
        ranked during that sweep leave their trace too."""
        for _ in range(8):  # (each miss is a trace just left: rare, and never for long)
            record = await self.sweep_record()
            if record.raw is not None and record.vouches_for(basis):
                return record.raw
            raw = record.raw or ""
            start = raw.split(TRACE)[0] + TRACE + basis_tag(basis)
            if raw == start or await self._swap(raw, start):
                return start
        return record.raw or ""  # the end will see a change: the record stays mixed

    async def finish_sweep(self, start: str, mark: str, basis: str) -> bool:
        """Record the sweep done (``mark``, :meth:`sweep_mark`) if the record is still what it
        started from; else values of another basis were ranked while it ran, and the record
        keeps a trace (a sweep stays due). Whether it was recorded clean."""
        return await self._swap(start, mark, mark + TRACE + basis_tag(basis))

    async def _swap(self, expect: str, new: str, otherwise: str = "") -> bool:
        return bool(await self._redis.eval(_SWAP, 1, self.swept_key, expect, new, otherwise))

    async def read(self, user_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """Each user's stored score, ``None`` where there is none."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for u in user_ids:
                pipe.hgetall(self.score_key(u))
            raws = await pipe.execute()
        return [{text_of(k): text_of(v) for k, v in raw.items()} or None for raw in raws]

    async def write(
        self,
        rows: Sequence[tuple[str, Mapping[str, str]]],
        answers: Mapping[str, StoredAnswer] | None = None,
        headers: Mapping[str, bytes] | None = None,
    ) -> list[bool]:
        """``(user, fields)`` each: the score and, for those in ``answers``,
        the stored answer; then the rankings of the rows written (:meth:`rank`). Which rows
        were written. A score and answer are written only while the user's features exist
        and, when ``headers`` gives the state's header they were computed from, only while the
        state still has it (erased and begun again, or changed, since: nothing is written,
        rankings included, and the change marks the user to be scored again)."""
        answers, headers = answers or {}, headers or {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for user, fields in rows:
                if user in answers:  # only while the state is the one scored (one slot, one step)
                    pipe.eval(
                        _WRITE_IF_KNOWN,
                        3,
                        user_key(self._prefix, user),
                        self.score_key(user),
                        self.answer_key(user),
                        _encode(answers[user]),
                        headers.get(user, b""),
                        *(x for kv in fields.items() for x in kv),
                    )
                else:
                    pipe.hset(self.score_key(user), mapping={k: v for k, v in fields.items()})
            done = await pipe.execute()
        written = [
            user not in answers or bool(ok) for (user, _), ok in zip(rows, done, strict=True)
        ]
        await self.rank([row for row, w in zip(rows, written, strict=True) if w])
        return written

    async def rank(self, rows: Sequence[tuple[str, Mapping[str, str]]]) -> None:
        """Rank each ``(user, fields)`` by its value, on the ranking of everyone and its
        segment's, and off every other segment's (not only the stored score's previous one: a
        failure between a score's write and its ranking leaves another). A user given twice
        is ranked by the last row. One script (:data:`_RANK`) for each :data:`RANK_CHUNK`
        users, the chunks in one pipeline: the rankings share a slot, so a user's moves are
        one step on a cluster too."""
        latest = {user: fields for user, fields in rows}
        if not latest:
            return
        keys = self._rankings
        users = list(latest)
        async with self._redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(users), RANK_CHUNK):
                args: list[str | float | int] = []
                for user in users[start : start + RANK_CHUNK]:
                    fields = latest[user]
                    args += [user, float(fields["clv"]), SEGMENTS.index(fields["segment"]) + 1]
                pipe.eval(_RANK, len(keys), *keys, *args)
            await pipe.execute()

    async def answer(
        self, user_id: str, *, model_version: str, horizon_days: int, as_of: str, state: str
    ) -> StoredAnswer | None:
        """The stored answer for ``user_id`` if it is the score of the state with digest
        ``state`` (:func:`feature_store.redis_store.state_digest`) as of day ``as_of`` by
        model ``model_version`` over ``horizon_days``, from this code: exactly what scoring
        them now would give; else ``None``."""
        raw = await self._redis.get(self.answer_key(user_id))
        if raw is None:
            return None
        try:
            got = _decode(raw)
        except msgspec.DecodeError:  # another layout (another version), or not JSON at all
            return None
        if (got.code_tag, got.model_version, got.horizon_days, got.as_of, got.state) != (
            CODE_TAG,
            model_version,
            horizon_days,
            as_of,
            state,
        ):
            return None
        return got

    async def value_at_share(self, share: float) -> tuple[int, float | None]:
        """How many users are ranked, and the value a user needs to be in the top ``share``
        of them (None: nobody ranked)."""
        n = await self._redis.zcard(self.top_key())
        if not n:
            return 0, None
        rank = max(0, min(n - 1, int(n * share) - 1))
        got = await self._redis.zrevrange(self.top_key(), rank, rank, withscores=True)
        return int(n), float(got[0][1]) if got else None

    async def top(self, limit: int, segment: str | None = None) -> tuple[int, list[dict[str, Any]]]:
        """How many users the ranking holds, and its first ``limit`` with their scores."""
        key = self.top_key(segment)
        count = await self._redis.zcard(key)
        ranked = await self._redis.zrevrange(key, 0, limit - 1)
        users = [text_of(u) for u in ranked]
        async with self._redis.pipeline(transaction=False) as pipe:
            for u in users:
                pipe.hmget(self.score_key(u), PUBLIC_FIELDS)
            values = await pipe.execute()
        out = []
        for user, vals in zip(users, values, strict=True):
            if vals[0] is None:  # erased between the two reads
                continue
            row: dict[str, Any] = {"user_id": user}
            for name, v in zip(PUBLIC_FIELDS, vals, strict=True):
                text = text_of(v)
                row[name] = (
                    float(text)
                    if name in ("clv", "expected_orders", "p_alive", "churn_risk")
                    else text
                )
            out.append(row)
        return int(count), out

    async def ranked(self, count: int = 1000) -> AsyncIterator[list[str]]:
        """The users on every ranking (everyone's, then each segment's), in chunks of about
        ``count`` (ZSCAN: no blocking of Redis); a user comes once for each ranking."""
        for key in self._rankings:
            async for chunk in self._scan(key, count):
                yield [user for user, _ in chunk]

    async def forget(self, user_id: str) -> int:
        """Remove the user's score, stored answer and ranking entries; how many of its keys
        went, plus one if it was ranked."""
        keys = self._rankings
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.score_key(user_id), self.answer_key(user_id))
            pipe.eval(_UNRANK, len(keys), *keys, user_id)
            return sum(int(n) for n in await pipe.execute())

    async def unrank(self, user_ids: Sequence[str]) -> int:
        """Take the users off every ranking (one step); how many were on one."""
        if not user_ids:
            return 0
        keys = self._rankings
        return int(await self._redis.eval(_UNRANK, len(keys), *keys, *user_ids))
