"""The scorer: stored scores and rankings, sweeps as time passes, churn-risk alerts once per
drop. Pure rules first, then against a real Redis and broker."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pandas as pd
import pytest

from clv.local_stack import LocalProcess, free_port
from clv.lookup import now_day
from clv.settings import Settings
from consumers.kafka import ensure_topics, make_producer, read_topic
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore
from service.champion import Champion
from service.scorer import Scorer, alert_id, next_score, prune_rankings
from service.scores import reference_basis
from service.scoring import SEGMENTS
from tests.consumers.kafka_helpers import event_message, unique_settings
from tests.feature_store.streams import MS_PER_DAY, _ev
from tests.service.conftest import CUTOFF, register, serving
from tests.service.test_api import apply, purchases
from training.models.naive import HistoricalRate
from training.registry import LoadedModel

NEW = {"expected_orders": 1.0, "p_alive": 0.5, "churn_risk": 0.6, "segment": "at_risk"}


def _next(old: dict[str, str] | None, clv: float, **kw: object) -> tuple[dict[str, str], object]:
    args: dict[str, object] = {
        "last_order_ms": 1000,
        "model_version": "v1",
        "horizon_days": 365,
        "as_of_day": CUTOFF,
        "valuable_from": 100.0,
        "drop_pct": 30.0,
    }
    args.update(kw)
    return next_score("u", old, {**NEW, "clv": clv}, **args)  # type: ignore[arg-type]


def test_a_first_score_is_its_own_reference_and_alerts_nothing() -> None:
    fields, alert = _next(None, 300.0)
    assert alert is None and fields["ref_clv"] == "300.00" and fields["alert_id"] == ""


def test_a_valuable_customers_drop_alerts_once_with_a_stable_id() -> None:
    first, _ = _next(None, 300.0)
    small, alert = _next(first, 220.0)  # -26.7%: under 30
    assert alert is None and small["ref_clv"] == "300.00"
    dropped, alert = _next(small, 150.0)
    assert alert is not None
    value = alert.value  # type: ignore[attr-defined]
    assert value["kind"] == "clv_drop" and value["previous_clv"] == 300.0
    assert value["current_clv"] == 150.0 and value["drop_pct"] == 50.0
    basis = reference_basis("v1", 365)
    assert value["alert_id"] == alert_id("u", basis, 1000, 300.0) == dropped["alert_id"]
    assert set(value) == {
        "alert_id",
        "user_id",
        "kind",
        "previous_clv",
        "current_clv",
        "drop_pct",
        "p_alive",
        "segment",
        "model_version",
        "as_of",
        "emitted_at",
    }
    # the same drop scored again (the next day, a re-sweep): no second alert
    later, again = _next(dropped, 120.0)
    assert again is None and later["alert_id"] == dropped["alert_id"]
    # scored again from the state before the alert was recorded: the same id
    _, repeat = _next(small, 150.0)
    assert repeat.value["alert_id"] == value["alert_id"]  # type: ignore[attr-defined]


def test_a_purchase_a_recovery_or_a_new_model_starts_a_new_reference() -> None:
    first, _ = _next(None, 300.0)
    dropped, alert = _next(first, 100.0)
    assert alert is not None
    bought, alert = _next(dropped, 150.0, last_order_ms=2000)
    assert alert is None and bought["ref_clv"] == "150.00" and bought["alert_id"] == ""
    recovered, alert = _next(dropped, 320.0)
    assert alert is None and recovered["ref_clv"] == "320.00" and recovered["alert_id"] == ""
    # a champion that values everyone lower is not a drop of any customer's
    switched, alert = _next(first, 100.0, model_version="v2")
    assert alert is None and switched["ref_clv"] == "100.00"
    # nor is a shorter horizon (CLV_HORIZON_DAYS), nor other scoring code (a deploy)
    shorter, alert = _next(first, 100.0, horizon_days=90)
    assert alert is None and shorter["ref_clv"] == "100.00"
    assert shorter["ref_last_ms"] == "1000@" + reference_basis("v1", 90) != first["ref_last_ms"]
    assert _next(shorter, 95.0, horizon_days=90)[0]["ref_clv"] == "100.00"  # kept on its basis
    import service.scores

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service.scores, "CODE_TAG", "other code")
        deployed, alert = _next(first, 100.0)
    assert alert is None and deployed["ref_clv"] == "100.00"
    # a score stored by a scorer that did not record the basis (an upgrade, or one beside this
    # one in a rolling deploy): a new reference, no alert
    older = {**first, "ref_last_ms": "1000"}
    upgraded, alert = _next(older, 100.0)
    assert alert is None and upgraded["ref_clv"] == "100.00"
    # and the other way (a rollback): such a scorer compares the field with the bare time, so
    # it starts a reference of its own values rather than take this one's
    assert upgraded["ref_last_ms"] != "1000"


def test_valuable_is_judged_when_the_reference_is_set_not_against_a_falling_bar() -> None:
    first, _ = _next(None, 90.0)
    assert first["ref_valuable"] == "0"
    assert _next(first, 10.0)[1] is None  # 90 < 100: not among the valuable
    # every value decayed, the bar with them: still not one of the valuable of its day
    assert _next(first, 10.0, valuable_from=5.0)[1] is None
    assert _next(None, 300.0, valuable_from=None)[0]["ref_valuable"] == "0"


def test_a_reference_set_while_the_ranking_is_another_models_is_judged_later() -> None:
    # Fails if (scorer.py) a reference set during a new champion's first sweep is judged
    # against the ranking, which then holds the old champion's values.
    first, alert = _next(None, 300.0, valuable_from=1000.0, ranking_current=False)
    assert alert is None and first["ref_valuable"] == "?"
    # still the old ranking: still not judged, and no alert for a customer not judged
    later, alert = _next(first, 100.0, valuable_from=1000.0, ranking_current=False)
    assert alert is None and later["ref_valuable"] == "?"
    # the ranking is the model's own: the reference (300) is judged, and its drop alerts
    judged, alert = _next(later, 100.0, valuable_from=250.0)
    assert alert is not None and judged["ref_valuable"] == "1" and judged["ref_clv"] == "300.00"
    assert _next(first, 100.0, valuable_from=350.0)[0]["ref_valuable"] == "0"


@pytest.fixture
def scorer_settings(broker: LocalProcess, redis_server: LocalProcess, model_dir) -> Settings:  # type: ignore[no-untyped-def]
    return unique_settings(
        broker.address, redis_server.address, model_dir=model_dir, alert_top_share=0.5
    )


@pytest.mark.integration
async def test_scores_rankings_and_one_alert_per_drop_as_time_passes(
    scorer_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.scorer

    monkeypatch.setattr(service.scorer, "MIN_RANKED", 2)  # four customers judge the valuable
    settings = scorer_settings
    await ensure_topics(settings)
    redis = connect(settings.redis_url)
    producer = make_producer(settings)
    await producer.start()
    try:
        store = FeatureStore(redis, prefix=settings.key_prefix)
        # a regular customer, a heavy one, and two one-time buyers
        regular = purchases("regular", [CUTOFF - 200 + 30 * i for i in range(5)])
        heavy = purchases("heavy", [CUTOFF - 150 + 10 * i for i in range(15)], cents=6000)
        once = purchases("once-a", [CUTOFF - 100]) + purchases("once-b", [CUTOFF - 5])
        await apply(store, regular + heavy + once)
        await store.mark_changed(["regular", "heavy", "once-a", "once-b"])
        champion = Champion(settings.model_dir)
        await champion.refresh()
        assert champion.loaded is not None
        scorer = Scorer(settings, redis, champion, producer)

        # the changed users, scored as of the cutoff: ranked by value
        await scorer.score_users(
            champion.loaded, await store.take_changed(100), CUTOFF, trigger="events"
        )
        assert await store.take_changed(100) == []
        count, top = await scorer.scores.top(10)
        assert count == 4 and [u["user_id"] for u in top][:2] == ["heavy", "regular"]
        assert [u["clv"] for u in top] == sorted((u["clv"] for u in top), reverse=True)
        _, new = await scorer.scores.top(10, "new")
        assert [u["user_id"] for u in new] == ["once-b"]
        assert await read_topic(settings, settings.alerts_topic) == []

        # a year with no purchase: a sweep scores everyone; the valuable ones' drops alert
        stop = asyncio.Event()
        assert await scorer.sweep(champion.loaded, CUTOFF + 365, stop) == 4
        alerts = [json.loads(r.value) for r in await read_topic(settings, settings.alerts_topic)]
        assert sorted(a["user_id"] for a in alerts) == ["heavy", "regular"]
        for a in alerts:
            assert a["current_clv"] <= a["previous_clv"] * 0.7 and a["as_of"] == "1998-09-30"
        records = await read_topic(settings, settings.alerts_topic)
        assert {r.key for r in records} == {b"heavy", b"regular"}
        # another day further: still the same drop, no second alert
        await scorer.sweep(champion.loaded, CUTOFF + 400, stop)
        assert len(await read_topic(settings, settings.alerts_topic)) == 2
        _, lost = await scorer.scores.top(10, "lost")
        assert {u["user_id"] for u in lost} >= {"heavy", "regular"}
        _, active = await scorer.scores.top(10, "active")
        assert not {u["user_id"] for u in active} & {"heavy", "regular"}

        # the heavy customer buys again: scored from the change mark, a new reference
        back = _ev("heavy-back", "purchase", "heavy", "o-back", 6000, (CUTOFF + 401) * MS_PER_DAY)
        await apply(store, [back])
        await store.mark_changed(["heavy"])
        assert await scorer.score_changed(champion.loaded, CUTOFF + 401) == 1
        stored = (await scorer.scores.read(["heavy"]))[0]
        assert (
            stored is not None
            and stored["alert_id"] == ""
            and stored["ref_last_ms"].split("@")[0] == str((CUTOFF + 401) * MS_PER_DAY)
        )
    finally:
        await producer.stop()
        await redis.aclose()


@pytest.mark.integration
async def test_the_feature_consumers_mark_the_users_whose_events_they_applied(
    scorer_settings: Settings,
) -> None:
    from clv.replay import publish
    from tests.consumers.test_feature_consumer import _run_group

    settings = scorer_settings
    await ensure_topics(settings)
    events = purchases("m1", [CUTOFF, CUTOFF + 1]) + purchases("m2", [CUTOFF])
    await publish(settings, [event_message(e) for e in events])
    await _run_group(settings, 1)
    redis = connect(settings.redis_url)
    try:
        store = FeatureStore(redis, prefix=settings.key_prefix)
        assert await store.take_changed(100) == ["m1", "m2"]
    finally:
        await redis.aclose()


@pytest.fixture
async def scorer(scorer_settings: Settings):  # type: ignore[no-untyped-def]
    """A scorer on real Redis and broker, with the fitted champion, and its feature store."""
    await ensure_topics(scorer_settings)
    redis = connect(scorer_settings.redis_url)
    producer = make_producer(scorer_settings)
    await producer.start()
    champion = Champion(scorer_settings.model_dir)
    await champion.refresh()
    s = Scorer(scorer_settings, redis, champion, producer)
    try:
        yield s, champion
    finally:
        s.close()
        await producer.stop()
        await redis.aclose()


@pytest.mark.integration
async def test_a_scorer_rests_while_another_replica_sweeps(scorer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Fails if it spins: with the lock held elsewhere, each round went straight to the next.
    import service.scorer

    s, _ = scorer
    await apply(s.features, purchases("u1", [CUTOFF]))
    await s._redis.set(s.scores.lock_key, "another-replica")
    rounds: list[str] = []
    stop = asyncio.Event()
    real_step = s._step

    async def step(loaded, stop_):  # type: ignore[no-untyped-def]
        rounds.append("step")
        if rounds.count("step") >= 5:
            stop.set()
        return await real_step(loaded, stop_)

    async def rest(stop_, seconds):  # type: ignore[no-untyped-def]
        rounds.append("rest")

    monkeypatch.setattr(s, "_step", step)
    monkeypatch.setattr(service.scorer, "_rest", rest)
    await asyncio.wait_for(s.run(stop), 60)
    assert rounds[:8] == ["step", "rest"] * 4


@pytest.mark.integration
async def test_a_failure_puts_the_marks_back_and_the_scorer_waits_it_out(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from redis.exceptions import ConnectionError as RedisConnectionError

    import service.scorer

    s, champion = scorer
    await apply(s.features, purchases("u1", [CUTOFF]) + purchases("u2", [CUTOFF]))
    await s.features.mark_changed(["u1", "u2"])
    real_write = s.scores.write
    failures = [RedisConnectionError("Redis blip")]

    async def write(*args):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()
        return await real_write(*args)

    monkeypatch.setattr(s.scores, "write", write)
    with pytest.raises(RedisConnectionError):
        await s.score_changed(champion.loaded, CUTOFF)
    assert sorted(await s._redis.smembers(s.features.changed_key())) == [b"u1", b"u2"]
    # the loop waits the failure out and scores them on the next round
    failures.append(RedisConnectionError("Redis blip"))
    stop = asyncio.Event()
    pauses: list[float] = []

    async def rest(stop_, seconds):  # type: ignore[no-untyped-def]
        pauses.append(seconds)
        if len(pauses) >= 2:
            stop.set()

    monkeypatch.setattr(service.scorer, "_rest", rest)
    await asyncio.wait_for(s.run(stop), 60)
    stored = await s.scores.read(["u1", "u2"])
    assert all(x is not None for x in stored)
    assert pauses[0] == service.scorer.IDLE_S  # the first retry after one pause


@pytest.mark.integration
@pytest.mark.parametrize("dies", [False, True])
async def test_an_erasure_during_a_batch_leaves_no_score_behind(scorer, monkeypatch, dies) -> None:  # type: ignore[no-untyped-def]
    # Between the read and the write, the erasure wins: nothing of the user is written. Between
    # the score's write and the rankings' (other slots), the check after the write takes the
    # rankings off; with ``dies`` the scorer dies before that check, and the next sweep does.
    s, champion = scorer
    await apply(s.features, purchases("gone", [CUTOFF]) + purchases("kept", [CUTOFF]))
    real_read, real_rank, real_missing = s.scores.read, s.scores.rank, s.features.missing

    async def erase() -> None:  # DELETE /users/gone
        await s.features.forget("gone")
        await s.scores.forget("gone")

    async def read(users):  # type: ignore[no-untyped-def]
        old = await real_read(users)
        await erase()
        return old

    async def rank(rows):  # type: ignore[no-untyped-def]
        await erase()
        await real_rank(rows)

    async def died(users):  # type: ignore[no-untyped-def]
        raise RuntimeError("the scorer died")

    if dies:
        monkeypatch.setattr(s.scores, "rank", rank)
        monkeypatch.setattr(s.features, "missing", died)
        with pytest.raises(RuntimeError):
            await s.score_users(champion.loaded, ["gone", "kept"], CUTOFF, trigger="events")
        monkeypatch.setattr(s.features, "missing", real_missing)
        monkeypatch.setattr(s.scores, "rank", real_rank)
        count, top = await s.scores.top(10)
        assert count == 2 and [u["user_id"] for u in top] == ["kept"]  # the ranking outlived it
        assert await s.sweep(champion.loaded, CUTOFF, asyncio.Event()) == 1
    else:
        monkeypatch.setattr(s.scores, "read", read)
        assert await s.score_users(champion.loaded, ["gone", "kept"], CUTOFF, trigger="events") == 1
    count, top = await s.scores.top(10)
    assert count == 1 and [u["user_id"] for u in top] == ["kept"]
    for segment in (None, *SEGMENTS):
        assert await s._redis.zscore(s.scores.top_key(segment), "gone") is None
    gone, kept = await real_read(["gone", "kept"])
    assert gone is None and kept is not None
    assert not await s._redis.exists(s.scores.answer_key("gone"))
    assert await s._redis.exists(s.scores.answer_key("kept"))


async def _rankings_of(s: Scorer, user: str) -> dict[str | None, float]:  # type: ignore[no-untyped-def]
    out = {}
    for segment in (None, *SEGMENTS):
        value = await s._redis.zscore(s.scores.top_key(segment), user)
        if value is not None:
            out[segment] = value
    return out


@pytest.mark.integration
async def test_a_score_of_a_state_erased_and_begun_again_is_not_written(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # Erased between the scorer's read and its write, and a new event begun a new state before
    # the write: the score of the erased state is not written (nor its answer), as for a
    # state changed meanwhile; the next scoring starts from the new state alone.
    s, champion = scorer
    await apply(
        s.features, purchases("again", [CUTOFF - 40, CUTOFF - 20]) + purchases("kept", [CUTOFF])
    )
    real_read = s.scores.read

    async def read(users):  # type: ignore[no-untyped-def]
        old = await real_read(users)
        await s.features.forget("again")  # DELETE /users/again
        await s.scores.forget("again")
        await apply(s.features, [_ev("n1", "purchase", "again", "n1", 500, CUTOFF * MS_PER_DAY)])
        return old

    monkeypatch.setattr(s.scores, "read", read)
    assert await s.score_users(champion.loaded, ["again", "kept"], CUTOFF, trigger="events") == 1
    again, kept = await real_read(["again", "kept"])
    assert again is None and kept is not None
    assert not await s._redis.exists(s.scores.answer_key("again"))
    assert await _rankings_of(s, "again") == {}  # not ranked by the erased state's value
    monkeypatch.setattr(s.scores, "read", real_read)
    await s.score_users(champion.loaded, ["again"], CUTOFF, trigger="events")
    [again] = await real_read(["again"])
    assert again is not None and again["ref_last_ms"].split("@")[0] == str(CUTOFF * MS_PER_DAY)
    assert set(await _rankings_of(s, "again")) == {None, again["segment"]}


@pytest.mark.integration
async def test_a_score_of_a_state_changed_meanwhile_is_not_written_nor_ranked(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # A sweep a year on would move the user to another segment, but an event lands between its
    # read and its write: the score, answer and rankings stay as they were, and the scoring
    # of the new state leaves the user on its own segment's ranking only.
    s, champion = scorer
    await apply(s.features, purchases("u", [CUTOFF - 30, CUTOFF]))
    await s.score_users(champion.loaded, ["u"], CUTOFF, trigger="events")
    [before] = await s.scores.read(["u"])
    ranked_before = await _rankings_of(s, "u")
    later = CUTOFF + 400
    real_read = s.scores.read

    async def read(users):  # type: ignore[no-untyped-def]
        old = await real_read(users)
        await apply(s.features, [_ev("n1", "refund", "u", "r1", 100, later * MS_PER_DAY)])
        return old

    monkeypatch.setattr(s.scores, "read", read)
    assert await s.score_users(champion.loaded, ["u"], later, trigger="sweep") == 0
    assert await real_read(["u"]) == [before]
    assert await _rankings_of(s, "u") == ranked_before
    monkeypatch.setattr(s.scores, "read", real_read)
    assert await s.score_users(champion.loaded, ["u"], later, trigger="events") == 1
    [after] = await real_read(["u"])
    assert after is not None and after["segment"] != before["segment"]  # type: ignore[index]
    assert set(await _rankings_of(s, "u")) == {None, after["segment"]}


@pytest.mark.integration
async def test_a_failure_between_the_scores_and_the_rankings_leaves_no_segment_behind(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # The score moved the user to another segment, then the rankings' write failed (Redis
    # away, a stop): the scoring again from the marks put back leaves the user on the new
    # segment's ranking only, though the stored segment no longer names the old one.
    from redis.exceptions import ConnectionError as RedisConnectionError

    s, champion = scorer
    await apply(s.features, purchases("u", [CUTOFF - 10, CUTOFF - 5]))
    await s.score_users(champion.loaded, ["u"], CUTOFF, trigger="events")
    [first] = await s.scores.read(["u"])
    real_rank = s.scores.rank

    async def rank(rows):  # type: ignore[no-untyped-def]
        raise RedisConnectionError("Redis went away between the two writes")

    monkeypatch.setattr(s.scores, "rank", rank)
    await s.features.mark_changed(["u"])
    with pytest.raises(RedisConnectionError):
        await s.score_changed(champion.loaded, CUTOFF + 400)
    monkeypatch.setattr(s.scores, "rank", real_rank)
    [mid] = await s.scores.read(["u"])
    assert mid is not None and first is not None and mid["segment"] != first["segment"]
    assert await s.score_changed(champion.loaded, CUTOFF + 400) == 1  # the mark put back
    [again] = await s.scores.read(["u"])
    assert again is not None
    assert set(await _rankings_of(s, "u")) == {None, again["segment"]}


@pytest.mark.integration
@pytest.mark.parametrize("chunk", [500, 2])
async def test_a_batch_ranks_each_user_on_its_own_segment_and_the_last_row_wins(
    scorer, monkeypatch, chunk
) -> None:  # type: ignore[no-untyped-def]
    # The rankings of a batch go in one script for each chunk of users: each user of it lands
    # on everyone's ranking and its own segment's, and off every other (wherever an earlier
    # failure left it); a user given twice is ranked by its last row; users outside the batch
    # stay.
    import service.scores

    monkeypatch.setattr(service.scores, "RANK_CHUNK", chunk)
    s, _ = scorer
    a, b, c = SEGMENTS[0], SEGMENTS[1], SEGMENTS[-1]
    for segment in SEGMENTS:  # "stray" left on every ranking, "other" on c's
        await s._redis.zadd(s.scores.top_key(segment), {"stray": 1.0})
    await s._redis.zadd(s.scores.top_key(c), {"other": 9.0})
    await s.scores.rank(
        [
            ("stray", {"clv": "3.5", "segment": a}),
            ("twice", {"clv": "1.0", "segment": a}),
            ("moved", {"clv": "2.0", "segment": b}),
            ("twice", {"clv": "4.0", "segment": b}),
        ]
    )
    assert await _rankings_of(s, "stray") == {None: 3.5, a: 3.5}
    assert await _rankings_of(s, "twice") == {None: 4.0, b: 4.0}
    assert await _rankings_of(s, "moved") == {None: 2.0, b: 2.0}
    assert await _rankings_of(s, "other") == {c: 9.0}
    await s.scores.rank([("moved", {"clv": "0.5", "segment": c})])
    assert await _rankings_of(s, "moved") == {None: 0.5, c: 0.5}
    await s.scores.rank([])  # nothing to rank: no command
    assert await s._redis.zcard(s.scores.top_key()) == 3


def _back_at_the_second_look(features: FeatureStore, user: str):  # type: ignore[no-untyped-def]
    """``features.missing`` as in the race: ``user`` looks erased at the first look, and has
    features again at the next (its first event after an erasure, scored meanwhile)."""
    real, looks = features.missing, []

    async def missing(users):  # type: ignore[no-untyped-def]
        looks.append(list(users))
        gone = await real(users)
        return [*gone, user] if len(looks) == 1 else gone

    return missing


@pytest.mark.integration
async def test_the_rankings_check_takes_rankings_only_and_marks_a_user_back(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # A user found without features by the check and scored again before its removal (a first
    # event after an erasure, another replica) loses the ranking entries only, and is marked
    # changed so that it is scored and ranked again; an entry on a segment's ranking alone goes.
    s, champion = scorer
    await apply(s.features, purchases("back", [CUTOFF]) + purchases("other", [CUTOFF]))
    await s.score_users(champion.loaded, ["back", "other"], CUTOFF, trigger="events")
    await s.features.take_changed(100)
    await s._redis.zadd(s.scores.top_key("at_risk"), {"ghost": 5.0})
    monkeypatch.setattr(s.features, "missing", _back_at_the_second_look(s.features, "back"))
    assert await prune_rankings(s.features, s.scores, 100, asyncio.Event()) == 2
    count, top = await s.scores.top(10)
    assert count == 1 and [u["user_id"] for u in top] == ["other"]
    for segment in (None, *SEGMENTS):
        for user in ("back", "ghost"):
            assert await s._redis.zscore(s.scores.top_key(segment), user) is None
    back, _ = await s.scores.read(["back", "other"])
    assert back is not None
    assert await s._redis.exists(s.scores.answer_key("back"))
    assert await s.features.take_changed(100) == ["back"]


@pytest.mark.integration
async def test_the_check_after_a_write_takes_rankings_only_and_marks_a_user_back(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # The same race at the check after each batch write: the user looked erased, then had
    # features again (scored by another replica meanwhile); its score and answer stay.
    s, champion = scorer
    await apply(s.features, purchases("back", [CUTOFF]))
    monkeypatch.setattr(s.features, "missing", _back_at_the_second_look(s.features, "back"))
    await s.score_users(champion.loaded, ["back"], CUTOFF, trigger="events")
    [back] = await s.scores.read(["back"])
    assert back is not None
    assert await s._redis.exists(s.scores.answer_key("back"))
    assert await s._redis.zscore(s.scores.top_key(), "back") is None
    assert await s.features.take_changed(100) == ["back"]


@pytest.mark.integration
async def test_the_rankings_check_counts_removals_and_ends_the_chunk_it_began(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    s, _ = scorer
    await s._redis.zadd(s.scores.top_key(), {"ghost": 5.0})
    stop = asyncio.Event()

    async def one_chunk(count):  # type: ignore[no-untyped-def]
        yield ["ghost", "ghost"]  # a user twice in a chunk: one removal

    async def missing(users):  # type: ignore[no-untyped-def]
        stop.set()  # a stop during the last chunk: the check still ends it, and says so
        return list(users)

    monkeypatch.setattr(s.scores, "ranked", one_chunk)
    monkeypatch.setattr(s.features, "missing", missing)
    assert await prune_rankings(s.features, s.scores, 100, stop) == 1
    assert await s._redis.zscore(s.scores.top_key(), "ghost") is None


@pytest.mark.integration
async def test_a_small_first_batch_judges_nobody_valuable(scorer) -> None:  # type: ignore[no-untyped-def]
    s, champion = scorer
    await apply(s.features, purchases("first", [CUTOFF - 30 * i for i in range(4)]))
    await s.score_users(champion.loaded, ["first"], CUTOFF, trigger="events")
    [stored] = await s.scores.read(["first"])
    assert stored is not None and stored["ref_valuable"] == "0"


@pytest.mark.integration
async def test_a_sweep_whose_lock_is_taken_over_stops_and_leaves_the_lock(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    s, champion = scorer
    await apply(s.features, [e for u in range(5) for e in purchases(f"u{u}", [CUTOFF])])
    real = s.score_users

    async def taken_over(*args, **kw):  # type: ignore[no-untyped-def]
        n = await real(*args, **kw)
        await s._redis.set(s.scores.lock_key, "another-replica")  # ours expired, another took it
        return n

    monkeypatch.setattr(s, "score_users", taken_over)
    swept = await s.sweep(champion.loaded, CUTOFF, asyncio.Event())
    assert swept == 5  # the batch in hand, then it stopped
    assert await s._redis.get(s.scores.lock_key) == b"another-replica"  # not deleted by us
    assert await s._sweep_due(CUTOFF, champion.loaded.version)  # not recorded as swept
    # with the lock free, a sweep takes it, scores everyone and releases it
    monkeypatch.setattr(s, "score_users", real)
    await s._redis.delete(s.scores.lock_key)
    assert await s.sweep(champion.loaded, CUTOFF, asyncio.Event()) == 5
    assert await s._redis.get(s.scores.lock_key) is None


@pytest.mark.integration
async def test_the_rankings_check_renews_the_sweep_lock_and_stops_when_it_is_lost(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # The check after the batches can outlast the lock's expiry on many ranked users: it
    # renews the lock after each chunk, and a lock taken over meanwhile ends it unrecorded.
    s, champion = scorer
    await apply(s.features, [e for u in range(5) for e in purchases(f"u{u}", [CUTOFF])])
    ttls: list[int] = []

    async def near_expiry(count):  # type: ignore[no-untyped-def]
        for chunk in (["u0", "ghost1"], ["ghost2"]):
            ttls.append(await s._redis.ttl(s.scores.lock_key))
            await s._redis.expire(s.scores.lock_key, 5)  # the lock near its end
            yield chunk

    await s._redis.zadd(s.scores.top_key(), {"ghost1": 1.0, "ghost2": 2.0})
    monkeypatch.setattr(s.scores, "ranked", near_expiry)
    assert await s.sweep(champion.loaded, CUTOFF, asyncio.Event()) == 5
    assert ttls[1] > 5  # renewed after the first chunk
    assert await s._redis.get(s.scores.swept_key) is not None
    assert await s._redis.zcard(s.scores.top_key()) == 5  # the ghosts are gone

    async def taken_over(count):  # type: ignore[no-untyped-def]
        await s._redis.set(s.scores.lock_key, "another-replica")  # ours expired, another took it
        yield ["ghost1"]
        yield ["ghost2"]

    await s._redis.zadd(s.scores.top_key(), {"ghost1": 1.0, "ghost2": 2.0})
    monkeypatch.setattr(s.scores, "ranked", taken_over)
    await s.sweep(champion.loaded, CUTOFF + 1, asyncio.Event())
    assert await s._redis.zscore(s.scores.top_key(), "ghost1") is None  # the chunk in hand
    assert await s._redis.zscore(s.scores.top_key(), "ghost2") == 2.0  # then it stopped
    day_after = s.scores.sweep_mark(CUTOFF + 1, champion.loaded.version, 365)
    assert s._settings.horizon_days == 365
    assert await s._redis.get(s.scores.swept_key) != day_after.encode()  # not recorded as swept
    assert await s._redis.get(s.scores.lock_key) == b"another-replica"  # not deleted by us


@pytest.mark.integration
async def test_a_scorer_ranks_from_the_rankings_old_names_before_it_judges_a_value(
    scorer,
) -> None:  # type: ignore[no-untyped-def]
    # An upgrade from the code up to 1f1e89c, whose rankings had other names: the scorer's
    # start ranks their users under the current names before it scores anyone (a buyer's new
    # reference is judged against them, not against an empty ranking), deletes the old
    # names, and its sweep takes a user erased meanwhile off again.
    s, champion = scorer
    s._settings = s._settings.model_copy(update={"clock": "event"})
    crowd = [f"c{i:03d}" for i in range(150)]
    star = purchases("star", [CUTOFF - 150 + 10 * i for i in range(15)], cents=6000)
    await apply(s.features, [e for u in crowd for e in purchases(u, [CUTOFF - 100])] + star)
    await s.score_users(champion.loaded, [*crowd, "star"], CUTOFF, trigger="sweep")
    for segment in (None, *SEGMENTS):  # as the older code left them
        if await s._redis.exists(s.scores.top_key(segment)):
            await s._redis.rename(s.scores.top_key(segment), s.scores.legacy_top_key(segment))
    await s.features.forget("c000")  # erased by the older code's API, say
    back = _ev("star-back", "purchase", "star", "o-back", 6000, (CUTOFF + 1) * MS_PER_DAY)
    group = s._settings.consumer_group  # whose latest event is the event clock's day
    await s.features.apply([back], group=group, progress={"orders:0": 1}, now_ms=0)
    await s.features.mark_changed(["star"])
    stop = asyncio.Event()
    running = asyncio.create_task(s.run(stop))
    try:
        async with asyncio.timeout(120):  # (a bound, not a measure: the first sweep's end)
            while await s.scores.last_sweep() is None:
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await running
    [stored] = await s.scores.read(["star"])
    assert stored is not None and stored["ref_last_ms"].split("@")[0] == str(
        (CUTOFF + 1) * MS_PER_DAY
    )
    assert stored["ref_valuable"] == "1"  # judged against the 150 others ranked
    assert set(await _rankings_of(s, "star")) == {None, stored["segment"]}
    assert await _rankings_of(s, "c000") == {}
    assert await s._redis.zcard(s.scores.top_key()) == 150
    for segment in (None, *SEGMENTS):
        assert not await s._redis.exists(s.scores.legacy_top_key(segment))


@pytest.mark.integration
async def test_a_scorer_restarted_with_no_sweep_due_adopts_no_erased_user(scorer) -> None:  # type: ignore[no-untyped-def]
    # An erasure by the current code takes the user off the current names only; the old
    # names still hold it. A scorer (re)started when no sweep is due (so no rankings check
    # follows for up to a day) adopts the old names, and takes the erased user off again.
    s, champion = scorer
    await apply(s.features, purchases("u", [CUTOFF]) + purchases("gone", [CUTOFF]))
    for segment in (None, SEGMENTS[0]):  # as the older code left them
        await s._redis.zadd(s.scores.legacy_top_key(segment), {"u": 1.0, "gone": 2.0})
    await s.features.forget("gone")  # DELETE /users/gone, by the current code
    await s.scores.forget("gone")
    day = await now_day(s._settings, s.features)
    mark = s.scores.sweep_mark(day, champion.loaded.version, s._settings.horizon_days)
    await s._redis.set(s.scores.swept_key, mark)  # today's sweep is done: a plain restart
    stop = asyncio.Event()
    running = asyncio.create_task(s.run(stop))
    try:
        async with asyncio.timeout(60):  # (a bound, not a measure: the adoption's end)
            while await s._redis.exists(s.scores.legacy_top_key()):
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await running
    assert await s.scores.last_sweep() == mark  # no sweep ran
    assert await _rankings_of(s, "u") == {None: 1.0, SEGMENTS[0]: 1.0}
    assert await _rankings_of(s, "gone") == {}


@pytest.mark.integration
async def test_an_adoption_cut_short_after_its_script_leaves_no_erased_user_ranked(scorer) -> None:  # type: ignore[no-untyped-def]
    # Redis away (or the scorer killed) between a chunk's adoption and the check of its
    # users: the old names stay, the next adoption finds the erased user ranked already under
    # the current names, and still takes it off.
    from redis.exceptions import ConnectionError as RedisConnectionError

    s, _ = scorer
    await apply(s.features, purchases("u", [CUTOFF]) + purchases("gone", [CUTOFF]))
    for segment in (None, SEGMENTS[0]):
        await s._redis.zadd(s.scores.legacy_top_key(segment), {"u": 1.0, "gone": 2.0})
    await s.features.forget("gone")
    await s.scores.forget("gone")

    async def away(users: list[str]) -> None:
        raise RedisConnectionError("Redis went away after the chunk's adoption")

    with pytest.raises(RedisConnectionError):
        await s.scores.adopt_legacy_rankings(s._settings.score_batch, away)
    assert await s._redis.exists(s.scores.legacy_top_key(SEGMENTS[0]))  # left for the next
    await s.adopt_legacy_rankings()
    assert not await s._redis.exists(s.scores.legacy_top_key(SEGMENTS[0]))
    assert await _rankings_of(s, "gone") == {}
    assert await _rankings_of(s, "u") == {None: 1.0, SEGMENTS[0]: 1.0}


@pytest.mark.integration
async def test_a_sweep_takes_in_what_an_older_replica_ranked_under_the_old_names(scorer) -> None:  # type: ignore[no-untyped-def]
    # A replica of the code up to 1f1e89c still running during a rolling upgrade: each sweep
    # moves what it ranked to the current names and deletes the old ones; a user erased
    # since (no features) is taken off again by the sweep's rankings check.
    s, champion = scorer
    await apply(s.features, purchases("u", [CUTOFF]))
    for segment in (None, SEGMENTS[0]):
        await s._redis.zadd(s.scores.legacy_top_key(segment), {"u": 1.0, "gone": 2.0})
    assert await s.sweep(champion.loaded, CUTOFF, asyncio.Event()) == 1
    assert await _rankings_of(s, "gone") == {}
    for segment in (None, *SEGMENTS):
        assert not await s._redis.exists(s.scores.legacy_top_key(segment))


@pytest.mark.integration
async def test_a_scorer_on_another_clock_than_the_scores_is_refused(scorer) -> None:  # type: ignore[no-untyped-def]
    from clv.errors import ClvError

    s, _ = scorer
    await s.check_clock()  # the first records its clock (wall)
    await s.check_clock()  # and the same clock goes on
    other = Scorer(
        s._settings.model_copy(update={"clock": "event"}), s._redis, s._champion, s._producer
    )
    with pytest.raises(ClvError, match=r"follow CLV_CLOCK=wall .* this one has CLV_CLOCK=event"):
        await other.check_clock()


@pytest.mark.integration
async def test_a_redis_away_at_the_clock_check_is_waited_out(scorer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from redis.exceptions import ConnectionError as RedisConnectionError

    import service.scorer

    s, _ = scorer
    real = s.check_clock
    calls: list[str] = []

    async def check() -> None:
        calls.append("check")
        if len(calls) == 1:
            raise RedisConnectionError("Redis not there yet")
        await real()

    stop = asyncio.Event()

    async def rest(stop_, seconds):  # type: ignore[no-untyped-def]
        calls.append("rest")
        if calls.count("rest") >= 2:
            stop.set()

    monkeypatch.setattr(s, "check_clock", check)
    monkeypatch.setattr(service.scorer, "_rest", rest)
    await asyncio.wait_for(s.run(stop), 60)  # not ended by the ConnectionError
    assert calls[:3] == ["check", "rest", "check"]


@pytest.mark.integration
async def test_the_api_answers_with_the_scorers_score_only_while_it_is_current(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # The stored answer equals the one scored at the request, and a new event, another day or
    # another champion is scored at the request until the scorer has caught up.
    import service.scores

    s, champion = scorer
    store, scores = s.features, s.scores
    users = ["regular", "heavy", "once"]
    await apply(
        store,
        purchases("regular", [CUTOFF - 200 + 30 * i for i in range(5)])
        + purchases("heavy", [CUTOFF - 150 + 10 * i for i in range(15)], cents=6000)
        + purchases("once", [CUTOFF - 100]),
    )
    day = {"as_of": "1997-09-30"}

    async def answers(api) -> dict[str, dict[str, object]]:  # type: ignore[no-untyped-def]
        got = {u: await api.get(f"/users/{u}/clv", params=day) for u in users}
        assert all(r.status_code == 200 for r in got.values()), [r.text for r in got.values()]
        return {u: r.json() for u, r in got.items()}

    def source(bodies: dict[str, dict[str, object]]) -> set[object]:
        return {b["score_source"] for b in bodies.values()}

    async with serving(s._settings) as api:
        live = await answers(api)  # nothing stored yet
        assert source(live) == {"request"}
        assert await s.sweep(champion.loaded, CUTOFF, asyncio.Event()) == 3
        stored = await answers(api)
        assert source(stored) == {"stored"}
        for u in users:  # the same answer, but for when and how it was scored
            for k in ("scored_at", "score_source"):
                stored[u].pop(k), live[u].pop(k)
            assert stored[u] == live[u]
        assert stored["heavy"]["explanation"] and stored["heavy"]["clv"] > 0

        # another day: not what was stored
        later = await api.get("/users/heavy/clv", params={"as_of": "1997-10-01"})
        assert later.json()["score_source"] == "request"
        # a stored answer in another layout (another version's scorer), or no JSON at all, or
        # of other code (the same layout): not answered from
        good = await s._redis.get(scores.answer_key("heavy"))
        for other in (b'["other", 1]', b"\x00\x01", b""):
            await s._redis.set(scores.answer_key("heavy"), other)
            got = await api.get("/users/heavy/clv", params=day)
            assert got.status_code == 200 and got.json()["score_source"] == "request"
            assert got.json()["clv"] == stored["heavy"]["clv"]
        await s._redis.set(scores.answer_key("heavy"), good)
        monkeypatch.setattr(service.scores, "CODE_TAG", "other code")
        assert (await api.get("/users/heavy/clv", params=day)).json()["score_source"] == "request"
        assert await s._sweep_due(CUTOFF, champion.loaded.version)  # a deploy sweeps again
        monkeypatch.undo()
        assert (await api.get("/users/heavy/clv", params=day)).json()["score_source"] == "stored"
        assert not await s._sweep_due(CUTOFF, champion.loaded.version)

        # another horizon: an API over 30 days does not answer the scorer's 365-day scores,
        # and a scorer over 30 days sweeps again
        short = s._settings.model_copy(update={"horizon_days": 30, "api_port": free_port()})
        async with serving(short) as short_api:
            got = (await short_api.get("/users/heavy/clv", params=day)).json()
        assert got["score_source"] == "request" and got["horizon_days"] == 30
        assert got["clv"] < stored["heavy"]["clv"]
        short_scorer = Scorer(short, s._redis, champion, s._producer)
        assert await short_scorer._sweep_due(CUTOFF, champion.loaded.version)
        short_scorer.close()

        # a new event applied, not yet scored: the request scores the new features
        back = _ev("regular-back", "purchase", "regular", "o-back", 9900, CUTOFF * MS_PER_DAY)
        await apply(store, [back])
        await store.mark_changed(["regular"])
        fresh = (await api.get("/users/regular/clv", params=day)).json()
        assert fresh["score_source"] == "request"
        assert fresh["features"]["orders_total"] == 6 and fresh["clv"] != live["regular"]["clv"]
        assert await s.score_changed(champion.loaded, CUTOFF) == 1
        caught_up = (await api.get("/users/regular/clv", params=day)).json()
        assert caught_up["score_source"] == "stored"
        assert {k: v for k, v in caught_up.items() if k not in ("scored_at", "score_source")} == {
            k: v for k, v in fresh.items() if k not in ("scored_at", "score_source")
        }

        # a new champion: scored at the request until the scorer has scored with it
        version = register(s._settings.model_dir, HistoricalRate())
        assert (await api.post("/admin/reload")).json()["model_version"] == version
        renewed = await answers(api)
        assert source(renewed) == {"request"}
        assert {b["model_version"] for b in renewed.values()} == {version}

        # erased: the stored score goes with the features
        assert (await api.delete("/users/once")).status_code == 204
        assert await scores.read(["once"]) == [None]
        assert not await s._redis.exists(scores.answer_key("once"))
        assert (await api.get("/users/once/clv", params=day)).status_code == 404


def _failing_on(*bad: str):  # type: ignore[no-untyped-def]
    """explain_many as the model would run it, failing every call that holds one of ``bad``
    (a forecast that is not a number), and the calls it was asked for."""
    import service.scorer
    from clv.errors import ModelError

    real, calls = service.scorer.explain_many, []

    def explain(loaded, features, horizon):  # type: ignore[no-untyped-def]
        calls.append(len(features))
        if set(bad) & set(features.index):
            raise ModelError(f"predicted_value is not finite for 1 of {len(features)} customers")
        return real(loaded, features, horizon)

    return explain, calls


SIX = ("a", "b", "c", "d", "e", "f")


@pytest.mark.integration
@pytest.mark.parametrize("trigger", ["events", "sweep"])
async def test_a_user_the_model_cannot_score_costs_only_that_users_score(
    scorer, monkeypatch, trigger
) -> None:  # type: ignore[no-untyped-def]
    # Fails if one failing user drops its batch: every batch-mate went unscored, their change
    # marks were lost, and the sweep was recorded done all the same.
    import service.scorer

    s, champion = scorer
    # histories of their own, so that a row read for another user shows (its last order, the
    # state's header that the write compares)
    last = {u: CUTOFF - 2 * i for i, u in enumerate(SIX)}
    await apply(s.features, [e for u in SIX for e in purchases(u, [last[u] - 30, last[u]])])
    explain, calls = _failing_on("c")
    monkeypatch.setattr(service.scorer, "explain_many", explain)
    if trigger == "events":
        await s.features.mark_changed(list(SIX))
        assert await s.score_changed(champion.loaded, CUTOFF) == 6
    else:
        assert await s.sweep(champion.loaded, CUTOFF, asyncio.Event()) == 5
        assert not await s._sweep_due(CUTOFF, champion.loaded.version)
    stored = dict(zip(SIX, await s.scores.read(list(SIX)), strict=True))
    assert {u for u, v in stored.items() if v is not None} == set(SIX) - {"c"}
    for u in set(SIX) - {"c"}:  # each from its own row
        assert stored[u]["ref_last_ms"].split("@")[0] == str(last[u] * MS_PER_DAY), u
    count, top = await s.scores.top(10)
    assert count == 5 and {u["user_id"] for u in top} == set(SIX) - {"c"}
    # split in halves until the failure was one user's: 6, 3 + 3, and at most two more levels
    # down the failing half (sorted ids, as the changed users come: [6, 3, 1, 2, 1, 1, 3]);
    # not one call per user (11)
    assert calls[0] == 6 and len(calls) <= 7 and calls.count(1) <= 3
    if trigger == "events":
        assert calls == [6, 3, 1, 2, 1, 1, 3]
    # the failing user is not marked again (it would fail every round); a new event or the
    # next sweep tries it again
    assert await s.features.take_changed(100) == []
    monkeypatch.undo()
    await s.features.mark_changed(["c"])
    assert await s.score_changed(champion.loaded, CUTOFF) == 1
    assert (await s.scores.read(["c"]))[0] is not None


@pytest.mark.integration
async def test_a_batch_the_model_cannot_score_at_all_stores_nothing_in_few_calls(
    scorer, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # Fails if the splitting has no bound: a model that fails on everyone was called twice a
    # user (11 calls for 6, 3,999 for a batch of 2,000) every round (review).
    import service.scorer

    s, champion = scorer
    await apply(s.features, [e for u in SIX for e in purchases(u, [CUTOFF])])
    explain, calls = _failing_on(*SIX)
    monkeypatch.setattr(service.scorer, "explain_many", explain)
    monkeypatch.setattr(service.scorer, "MAX_SPLIT_CALLS", 4)
    assert await s.score_users(champion.loaded, list(SIX), CUTOFF, trigger="events") == 0
    # 6 fails, leaving 3 calls: one each for the halves, each then failing as a whole
    assert calls == [6, 3, 3]

    # never more calls than allowed (review: 71 for 2,000 users the model fails on); one
    # failing user of 2,000 costs 1 + 2 x 11 levels
    def stand_in(bad: set[str]):  # type: ignore[no-untyped-def]
        def explain(loaded, features, horizon):  # type: ignore[no-untyped-def]
            calls.append(len(features))
            if bad & set(features.index):
                raise ValueError("not finite")
            return pd.DataFrame(index=features.index), [[] for _ in features.index]

        return explain

    users = [f"u{i}" for i in range(2000)]
    frame = pd.DataFrame(index=pd.Index(users))
    for allowed, bad, n_calls, n_failed in (
        (64, set(users), None, 2000),
        (64, set(users[::50]), None, None),
        (64, {"u1234"}, 23, 1),
        (8, {"u1234"}, None, None),
    ):
        calls.clear()
        monkeypatch.setattr(service.scorer, "MAX_SPLIT_CALLS", allowed)
        monkeypatch.setattr(service.scorer, "explain_many", stand_in(bad))
        parts, _, failed = await s._explain(champion.loaded, frame, 365)
        assert 1 < len(calls) <= allowed, (allowed, len(bad), len(calls))
        assert n_calls is None or len(calls) == n_calls
        assert bad <= {u for u, _ in failed}
        assert n_failed is None or len(failed) == n_failed
        assert sum(len(p) for p in parts) + len(failed) == 2000  # every user accounted for
    assert await s.scores.read(list(SIX)) == [None] * 6
    assert await s.scores.top(10) == (0, [])


async def _four_scored(s, champion, monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    """The four customers of the alert tests, scored as of the cutoff (no alert yet)."""
    import service.scorer

    monkeypatch.setattr(service.scorer, "MIN_RANKED", 2)  # four customers judge the valuable
    await apply(
        s.features,
        purchases("regular", [CUTOFF - 200 + 30 * i for i in range(5)])
        + purchases("heavy", [CUTOFF - 150 + 10 * i for i in range(15)], cents=6000)
        + purchases("once-a", [CUTOFF - 100])
        + purchases("once-b", [CUTOFF - 5]),
    )
    users = ["regular", "heavy", "once-a", "once-b"]
    await s.score_users(champion.loaded, users, CUTOFF, trigger="events")
    assert await read_topic(s._settings, s._settings.alerts_topic) == []
    return users


@pytest.mark.integration
async def test_a_new_horizon_starts_new_references_and_alerts_nobody(scorer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Fails if the references outlive a change of CLV_HORIZON_DAYS: a shorter horizon lowers
    # every value at once, and every valuable customer was alerted of a drop.
    s, champion = scorer
    users = await _four_scored(s, champion, monkeypatch)
    before = dict(zip(users, await s.scores.read(users), strict=True))
    short = Scorer(
        s._settings.model_copy(update={"horizon_days": 90}), s._redis, champion, s._producer
    )
    try:
        assert await short._sweep_due(CUTOFF, champion.loaded.version)
        await short.score_users(champion.loaded, users, CUTOFF, trigger="sweep")
        after = dict(zip(users, await s.scores.read(users), strict=True))
        assert float(after["heavy"]["clv"]) < 0.7 * float(before["heavy"]["clv"])  # a "drop"
        assert await read_topic(s._settings, s._settings.alerts_topic) == []
        for u in users:
            assert after[u]["ref_clv"] == after[u]["clv"]
            assert after[u]["ref_last_ms"].endswith(
                "@" + reference_basis(champion.loaded.version, 90)
            )
        # on the new basis a drop alerts as before: a year without an order
        await short.score_users(champion.loaded, users, CUTOFF + 365, trigger="sweep")
    finally:
        short.close()
    alerts = [json.loads(r.value) for r in await read_topic(s._settings, s._settings.alerts_topic)]
    assert "heavy" in {a["user_id"] for a in alerts}


@pytest.mark.integration
@pytest.mark.parametrize("back", [False, True], ids=["erased", "erased and begun again"])
async def test_no_alert_is_published_for_a_user_erased_while_the_batch_is_in_hand(
    scorer, monkeypatch, back
) -> None:  # type: ignore[no-untyped-def]
    # Fails if the alerts go out as decided: DELETE /users/heavy had answered 204 before the
    # scorer published a clv_drop naming the user; or if only the user's existence is checked,
    # as a new event after the erasure begins the user again (review).
    s, champion = scorer
    users = await _four_scored(s, champion, monkeypatch)
    real_read = s.scores.read

    async def read(ids):  # type: ignore[no-untyped-def]
        old = await real_read(ids)
        await s.features.forget("heavy")  # what DELETE /users/heavy does, done here
        await s.scores.forget("heavy")
        if back:  # and a first event of the user again, applied by a consumer
            again = _ev("new-1", "purchase", "heavy", "new-o1", 100, (CUTOFF + 364) * MS_PER_DAY)
            await apply(s.features, [again])
        return old

    monkeypatch.setattr(s.scores, "read", read)
    await s.score_users(champion.loaded, users, CUTOFF + 365, trigger="sweep")
    alerts = [json.loads(r.value) for r in await read_topic(s._settings, s._settings.alerts_topic)]
    assert alerts and "heavy" not in {a["user_id"] for a in alerts}  # the others' still go
    assert await real_read(["heavy"]) == [None]


class _Scaled:
    """A model whose values are another's times ``k``: a new champion on another scale."""

    def __init__(self, inner, k: float) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.k = inner, k

    def predict(self, features: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        out = self.inner.predict(features, horizon_days).copy()
        out["predicted_value"] *= self.k
        return out


async def _customers(s, n: int = 300, prefix: str = "u", seed: int = 11) -> list[str]:  # type: ignore[no-untyped-def]
    """``n`` customers with 1-8 purchases in the 250 days before the cutoff."""
    rng = np.random.default_rng(seed)
    users = [f"{prefix}{i:03d}" for i in range(n)]
    events = []
    for u in users:
        days = sorted(rng.choice(np.arange(CUTOFF - 250, CUTOFF), rng.integers(1, 9), False))
        events += purchases(u, [int(d) for d in days], cents=int(rng.integers(1000, 20000)))
    await apply(s.features, events)
    return users


async def _lapse_a_year(s, users: list[str], model: LoadedModel) -> tuple[set[str], set[str]]:  # type: ignore[no-untyped-def]
    """Sweep with ``model`` a year after the cutoff, with no purchase meanwhile: the users
    alerted, and those who should be (valuable at the cutoff among ``model``'s own values, as
    the ranking reads them, then down by the drop percentage)."""
    stored = await s.scores.read(users)
    at_cutoff = {u: float(r["clv"]) for u, r in zip(users, stored, strict=True) if r}
    ranked = sorted(at_cutoff.values(), reverse=True)
    bar = ranked[int(len(ranked) * s._settings.alert_top_share) - 1]
    await s.sweep(model, CUTOFF + 365, asyncio.Event())
    now = {u: float(r["clv"]) for u, r in zip(users, await s.scores.read(users), strict=True) if r}
    expected = {
        u for u, v in at_cutoff.items() if v >= bar and v > 0 and (v - now[u]) / v * 100 >= 30
    }
    alerts = [json.loads(r.value) for r in await read_topic(s._settings, s._settings.alerts_topic)]
    assert len(users) * s._settings.alert_top_share / 2 <= len(expected) < len(users) * 0.6
    return {a["user_id"] for a in alerts}, expected


@pytest.mark.integration
@pytest.mark.parametrize("k", [3.0, 1 / 3])
async def test_after_a_new_champion_valuable_is_judged_among_its_own_values(scorer, k) -> None:  # type: ignore[no-untyped-def]
    # Fails if (scorer.py) the references a new champion's first sweep sets are judged against
    # the ranking it is replacing: the old model's values. A champion valuing everyone three
    # times higher then made nearly every customer "valuable" (alerts for all who lapse); one
    # valuing them at a third, nobody (no alert at all).
    s, champion = scorer
    users = await _customers(s)
    stop = asyncio.Event()
    await s.sweep(champion.loaded, CUTOFF, stop)  # the old champion's ranking
    old = champion.loaded
    new = LoadedModel(old.version + "-x" + str(k), _Scaled(old.model, k), old.metadata)
    await s.sweep(new, CUTOFF, stop)  # the new champion's first sweep
    stored = await s.scores.read(users)
    assert {r["ref_valuable"] for r in stored if r} == {"?"}
    alerted, expected = await _lapse_a_year(s, users, new)
    assert alerted == expected


def _and_thrice(model: LoadedModel) -> tuple[LoadedModel, LoadedModel]:
    """``model``, and another valuing everyone three times as high."""
    return model, LoadedModel(model.version + "-x3", _Scaled(model.model, 3.0), model.metadata)


@pytest.fixture
async def swept(scorer):  # type: ignore[no-untyped-def]
    """The scorer, 300 customers swept as of the cutoff by the champion, it, and a model
    valuing everyone three times as high."""
    s, champion = scorer
    users = await _customers(s)
    restored, other = _and_thrice(champion.loaded)
    await s.sweep(restored, CUTOFF, asyncio.Event())
    return s, users, restored, other


async def _sweep_with(s, model: LoadedModel, day: int, meanwhile) -> None:  # type: ignore[no-untyped-def]
    """Sweep with ``model`` as of ``day``, running ``meanwhile()`` once after its first
    batch (the users it has passed), as another replica would; then check that values of a
    model other than ``model`` are ranked and a sweep is due."""
    real_changed, done = s.score_changed, []

    async def changed(loaded, d):  # type: ignore[no-untyped-def]
        if not done:
            done.append(1)
            await meanwhile()
        return await real_changed(loaded, d)

    s.score_changed = changed
    try:
        await s.sweep(model, day, asyncio.Event())
    finally:
        s.score_changed = real_changed
    assert done and await _ranked_versions(s) - {model.version}
    assert not (await s.scores.sweep_record()).vouches_for(
        reference_basis(model.version, s._settings.horizon_days)
    )
    assert await s._sweep_due(day, model.version)


async def _ranked_versions(s) -> set[str]:  # type: ignore[no-untyped-def]
    _, top = await s.scores.top(100_000)
    return {u["model_version"] for u in top}


@pytest.mark.integration
async def test_another_models_values_ranked_during_a_sweep_keep_the_sweep_due(
    swept,  # type: ignore[no-untyped-def]
) -> None:
    # Two replicas: one (model R) runs the day's sweep; the other, on O for a while (promoted,
    # then rolled back), ranks O's values of users the sweep has passed. Fails if (scorer.py,
    # scores.py) the sweep's end records it clean whatever was ranked meanwhile: R then finds
    # no sweep due and judges new references at once against a ranking holding O's values.
    # Also with the record already mixed when the sweep starts (O's trace left before it).
    s, users, restored, other = swept
    stop = asyncio.Event()
    for day, before in ((CUTOFF + 1, False), (CUTOFF + 2, True)):
        if before:  # the other replica's trace is left before the sweep starts
            await s.score_users(other, users[1::2], day, trigger="events")
        await _sweep_with(
            s, restored, day, lambda d=day: s.score_users(other, users[::2], d, trigger="events")
        )
        await s.score_users(restored, users[::2], day, trigger="events")
        assert {r["ref_valuable"] for r in await s.scores.read(users[::2]) if r} == {"?"}
        await s.sweep(restored, day, stop)  # nothing else ranked meanwhile: recorded clean
        assert await _ranked_versions(s) == {restored.version}
        assert not await s._sweep_due(day, restored.version)


@pytest.mark.integration
async def test_a_batch_of_another_model_in_flight_when_a_sweep_starts_keeps_it_due(
    swept,  # type: ignore[no-untyped-def]
) -> None:
    # A replica on the other model has checked the record (its trace left, or found there)
    # and stalls before its write; the sweep starts, keeping only its own trace, passes the
    # users, and then the batch writes the other model's values over them. Fails if
    # (scorer.py) the trace is checked before the write only: the sweep is recorded clean.
    s, users, restored, other = swept
    day = CUTOFF + 1
    lagging = Scorer(s._settings, s._redis, s._champion, s._producer)
    real_write = lagging.scores.write
    go, at_write = asyncio.Event(), asyncio.Event()

    async def stalled_write(*a, **kw):  # type: ignore[no-untyped-def]
        at_write.set()
        await go.wait()
        return await real_write(*a, **kw)

    lagging.scores.write = stalled_write  # type: ignore[method-assign]
    batch = asyncio.create_task(lagging.score_users(other, users[::2], day, trigger="events"))
    await at_write.wait()

    async def it_writes() -> None:
        go.set()
        await batch

    await _sweep_with(s, restored, day, it_writes)
    lagging.close()
    await s.sweep(restored, day, asyncio.Event())
    assert not await s._sweep_due(day, restored.version)


@pytest.mark.integration
async def test_another_models_values_ranked_during_the_first_sweep_ever_keep_a_sweep_due(
    scorer,  # type: ignore[no-untyped-def]
) -> None:
    # No record yet (a new deployment, or the key deleted). Fails if (scores.py) a missing
    # record vouches for every model during the first sweep too: another model's values
    # ranked during it leave no trace and the sweep is recorded clean.
    s, champion = scorer
    users = await _customers(s)
    restored, other = _and_thrice(champion.loaded)
    assert await s.scores.last_sweep() is None
    await _sweep_with(
        s, restored, CUTOFF, lambda: s.score_users(other, users[::2], CUTOFF, trigger="events")
    )
    await s.sweep(restored, CUTOFF, asyncio.Event())
    assert not await s._sweep_due(CUTOFF, restored.version)


@pytest.mark.integration
async def test_another_models_values_ranked_while_a_batch_reads_the_ranking_are_seen(
    swept,  # type: ignore[no-untyped-def]
) -> None:
    # Another replica (a new champion) ranks its values between this batch's read of the
    # sweep record and its read of the ranking. Fails if (scorer.py) the record is read only
    # before the ranking: the batch's new references are judged at once against a ranking
    # holding the other model's values.
    s, users, restored, other = swept
    fresh = await _customers(s, 40, "n", seed=3)
    replica = Scorer(s._settings, s._redis, s._champion, s._producer)
    real_read, done = s.scores.value_at_share, []

    async def value_at_share(share):  # type: ignore[no-untyped-def]
        if not done:
            done.append(1)
            await replica.score_users(other, users[::2], CUTOFF, trigger="events")
        return await real_read(share)

    s.scores.value_at_share = value_at_share
    try:
        await s.score_users(restored, fresh, CUTOFF, trigger="events")
    finally:
        s.scores.value_at_share = real_read
        replica.close()
    assert done and {r["ref_valuable"] for r in await s.scores.read(fresh) if r} == {"?"}


@pytest.mark.integration
async def test_another_models_values_leave_a_trace_however_few_are_ranked(
    scorer,  # type: ignore[no-untyped-def]
) -> None:
    # 80 customers swept by R (fewer than MIN_RANKED), then O scores 30 more: 110 ranked, 30
    # of them O's. Fails if (scorer.py) only a ranking large enough to judge by is checked:
    # after O is rolled back the same day, R finds no sweep due.
    s, champion = scorer
    stop = asyncio.Event()
    restored, other = _and_thrice(champion.loaded)
    await _customers(s, 80, "a")
    await s.sweep(restored, CUTOFF, stop)
    late = await _customers(s, 30, "b", seed=5)
    await s.score_users(other, late, CUTOFF, trigger="events")  # then rolled back
    assert (await s.scores.top(1))[0] == 110
    assert await s._sweep_due(CUTOFF, restored.version)
    await s.sweep(restored, CUTOFF, stop)
    assert not await s._sweep_due(CUTOFF, restored.version)


@pytest.mark.integration
async def test_a_rollback_the_same_day_sweeps_again_and_judges_among_one_models_values(
    swept,  # type: ignore[no-untyped-def]
) -> None:
    # A new champion scores some customers (their events, or the start of its sweep) and is
    # rolled back the same day: the ranking then holds values of both models, although the
    # last sweep was the restored model's. Fails if (scorer.py, scores.py) that day's sweep
    # mark alone says whether a sweep is due and the ranking is current: no sweep runs
    # again, the references the other model set are replaced only a year later at the lapsed
    # values (no alert for any of them), and those set meanwhile are judged against a ranking
    # inflated by the other model's values.
    s, users, restored, other = swept
    stop = asyncio.Event()
    await s.score_users(other, users[::2], CUTOFF, trigger="events")  # then rolled back
    assert await s._sweep_due(CUTOFF, restored.version)
    await s.score_users(restored, users[::4], CUTOFF, trigger="events")  # before the sweep
    stored = await s.scores.read(users[::4])
    assert {r["ref_valuable"] for r in stored if r} == {"?"}  # new references, not judged yet
    await s.sweep(restored, CUTOFF, stop)
    assert not await s._sweep_due(CUTOFF, restored.version)
    stored = await s.scores.read(users[::2])
    assert {r["ref_valuable"] for r in stored if r} == {"?"}  # judged after the sweep
    alerted, expected = await _lapse_a_year(s, users, restored)
    assert alerted == expected
