"""One user's score from the champion: value over the horizon, churn risk, segment, and why.

Pure functions over a features frame and a loaded model, so the API, a scorer and the tests
share them.

* ``churn_risk`` is the probability of **no purchase in the horizon**. BG/NBD's ``p_alive``
  alone cannot say it: a customer who bought on one day only has ``p_alive`` 1 however long ago
  that was (README, "Models and training"), so ``1 - p_alive`` would call most customers safe.
  The models give ``p_alive`` and the purchases expected, ``E[N] = p_alive * m`` with ``m`` the
  purchases expected of a customer still alive; taking those as Poisson,
  ``P(no purchase) = (1 - p_alive) + p_alive * exp(-m)``. It rises as a customer stays away
  (the expected purchases fall), which is what churn looks like.
* ``segment``: ``prospect`` (no purchase on record, only a refund), ``new`` (one purchase day,
  first purchase less than :data:`NEW_DAYS` ago), then by churn risk: ``lost``
  (:data:`LOST_RISK` or more), ``at_risk`` (:data:`AT_RISK` or more), else ``active``.
* ``explanation``: for each factor, the change in the forecast value had that factor been as
  for a customer who just bought (``days_since_last_order``: scored as of the last purchase day;
  ``repeat_purchase_days``: a one-time buyer), the other features held. Each effect is the
  factor's own counterfactual, so they need not add up to the value.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import numpy as np
import pandas as pd

from clv.errors import ClvError
from training import threads
from training.registry import LoadedModel

T = TypeVar("T")

NEW_DAYS = 30
AT_RISK = 0.6
LOST_RISK = 0.9


@dataclass(frozen=True, slots=True)
class Score:
    clv: float
    expected_orders: float
    p_alive: float
    churn_risk: float
    segment: str
    explanation: list[dict[str, object]]


def churn_risk(expected_orders: np.ndarray, p_alive: np.ndarray) -> np.ndarray:
    """Probability of no purchase within the horizon (see the module docstring)."""
    e = np.asarray(expected_orders, dtype=np.float64)
    p = np.asarray(p_alive, dtype=np.float64)
    alive = p > 0
    m = np.divide(e, p, out=np.zeros_like(e), where=alive)
    risk = np.where(alive, (1 - p) + p * np.exp(-m), 1.0)
    return np.clip(risk, 0.0, 1.0)


def segments(features: pd.DataFrame, risk: np.ndarray) -> np.ndarray:
    """Each user's segment (see the module docstring)."""
    purchase_days = features["purchase_days"].to_numpy()
    new = (features["frequency"].to_numpy() == 0) & (features["age_days"].to_numpy() < NEW_DAYS)
    return np.select(
        [purchase_days <= 0, new, risk >= LOST_RISK, risk >= AT_RISK],
        ["prospect", "new", "lost", "at_risk"],
        "active",
    ).astype(object)


Segment = Literal["prospect", "new", "active", "at_risk", "lost"]
SEGMENTS: tuple[str, ...] = get_args(Segment)


def score_many(loaded: LoadedModel, features: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
    """Every user of ``features``: ``clv``, ``expected_orders``, ``p_alive``, ``churn_risk``
    and ``segment`` (the scorer's batch; no explanation)."""
    pred = loaded.model.predict(features, horizon_days)
    # the segment is the shown risk's: a risk shown as 0.6 is at risk by the rule it is read by
    risk = churn_risk(pred["expected_orders"].to_numpy(), pred["p_alive"].to_numpy()).round(4)
    return pd.DataFrame(
        {
            "clv": pred["predicted_value"].to_numpy().round(2),
            "expected_orders": pred["expected_orders"].to_numpy().round(4),
            "p_alive": pred["p_alive"].to_numpy().round(4),
            "churn_risk": risk,
            "segment": segments(features, risk),
        },
        index=features.index,
    )


def _since_last(f: pd.DataFrame) -> np.ndarray:
    return (f["age_days"] - f["recency_days"]).to_numpy(dtype=np.float64)


#: The explanation's factors: each one's value for a customer, whether it applies, and the
#: features changed to those of a customer who just bought (each column keeps its type).
FACTORS: tuple[tuple[str, Any, Any, Any], ...] = (
    (
        "days_since_last_order",
        _since_last,
        lambda f: (f["purchase_days"].to_numpy() > 0) & (_since_last(f) > 0),
        lambda f: {"age_days": f["recency_days"].to_numpy()},  # as of the last purchase day
    ),
    (
        "repeat_purchase_days",
        lambda f: f["frequency"].to_numpy(dtype=np.float64),
        lambda f: (f["purchase_days"].to_numpy() > 0) & (f["frequency"].to_numpy() > 0),
        lambda f: {"frequency": 0, "purchase_days": 1, "recency_days": 0, "avg_repeat_value": 0.0},
    ),
)


def explain_many(
    loaded: LoadedModel, features: pd.DataFrame, horizon_days: int
) -> tuple[pd.DataFrame, list[list[dict[str, object]]]]:
    """Every user of ``features`` scored (:func:`score_many`) and explained, in one predict
    call: the frame holds every user as they are, then every user once per factor with that
    factor changed (built column-wise: per-user frame edits cost more than the scoring)."""
    n = len(features)
    base = features.reset_index(drop=True)
    blocks = [base]
    for _, _, _, changes in FACTORS:
        block = base.copy()
        for name, value in changes(base).items():
            block[name] = value
        blocks.append(block)
    frame = pd.concat(blocks, ignore_index=True)
    frame.index = pd.Index([f"#{i}" for i in range(len(frame))], name=features.index.name)
    scored = score_many(loaded, frame, horizon_days)
    value = scored["clv"].to_numpy(dtype=np.float64)
    own = scored.iloc[:n].set_axis(features.index)
    factors = [
        (k, name, of(base).tolist(), applies(base))
        for k, (name, of, applies, _) in enumerate(FACTORS)
    ]
    explanations = []
    for i in range(n):
        explanation: list[dict[str, object]] = [
            {
                "factor": name,
                "value": float(v[i]),
                "effect": round(value[i] - value[(k + 1) * n + i], 2),
            }
            for k, name, v, applies in factors
            if applies[i]
        ]
        explanation.sort(key=lambda e: -abs(float(e["effect"])))  # type: ignore[arg-type]
        explanations.append(explanation)
    return own, explanations


def score_each(
    loaded: LoadedModel, users: Sequence[pd.DataFrame], horizon_days: int
) -> list[Score]:
    """Score each of ``users`` (one-row frames of ``compute_features``), with explanations, in
    one predict call (:func:`explain_many`): a call's fixed cost (tens of milliseconds for a
    hybrid model, most of it pandas) is far above a row's, so the API scores the requests in
    hand together."""
    for features in users:
        if len(features) != 1:
            raise ValueError(f"one user's features per frame, not {len(features)} rows")
    scored, explanations = explain_many(loaded, pd.concat(users), horizon_days)
    return [
        Score(
            clv=float(clv),
            expected_orders=float(orders),
            p_alive=float(p),
            churn_risk=float(risk),
            segment=str(segment),
            explanation=explanation,
        )
        for clv, orders, p, risk, segment, explanation in zip(
            scored["clv"].to_numpy(),
            scored["expected_orders"].to_numpy(),
            scored["p_alive"].to_numpy(),
            scored["churn_risk"].to_numpy(),
            scored["segment"].to_numpy(),
            explanations,
            strict=True,
        )
    ]


def score(loaded: LoadedModel, features: pd.DataFrame, horizon_days: int) -> Score:
    """Score the one user of ``features`` (a one-row frame of ``compute_features``), with the
    explanation."""
    [one] = score_each(loaded, [features], horizon_days)
    return one


def scoring_thread(name: str) -> ThreadPoolExecutor:
    """One thread to score in, its numeric pools at one thread each unless the environment
    says otherwise (:mod:`training.threads`: HistGradientBoosting's OpenMP workers spin while
    they wait, at a great cost on cores busy with anything else)."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=name, initializer=threads.one_thread_unless_set
    )


class Batcher:
    """Scores the API's requests together: each waits in a queue, and one worker takes every
    request in hand (up to :data:`MAX_BATCH`) into one :func:`score_each` call in a thread. A
    lone request is scored at once (nothing waits for others to come); under load, requests
    that arrive during a call are scored together by the next one."""

    def __init__(self, horizon_days: int) -> None:
        self._horizon = horizon_days
        self._queue: asyncio.Queue[tuple[LoadedModel, pd.DataFrame, asyncio.Future[Score]]] = (
            asyncio.Queue()
        )
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._in_hand: list[asyncio.Future[Score]] = []
        # A thread of its own: requests for past dates read the event log in the default
        # pool (0.65 s each), and scoring behind them waited 13.8 s instead of 0.04 s.
        self._thread = scoring_thread("clv-score")

    async def score(self, loaded: LoadedModel, features: pd.DataFrame) -> Score:
        if self._closed:
            raise Stopping("the API is shutting down")
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        done: asyncio.Future[Score] = asyncio.get_running_loop().create_future()
        await self._queue.put((loaded, features, done))
        return await done

    async def close(self) -> None:
        """Stop: every request still waiting hears :class:`Stopping` (none waits for good)."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for fut in [*self._in_hand, *(i[2] for i in _drain(self._queue))]:
            if not fut.done():
                fut.set_exception(Stopping("the API is shutting down"))
        self._thread.shutdown(wait=False)

    async def _work(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            by_model: dict[str, list[tuple[LoadedModel, pd.DataFrame, asyncio.Future[Score]]]] = {}
            for item in batch:  # a reload in between: each request keeps the model it was given
                by_model.setdefault(item[0].version, []).append(item)
            self._in_hand = [i[2] for i in batch]
            for items in by_model.values():
                waiting = [i for i in items if not i[2].done()]  # (a client that went away)
                if waiting:
                    await self._score(waiting)
            self._in_hand = []

    async def _score(
        self, waiting: list[tuple[LoadedModel, pd.DataFrame, asyncio.Future[Score]]]
    ) -> None:
        """One call for all of ``waiting``; should it fail, each alone, so that one user the
        model cannot score fails only that user's request."""
        loop = asyncio.get_running_loop()
        loaded = waiting[0][0]
        try:
            scores = await loop.run_in_executor(
                self._thread, score_each, loaded, [i[1] for i in waiting], self._horizon
            )
        except Exception as exc:
            if len(waiting) > 1:
                for item in waiting:
                    await self._score([item])
                return
            if not waiting[0][2].done():
                waiting[0][2].set_exception(exc)
            return
        for (_, _, fut), result in zip(waiting, scores, strict=True):
            if not fut.done():
                fut.set_result(result)


#: The most requests scored in one call.
MAX_BATCH = 64


class Stopping(ClvError):
    """The API is shutting down: a request it will not score."""


def _drain(queue: asyncio.Queue[T]) -> list[T]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out
