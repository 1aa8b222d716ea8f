"""The scorer: every user's score kept current in Redis, and churn-risk alerts on Kafka.

A user is scored again

* when their events were applied: the feature consumers mark the user changed after each
  batch (:meth:`FeatureStore.mark_changed`), and the scorer takes the marks off a set that
  scorer replicas share;
* when the day changes, and when the champion changes: a **sweep** scores every user, because
  inactivity lowers a customer's value with no event at all. One replica sweeps a given day and
  model (a lock, and a record of the last sweep, in Redis).

**Alerts.** Each stored score keeps a reference value: the value when the user last bought (or
when they were first scored, or the champion changed), raised whenever the value rises above
it. When a customer whose reference was in the top ``CLV_ALERT_TOP_SHARE`` of scored users (by
value, among values of the reference's own model: see :func:`next_score`) when it was set
falls ``CLV_ALERT_DROP_PCT`` percent below it, a ``clv_drop`` alert goes to
``CLV_ALERTS_TOPIC``, once per drop: its ``alert_id`` is a hash of the user, the model and the
reference, so a scorer that fails between publishing and recording the alert sends the same id
again, and the topic's consumers drop the repeat. A purchase, a new champion or a recovery
above the reference starts a new reference. A new champion moves every value at once; that is
no customer's doing, so it resets the references instead of alerting; so does a new horizon
(``CLV_HORIZON_DAYS``) or new scoring code (:data:`~service.scores.CODE_TAG`): a reference is
kept only for scores of its model, horizon and code
(:func:`~service.scores.reference_basis`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter
from redis.exceptions import RedisClusterException, RedisError

from clv.errors import ClvError
from clv.lookup import now_day
from clv.settings import Settings
from clv.stopping import RECANCEL_AFTER_S, cancel_and_wait, stop_or_first_done
from feature_store.features import compute_features, day_date, features_records, now_iso
from feature_store.redis_store import AnyRedis, FeatureStore
from service.champion import Champion, NoChampion
from service.scores import ScoreStore, StoredAnswer, reference_basis
from service.scoring import explain_many, scoring_thread
from training.registry import LoadedModel

log = logging.getLogger(__name__)

SCORED = Counter("clv_scores", "users scored by the scorer", ["trigger"])
ALERTS = Counter("clv_alerts", "churn-risk alerts published")

#: How long the scorer rests when nothing changed; the most it waits between retries when
#: Redis or the broker is away.
IDLE_S = 0.5
MAX_PAUSE_S = 30.0
#: The most model calls one batch may take when calls fail and are split (:meth:`Scorer._explain`):
#: one failing user of 2,000 costs 23, a few of them a few times that.
MAX_SPLIT_CALLS = 64
#: What the scorer waits out (Redis or the broker away).
AWAY = (KafkaError, RedisError, RedisClusterException, ConnectionError, TimeoutError)
#: A ranking this small (or a batch, before there is one) judges no customer valuable.
MIN_RANKED = 100
_RENEW = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('EXPIRE', KEYS[1], ARGV[2]) else return 0 end"
)
_RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
    "else return 0 end"
)
#: A sweep's lock outlives a scorer that died holding it by at most this.
SWEEP_LOCK_S = 600
#: After a stop, how long the batch in hand may take before it is cancelled (a Redis that
#: accepts and never answers would hold it for its whole socket timeout), and how long
#: putting its marks back may take.
STOP_GRACE_S = 5.0
PUT_BACK_S = 5.0


@dataclass(frozen=True, slots=True)
class Alert:
    user_id: str
    value: dict[str, object]


def alert_id(user_id: str, basis: str, ref_last_ms: int, ref_clv: float) -> str:
    """The same for one drop however often it is computed (see the module docstring)."""
    key = f"{user_id}\0{basis}\0{ref_last_ms}\0{ref_clv:.2f}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def next_score(
    user_id: str,
    old: Mapping[str, str] | None,
    new: Mapping[str, object],
    *,
    last_order_ms: int,
    model_version: str,
    horizon_days: int,
    as_of_day: int,
    valuable_from: float | None,
    drop_pct: float,
    ranking_current: bool = True,
) -> tuple[dict[str, str], Alert | None]:
    """The fields to store for ``user_id``'s new score ``new`` (``clv``, ``expected_orders``,
    ``p_alive``, ``churn_risk``, ``segment``), given the stored ``old``; and the alert to send,
    if this score is a drop not alerted yet of a customer who was valuable (in the ranking's
    top share: at least ``valuable_from``) when the reference was set.

    Without ``ranking_current`` (the ranking still holds another basis' values: a new
    champion's first sweep is under way) a new reference is not judged against it, which would
    compare the new model's values with the old one's, but left to the first score once the
    ranking is of the reference's own basis (``ref_valuable`` ``"?"``); its value is the
    reference's then, one sweep's decay of values aside."""
    clv = float(new["clv"])  # type: ignore[arg-type]
    basis = reference_basis(model_version, horizon_days)
    # The reference's last order and basis in the one field every version of the scorer
    # rewrites and compares: a score stored by an older scorer (one without the basis, in a
    # rolling deploy or after a rollback) and one stored by this one each look fresh to the
    # other, never as a reference of their own values.
    ref_of = f"{last_order_ms}@{basis}"
    fresh = old is None or old.get("ref_last_ms") != ref_of
    pending = False  # valuable or not, not judged yet
    if not fresh:
        assert old is not None
        ref, sent = float(old["ref_clv"]), old.get("alert_id", "")
        valuable, pending = old.get("ref_valuable") == "1", old.get("ref_valuable") == "?"
    if fresh or clv > ref:  # (a recovery: a new reference, and a later drop is a new one)
        # Valuable is judged against the ranking when the reference is set: judged later, as
        # every value decays, any customer would pass the falling bar.
        ref, sent, pending = clv, "", not ranking_current
        valuable = not pending and valuable_from is not None and ref >= valuable_from
    elif pending and ranking_current:
        pending = False
        valuable = valuable_from is not None and ref >= valuable_from
    alert = None
    drop = (ref - clv) / ref * 100 if ref > 0 else 0.0
    if not sent and valuable and drop >= drop_pct:
        sent = alert_id(user_id, basis, last_order_ms, ref)
        alert = Alert(
            user_id,
            {
                "alert_id": sent,
                "user_id": user_id,
                "kind": "clv_drop",
                "previous_clv": round(ref, 2),
                "current_clv": round(clv, 2),
                "drop_pct": round(drop, 1),
                "p_alive": float(new["p_alive"]),  # type: ignore[arg-type]
                "segment": str(new["segment"]),
                "model_version": model_version,
                "as_of": day_date(as_of_day).isoformat(),
                "emitted_at": now_iso(),
            },
        )
    fields = {
        "clv": f"{clv:.2f}",
        "expected_orders": str(new["expected_orders"]),
        "p_alive": str(new["p_alive"]),
        "churn_risk": str(new["churn_risk"]),
        "segment": str(new["segment"]),
        "model_version": model_version,
        "as_of": day_date(as_of_day).isoformat(),
        "scored_at": now_iso(),
        "ref_clv": f"{ref:.2f}",
        "ref_last_ms": ref_of,
        "ref_valuable": "?" if pending else "1" if valuable else "0",
        "alert_id": sent,
    }
    return fields, alert


async def unrank_missing(features: FeatureStore, scores: ScoreStore, users: Sequence[str]) -> int:
    """Take those of ``users`` who have no features off the rankings; how many were on one.

    Their score and answer need no removal: they are written only while the features exist,
    and an erasure deletes those it finds. One found with features again at a second look (a
    first event after an erasure, scored by another replica between the look and the removal)
    is marked changed, so that it is scored, and ranked, again."""
    gone = await features.missing(users)
    n = await scores.unrank(gone)
    if gone:
        back = set(gone) - set(await features.missing(gone))
        if back:
            await features.mark_changed(sorted(back))
    return n


async def prune_rankings(
    features: FeatureStore,
    scores: ScoreStore,
    count: int,
    stop: asyncio.Event,
    renew: Callable[[], Awaitable[bool]] | None = None,
) -> int | None:
    """Take the ranked users who have no features off every ranking; how many, or ``None``
    when ``stop`` cut the check short or ``renew`` (the sweep lock's, after each chunk)
    found the lock lost.

    An erasure removes a user's rankings, and a scorer that had the user's score in hand
    removes them again after its write (:meth:`Scorer.score_users`); one that dies in between
    leaves them, as the rankings are in another slot than the user's keys. Each sweep ends
    with this check of every ranking."""
    n = 0
    async for users in scores.ranked(count):
        if stop.is_set():
            return None
        n += await unrank_missing(features, scores, users)
        if renew is not None and not await renew():
            return None
    return n


class Scorer:
    def __init__(
        self,
        settings: Settings,
        redis: AnyRedis,
        champion: Champion,
        producer: AIOKafkaProducer,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._champion = champion
        self._producer = producer
        self.features = FeatureStore(redis, prefix=settings.key_prefix)
        self.scores = ScoreStore(redis, prefix=settings.key_prefix)
        self._owner = uuid.uuid4().hex
        self.alerts_sent = 0
        self._thread = scoring_thread("clv-scorer")

    def close(self) -> None:
        self._thread.shutdown(wait=False)

    async def check_clock(self) -> None:
        """The scores in one Redis follow one clock: the first scorer records its
        ``CLV_CLOCK``, and one with the other is refused. A wall-clock scorer beside a replay's
        event clock scored every customer as of today, and alerted on thousands of drops to
        zero (3,728 in 12 s, in a review), while the other scorer scored them back."""
        mine = self._settings.clock
        theirs = await self.scores.record_clock(mine)
        if theirs != mine:
            raise ClvError(
                f"the scores in this Redis follow CLV_CLOCK={theirs} (another scorer's); this "
                f"one has CLV_CLOCK={mine}: set CLV_CLOCK={theirs}, or use another "
                f"CLV_KEY_PREFIX (deleting {self.scores.clock_key} lets this clock take over)"
            )

    async def run(self, stop: asyncio.Event) -> None:
        """Score changed users, and sweep each new day and model, until ``stop``. Redis or the
        broker away is waited out (said once, retried with a growing pause): the marks taken
        are put back, and an alert published again keeps its id."""
        log.info(
            "scorer started (CLV_CLOCK=%s; alerts to %s when a customer in the top %g%% "
            "drops %g%%)",
            self._settings.clock,
            self._settings.alerts_topic,
            self._settings.alert_top_share * 100,
            self._settings.alert_drop_pct,
        )
        clock_checked = False  # (checked in the loop: a Redis away is waited out there too)
        said_waiting = False
        said_error: str | None = None
        pause = IDLE_S
        while not stop.is_set():
            loaded = self._champion.loaded
            try:
                if not clock_checked:
                    await self.check_clock()  # another clock: a ClvError, which ends it
                    await self.adopt_legacy_rankings()  # before any value is judged by them
                    clock_checked = True
                if loaded is None:
                    if not said_waiting:
                        log.info("scorer waiting for a champion model (`clv train`)")
                        said_waiting = True
                    await _rest(stop, 1.0)
                    continue
                busy = await self._step(loaded, stop)
            except AWAY as exc:
                if str(exc) != said_error:
                    log.warning("scorer: %s; retrying", exc)
                    said_error = str(exc)
                await _rest(stop, pause)
                pause = min(pause * 2, MAX_PAUSE_S)
                continue
            if said_error is not None:
                log.info("scorer: going on")
                said_error, pause = None, IDLE_S
            if not busy:
                await _rest(stop, IDLE_S)
        log.info("scorer stopped")

    async def adopt_legacy_rankings(self) -> None:
        """Rank the users of rankings kept under their names before they shared a slot (an
        upgrade: at the start, and after each sweep, for a scorer of the older code started
        against the README's advice) under the current names
        (:meth:`ScoreStore.adopt_legacy_rankings`), and take those erased since off again."""

        async def off_if_erased(users: list[str]) -> None:
            await unrank_missing(self.features, self.scores, users)

        n = await self.scores.adopt_legacy_rankings(self._settings.score_batch, off_if_erased)
        if n:
            log.info("scorer: %d users ranked from the rankings' names before 4bfb183", n)

    async def _step(self, loaded: LoadedModel, stop: asyncio.Event) -> bool:
        """One round: the changed users, then a sweep when one is due and no other replica
        runs it. Whether there was work (else the caller rests)."""
        day = await now_day(self._settings, self.features)  # (read once a round)
        took = await self.score_changed(loaded, day)
        if await self._sweep_due(day, loaded.version):
            swept = await self.sweep(loaded, day, stop)
            return swept is not None  # another replica's sweep: rest, not spin
        return took > 0

    async def score_changed(self, loaded: LoadedModel, day: int) -> int:
        """Score the users marked changed (one batch) as of ``day`` (or their latest event's,
        when later); how many were taken. A failure puts the marks back, where it still can."""
        users = await self.features.take_changed(self._settings.score_batch)
        if users:
            try:
                await self.score_users(loaded, users, day, trigger="events")
            except BaseException:
                with contextlib.suppress(*AWAY):  # (bounded: a Redis that does not answer)
                    await asyncio.wait_for(self.features.mark_changed(users), PUT_BACK_S)
                raise
        return len(users)

    async def _sweep_due(self, day: int, version: str) -> bool:
        mark = self.scores.sweep_mark(day, version, self._settings.horizon_days)
        return await self.scores.last_sweep() != mark

    async def sweep(self, loaded: LoadedModel, day: int, stop: asyncio.Event) -> int | None:
        """Score every user as of ``day`` (changed users in between); how many were scored, or
        ``None`` when another replica holds the sweep (its lock is renewed with each batch, and
        each chunk of the closing rankings check, so it outlives :data:`SWEEP_LOCK_S` only by
        dying)."""
        got = await self._redis.set(self.scores.lock_key, self._owner, nx=True, ex=SWEEP_LOCK_S)
        if not got:
            return None
        n, alerts_before = 0, self.alerts_sent
        basis = reference_basis(loaded.version, self._settings.horizon_days)
        try:
            start = await self.scores.start_sweep(basis)
            async for users in self.features.scan_users(self._settings.score_batch):
                if stop.is_set():
                    return n  # not recorded as swept: the next run sweeps again
                n += await self.score_users(loaded, users, day, trigger="sweep")
                await self.score_changed(loaded, day)
                if not await self._lock_op("renew"):
                    log.warning("scorer: the sweep lock was lost; another replica sweeps")
                    return n
            await self.adopt_legacy_rankings()  # (erased users among them: pruned next)
            pruned = await prune_rankings(
                self.features,
                self.scores,
                self._settings.score_batch,
                stop,
                renew=lambda: self._lock_op("renew"),
            )
            if pruned is None:  # cut short, or the lock lost: not recorded as swept
                if not stop.is_set():
                    log.warning("scorer: the sweep lock was lost; another replica sweeps")
                return n
            mark = self.scores.sweep_mark(day, loaded.version, self._settings.horizon_days)
            if not await self.scores.finish_sweep(start, mark, basis):
                log.info(
                    "scorer: another model's values were ranked during the sweep; it will "
                    "sweep again"
                )
            if pruned:
                log.info("scorer: %d erased users taken off the rankings", pruned)
            log.info(
                "scored %d users as of %s with model %s: %d churn-risk alerts",
                n,
                day_date(day),
                loaded.version,
                self.alerts_sent - alerts_before,
            )
        finally:
            with contextlib.suppress(*AWAY):  # a Redis gone: the lock expires by itself
                await self._lock_op("release")
        return n

    async def _lock_op(self, op: str) -> bool:
        """Renew or release the sweep lock, only if this scorer still holds it (one step)."""
        script = _RENEW if op == "renew" else _RELEASE
        return bool(
            await self._redis.eval(script, 1, self.scores.lock_key, self._owner, SWEEP_LOCK_S)
        )

    async def score_users(
        self, loaded: LoadedModel, users: Sequence[str], day: int, *, trigger: str
    ) -> int:
        """Score ``users`` as of ``day`` (or their latest event's day, when later), store the
        scores and publish the alerts they call for; how many scores were written (none for
        a user erased meanwhile, nor for one changed meanwhile, which its change marks)."""
        read = await self.features.read_states(users)
        state = read.state
        if not len(state):
            return 0
        as_of = np.maximum(day, state.latest_day)
        features = compute_features(state, as_of)
        horizon = self._settings.horizon_days
        parts, explanations, failed = await self._explain(loaded, features, horizon)
        pos = np.arange(len(features))  # the rows scored, as positions in ``read``
        if failed:  # said, and left as they are: the next event or sweep tries them again
            user, exc = failed[0]
            log.error(
                "model %s could not score %d of %d users (%r: %s)",
                loaded.version,
                len(failed),
                len(features),
                user,
                exc,
            )
            pos = np.flatnonzero(~features.index.isin([u for u, _ in failed]))
            if not len(pos):
                return 0
            features = features.iloc[pos]
        scored = pd.concat(parts)
        ids = list(features.index)
        old = await self.scores.read(ids)
        share = self._settings.alert_top_share
        # The ranking is of this basis once a sweep of it is done and nothing else was ranked
        # since (SweepRecord); values ranked where it does not vouch for them leave a trace
        # first, however few are ranked, so that a return to the swept model (a rollback the
        # same day) sweeps again rather than judge by a ranking holding both models' values.
        mine = reference_basis(loaded.version, horizon)
        record = await self.scores.sweep_record()
        if record.needs_trace(mine):
            await self.scores.leave_trace(mine)
        ranked, valuable_from = await self.scores.value_at_share(share)
        if ranked < MIN_RANKED:  # too few ranked to judge by: this batch, if it is enough
            ranking_current = True
            valuable_from = (
                float(np.quantile(scored["clv"].to_numpy(), 1 - share))
                if len(scored) >= MIN_RANKED
                else None
            )
        else:  # and still so after the ranking's read: another model's values ranked in
            # between left their trace first
            ranking_current = record.vouches_for(mine) and (
                await self.scores.sweep_record()
            ).vouches_for(mine)
        rows, alerts, answers = [], [], {}
        last_ms = state.last_ts_ms
        records = features_records(features)
        new = scored.to_dict("records")
        for i, (user, at) in enumerate(zip(ids, pos.tolist(), strict=True)):
            fields, alert = next_score(
                user,
                old[i],
                new[i],
                last_order_ms=int(last_ms[at]),
                model_version=loaded.version,
                horizon_days=horizon,
                as_of_day=int(as_of[at]),
                valuable_from=valuable_from,
                drop_pct=self._settings.alert_drop_pct,
                ranking_current=ranking_current,
            )
            # what the API answers while the state keeps this digest and the model this version
            answers[user] = StoredAnswer.of(
                fields,
                horizon_days=horizon,
                state=read.digests[at],
                features=records[i],
                explanation=explanations[i],
            )
            rows.append((user, fields))
            if alert is not None:
                alerts.append(alert)
        headers = {user: read.headers[at] for user, at in zip(ids, pos.tolist(), strict=True)}
        if alerts:  # only of states still as read: not of a user erased since (and perhaps
            # begun again by a new event), nor changed (scored again from its mark): README
            now = await self.features.headers([a.user_id for a in alerts])
            alerts = [a for a, h in zip(alerts, now, strict=True) if h == headers[a.user_id]]
        await self._publish(alerts)  # before the scores: a failure in between sends them again
        written = await self.scores.write(rows, answers, headers)
        if (await self.scores.sweep_record()).needs_trace(mine):  # a sweep started since the
            await self.scores.leave_trace(mine)  # check above keeps only its own trace
        # An erasure between the read above and the write: nothing was written
        # (ScoreStore.write); between the score's write and the rankings', in other slots:
        # the rankings outlived it; the erasure removes the features first, so they are found
        # gone here.
        await unrank_missing(self.features, self.scores, [u for u, _ in rows])
        n = sum(written)
        SCORED.labels(trigger).inc(n)
        return n

    async def _explain(
        self, loaded: LoadedModel, features: pd.DataFrame, horizon: int
    ) -> tuple[list[pd.DataFrame], list[list[dict[str, object]]], list[tuple[str, Exception]]]:
        """``features`` scored and explained (:func:`explain_many`) in as few calls as the
        model allows: a call that fails is split in halves until the failure is one user's, so
        that a user the model cannot score (a forecast that is not a number) costs only that
        user's score, as in the API. At most :data:`MAX_SPLIT_CALLS` calls a batch (a model
        that fails on everyone would otherwise take two a user): a chunk is split only while
        both halves and every chunk still waiting can have a call, else it fails as a whole.
        The scores and explanations of the chunks scored, in order, and the users that failed."""
        scored, explanations, failed = [], [], []
        todo, left = [features], MAX_SPLIT_CALLS  # the chunks in order, the first last
        while todo:
            chunk = todo.pop()
            left -= 1
            # (submitted outside the try: a scorer closed meanwhile is no failure of the model's)
            call = asyncio.get_running_loop().run_in_executor(
                self._thread, explain_many, loaded, chunk, horizon
            )
            try:
                part, explained = await call
            except Exception as exc:  # the model's failure, whatever it raised
                if len(chunk) > 1 and left - len(todo) >= 2:
                    half = len(chunk) // 2
                    todo += [chunk.iloc[half:], chunk.iloc[:half]]
                else:
                    failed += [(str(u), exc) for u in chunk.index]
                continue
            scored.append(part)
            explanations += explained
        return scored, explanations, failed

    async def _publish(self, alerts: list[Alert]) -> None:
        if not alerts:
            return
        topic = self._settings.alerts_topic
        sent = [
            await self._producer.send(topic, json.dumps(a.value).encode(), key=a.user_id.encode())
            for a in alerts
        ]
        await asyncio.gather(*sent)
        ALERTS.inc(len(alerts))
        self.alerts_sent += len(alerts)


async def _rest(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def run_scorer(
    settings: Settings,
    stop: asyncio.Event,
    redis: AnyRedis,
    producer: AIOKafkaProducer,
    *,
    poll_s: float = 2.0,
) -> None:
    """The scorer with a champion of its own, picked up again whenever the pointer moves."""
    champion = Champion(settings.model_dir)
    try:
        await champion.refresh()
    except NoChampion as exc:
        log.info("no model to score with yet: %s", exc)
    except ClvError as exc:
        log.warning("no model to score with: %s", exc)
    watch = asyncio.create_task(champion.watch(poll_s))
    scorer = Scorer(settings, redis, champion, producer)
    running = asyncio.create_task(scorer.run(stop))
    try:
        await stop_or_first_done(stop, [running])
        if not running.done():  # stopped: the batch in hand may end, for a while
            done, _ = await asyncio.wait({running}, timeout=STOP_GRACE_S)
            if not done:
                await cancel_and_wait(running, again_after=RECANCEL_AFTER_S)
        if not running.cancelled():
            running.result()
    finally:
        if not running.done():  # cancelled itself
            await cancel_and_wait(running)
        scorer.close()
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


async def serve_scorer(settings: Settings, stop: asyncio.Event) -> None:
    """``clv score``: the scorer alone, with clients of its own."""
    from clv.stopping import StoppedWhileStarting, unless_stopped
    from consumers.kafka import ensure_topics, make_producer
    from consumers.metrics import metrics_served
    from feature_store.redis_client import connect

    with metrics_served(settings):
        redis = connect(settings.redis_url)
        try:
            await unless_stopped(stop, redis.ping())
            await unless_stopped(stop, ensure_topics(settings))
            producer = make_producer(settings)
            try:
                await unless_stopped(stop, producer.start())
                await run_scorer(settings, stop, redis, producer)
            finally:
                await producer.stop()
        except StoppedWhileStarting:
            return
        finally:
            await redis.aclose()
