"""One user's score and its explanation; requests scored together give what each alone gives."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import service.scoring as scoring
from feature_store.features import day_number
from feature_store.offline import features_at
from service.scoring import Batcher, churn_risk, score, score_each, segments
from tests.service.conftest import DATA
from training.datasets import load_orders
from training.registry import LoadedModel, load_champion


@pytest.fixture(scope="module")
def features() -> pd.DataFrame:
    events = load_orders(DATA / "CDNOW_sample.txt.gz", "cdnow")
    return features_at(events, day_number(dt.date(1997, 12, 31)))


@pytest.fixture
def champion(fitted_registry: tuple[Path, str]) -> LoadedModel:
    return load_champion(fitted_registry[0])


def test_churn_risk_is_the_chance_of_no_purchase_in_the_horizon() -> None:
    risk = churn_risk(np.array([0.0, 2.0, 0.5, 3.0]), np.array([0.0, 1.0, 0.5, 1e-9]))
    # no p_alive: certain; alive with 2 expected: e^-2; half alive: 0.5 + 0.5 e^-1
    assert risk == pytest.approx([1.0, np.exp(-2), 0.5 + 0.5 * np.exp(-1), 1.0], abs=1e-9)


def test_segments_follow_purchases_age_and_risk() -> None:
    f = pd.DataFrame(
        {
            "purchase_days": [0, 1, 1, 3, 3, 3],
            "frequency": [0, 0, 0, 2, 2, 2],
            "age_days": [5, 10, 40, 100, 100, 100],
        }
    )
    risk = np.array([1.0, 0.95, 0.95, 0.95, 0.7, 0.2])
    assert list(segments(f, risk)) == ["prospect", "new", "lost", "lost", "at_risk", "active"]


def test_the_segment_is_the_one_of_the_risk_shown() -> None:
    # Fails if (service/scoring.py) the segment is taken from the unrounded risk: a risk just
    # under 0.6 (0.9) was shown as 0.6 (0.9) with the segment "active" ("at_risk"), which the
    # rule applied to the number served contradicts.
    from types import SimpleNamespace

    from service.scoring import AT_RISK, LOST_RISK, score_many

    under = np.array([AT_RISK, LOST_RISK]) - 4e-5
    model = SimpleNamespace(
        predict=lambda f, h: pd.DataFrame(  # alive, so the risk is exp(-expected orders)
            {"predicted_value": [10.0, 5.0], "expected_orders": -np.log(under), "p_alive": 1.0},
            index=f.index,
        )
    )
    f = pd.DataFrame(
        {"purchase_days": [3, 3], "frequency": [2, 2], "age_days": [100, 100]}, index=["a", "b"]
    )
    out = score_many(SimpleNamespace(model=model), f, 365)  # type: ignore[arg-type]
    assert list(out["churn_risk"]) == [AT_RISK, LOST_RISK]
    assert list(out["segment"]) == ["at_risk", "lost"]


def test_requests_scored_together_get_what_each_gets_alone(
    champion: LoadedModel, features: pd.DataFrame
) -> None:
    users = [features.iloc[[i]] for i in (0, 3, 17, 40, 41)]
    together = score_each(champion, users, 365)
    alone = [score(champion, u, 365) for u in users]
    assert together == alone
    assert any(s.explanation for s in alone)


async def test_the_batcher_scores_concurrent_requests_in_fewer_calls_and_passes_failures_on(
    champion: LoadedModel, features: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = [features.iloc[[i]] for i in range(20)]
    alone = [score(champion, u, 365) for u in users]
    calls: list[int] = []
    real = scoring.score_each

    def counted(loaded: LoadedModel, users: list[pd.DataFrame], horizon: int) -> object:
        calls.append(len(users))
        if any(u.index[0] == "boom" for u in users):
            raise ValueError("boom")
        return real(loaded, users, horizon)

    monkeypatch.setattr(scoring, "score_each", counted)
    batcher = Batcher(365)
    try:
        got = await asyncio.gather(*(batcher.score(champion, u) for u in users))
        assert got == alone
        assert len(calls) < 20 and sum(calls) == 20  # scored together, each once
        bad = features.iloc[[0]].rename(index={features.index[0]: "boom"})
        results = await asyncio.gather(
            batcher.score(champion, bad), batcher.score(champion, users[1]), return_exceptions=True
        )
        assert isinstance(results[0], ValueError)  # the failure reaches its request
        assert results[1] == alone[1]  # and only that one: the others are scored alone
        assert await batcher.score(champion, users[2]) == got[2]  # and the worker goes on
    finally:
        await batcher.close()


async def test_scoring_does_not_wait_behind_reads_of_the_event_log(
    champion: LoadedModel, features: pd.DataFrame
) -> None:
    # Fails if scoring shares the default thread pool: with every one of its threads busy
    # (reads of the event log for past dates), a request waited for them all.
    import threading

    loop = asyncio.get_running_loop()
    release = threading.Event()
    pool = loop._default_executor  # type: ignore[attr-defined]
    workers = getattr(pool, "_max_workers", None) or 32
    blocked = [asyncio.to_thread(release.wait) for _ in range(workers)]
    tasks = [asyncio.ensure_future(b) for b in blocked]
    batcher = Batcher(365)
    try:
        got = await asyncio.wait_for(batcher.score(champion, features.iloc[[0]]), 30)
        assert got == score(champion, features.iloc[[0]], 365)
    finally:
        release.set()
        await asyncio.gather(*tasks)
        await batcher.close()


def test_each_effect_is_the_value_less_the_models_value_with_that_factor_changed(
    champion: LoadedModel, features: pd.DataFrame
) -> None:
    # Computed here row by row with the model itself, against the column-wise batch.
    repeat = features[
        (features["frequency"] > 2) & (features["age_days"] > features["recency_days"])
    ]
    users = [repeat.iloc[[i]] for i in range(3)] + [features[features["frequency"] == 0].iloc[[0]]]
    got = score_each(champion, users, 365)
    for user, s in zip(users, got, strict=True):
        value = champion.model.predict(user, 365)["predicted_value"].iloc[0]
        as_of_last = user.copy()
        as_of_last["age_days"] = user["recency_days"]
        once = user.copy()
        once[["frequency", "purchase_days", "recency_days"]] = [0, 1, 0]
        once["avg_repeat_value"] = 0.0
        expect = {
            "days_since_last_order": value
            - champion.model.predict(as_of_last, 365)["predicted_value"].iloc[0],
            "repeat_purchase_days": value
            - champion.model.predict(once, 365)["predicted_value"].iloc[0],
        }
        row = user.iloc[0]
        if row["frequency"] == 0:
            del expect["repeat_purchase_days"]
        effects = {e["factor"]: e["effect"] for e in s.explanation}
        assert effects.keys() == expect.keys()
        for name, effect in effects.items():
            assert effect == pytest.approx(expect[name], abs=0.011)  # both rounded to cents
        assert abs(s.explanation[0]["effect"]) >= abs(s.explanation[-1]["effect"])


async def test_a_closed_batcher_answers_every_waiting_request_and_refuses_new_ones(
    champion: LoadedModel, features: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from service.scoring import Stopping

    release = threading.Event()
    real = scoring.score_each

    def slow(loaded: LoadedModel, users: list[pd.DataFrame], horizon: int) -> object:
        release.wait(30)
        return real(loaded, users, horizon)

    monkeypatch.setattr(scoring, "score_each", slow)
    batcher = Batcher(365)
    first = asyncio.ensure_future(batcher.score(champion, features.iloc[[0]]))
    await asyncio.sleep(0.1)  # the first is in hand (its call blocked)
    queued = asyncio.ensure_future(batcher.score(champion, features.iloc[[1]]))
    await asyncio.sleep(0)
    await batcher.close()
    release.set()
    for waiting in (first, queued):
        with pytest.raises(Stopping):
            await asyncio.wait_for(waiting, 10)
    with pytest.raises(Stopping):
        await batcher.score(champion, features.iloc[[2]])


def test_the_code_tag_moves_with_the_code_not_with_its_comments_or_layout() -> None:
    # Fails if (service/scores.py) the code tag hashes the files' text (a comment edit would
    # make every stored answer stale and start new alert references) or misses a value.
    from service.scores import code_digest

    code = '''"""Rules."""
CAP = 0.5  # the cap


def risk(p):
    """Churn risk."""
    return min(CAP, 1 - p)
'''
    same = '''"""Rules, reworded."""

# a new comment
CAP = 0.5


def risk(p):
    return min(CAP,
               1 - p)
'''
    other_value = code.replace("0.5", "0.6")
    other_rule = code.replace("min(", "max(")
    base = code_digest(["('a', 'b')", code])
    assert code_digest(["('a', 'b')", same]) == base
    assert code_digest(["('a', 'b')", other_value]) != base
    assert code_digest(["('a', 'b')", other_rule]) != base
    assert code_digest(["('a', 'c')", code]) != base  # the feature names count too
    assert code_digest([code, "('a', 'b')"]) != base  # as does which file is which


def test_the_code_tag_is_the_codes_on_every_python() -> None:
    # Fails if (service/scores.py) the digest is of a dump of the syntax tree: its fields are
    # the running Python's (3.12 adds type_params, 3.13 leaves out empty ones), so an upgrade,
    # or an API and a scorer on two versions, made every answer stale. This value is what
    # 3.11.7, 3.12.1 and 3.13.0 give (each run by hand on this code).
    from service.scores import code_digest

    code = '''class A:
    """doc"""
    def f(self, x: int = 1, *a, **k) -> int:
        return [y for y in range(x)][0]
async def g():
    pass
'''
    assert code_digest(["('a', 'b')", code]) == "0d1661c0745e"


@pytest.mark.parametrize(
    "path",
    [
        "training/models/btyd.py",  # a model's code
        "training/models/base.py",  # the prediction frame
        "service/scorer.py",  # when a score is new
        "feature_store/features.py",
        "service/scoring.py",
    ],
)
def test_the_code_tag_covers_the_model_classes_and_the_scorer(tmp_path: Path, path: str) -> None:
    # Fails if (service/scores.py) the tag leaves out the code the pickled champion runs (its
    # classes in training/models) or the scorer's rules: a deploy of new model code under the
    # same champion served the old code's stored answers as current and, on the next sweep,
    # took the new values for drops (an alert for every valuable customer).
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]

    def tag(tree: Path) -> str:
        done = subprocess.run(
            [sys.executable, "-c", "import service.scores as s; print(s.CODE_TAG)"],
            cwd=tree,
            env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    trees = []
    for name in ("before", "after"):
        tree = tmp_path / name
        for package in ("clv", "feature_store", "service", "training"):
            shutil.copytree(
                root / package, tree / package, ignore=shutil.ignore_patterns("__pycache__")
            )
        trees.append(tree)
    with (trees[1] / path).open("a", encoding="utf-8") as f:
        f.write("\n\ndef _added():\n    return 2\n")
    comment_only = tmp_path / "comment"
    shutil.copytree(trees[0], comment_only)
    with (comment_only / path).open("a", encoding="utf-8") as f:
        f.write("\n# a comment\n")
    before = tag(trees[0])
    assert tag(comment_only) == before
    assert tag(trees[1]) != before
