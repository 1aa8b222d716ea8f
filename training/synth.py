"""A realistic synthetic order log, generated vectorised with numpy (10M orders in seconds).

The generative story (Pareto/NBD with gamma-gamma spend, Fader, Hardie & Lee 2005):

* user ``i`` is acquired at a time ``b_i`` (its first order) spread over the window;
* while alive it buys at rate ``lambda_i * g(t)``, ``lambda_i ~ Gamma(r)`` (heterogeneous rates)
  and ``g`` a weekly x annual seasonality profile (weekends and the Nov/Dec peak are busier);
* it dies after an exponential lifetime of rate ``mu_i ~ Gamma(s)`` (heterogeneous dropout);
* every order's value is ``Gamma(p, nu_i)`` with ``nu_i ~ Gamma(q, gamma)`` (gamma-gamma spend),
  made of ``1 + Poisson(0.5)`` items at shop prices (whole dollars less a cent: $11.99);
* orders come at the hours web shops see (:data:`HOURLY`: quiet nights, an evening peak);
* a few % of orders are refunded later (in full, some items, or in part), referencing the real
  ``order_id``.

``--orders M`` fixes the number of purchases exactly: given the users' rates and lifetimes, the
``M - N`` repeat purchases are a multinomial draw over users (the exact conditional law of the
Poisson counts given their total), and their times are uniform in seasonal "operational time"
over each user's alive span (the conditional law of a Poisson process's points).
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from clv.errors import ClvError
from clv.files import missing_dirs, remove_empty, replaced_atomically, staged, staging_dir
from feature_store.features import day_number

MS_PER_DAY = 86_400_000
SYNTH_STAGING = ".synth."  # prefix of write_log's staging folder inside the log directory
S_PER_DAY = 86_400

#: Relative purchase intensity Monday..Sunday.
WEEKLY = np.array([0.93, 0.90, 0.94, 0.98, 1.06, 1.13, 1.06])
#: Relative purchase intensity by hour of the day, 00:00-23:00 (the log's clock, UTC): quiet
#: nights, a lunchtime bump and an evening peak, as web shops see.
# fmt: off
HOURLY = np.array([
    0.9, 0.6, 0.4, 0.3, 0.25, 0.3, 0.5, 0.9, 1.3, 1.6, 1.8, 1.9,  # 00:00-11:00
    2.0, 1.9, 1.8, 1.8, 1.9, 2.0, 2.2, 2.5, 2.7, 2.6, 2.1, 1.4,  # 12:00-23:00
])
# fmt: on
#: Mean number of items beyond the first in one order.
EXTRA_ITEMS = 0.5

#: Called as ``progress(phase, done, total)``; ``None`` is silent.
Progress = Callable[[str, int, int], None]


class SynthError(ClvError):
    """Parameters that cannot describe an order log (e.g. fewer orders than users)."""


@dataclass(frozen=True, slots=True)
class SynthConfig:
    """What to generate; the defaults give CDNOW-like customers (most buy once or twice)."""

    users: int
    orders: int
    seed: int = 0
    start: dt.date = dt.date(2024, 1, 1)
    days: int = 730
    refund_rate: float = 0.03
    rate_shape: float = 0.6  # r: shape of the purchase-rate gamma (lower = more heterogeneous)
    dropout_shape: float = 0.8  # s: shape of the dropout-rate gamma
    mean_lifetime_days: float = 300.0  # 1 / E[mu]
    spend_shape: float = 5.0  # p: shape of one order's value
    spend_mean_shape: float = 3.5  # q: shape of the user's value-rate gamma
    mean_order_value: float = 35.0  # E[value] = p * gamma / (q - 1)

    def check(self) -> None:
        if self.users < 1:
            raise SynthError("--users must be at least 1")
        if self.orders < self.users:
            raise SynthError(
                f"--orders ({self.orders}) must be at least --users ({self.users}): "
                "every user has a first order"
            )
        if self.days < 1:
            raise SynthError("--days must be at least 1")
        if self.start < dt.date(1970, 1, 1):
            raise SynthError(f"--start {self.start} is before 1970-01-01 (events cannot be)")
        if (dt.date.max - self.start).days < self.days - 1:
            raise SynthError(
                f"--start {self.start} plus --days {self.days} runs past the year 9999"
            )
        if not 0.0 <= self.refund_rate < 1.0:
            raise SynthError(f"--refund-rate must be in [0, 1), not {self.refund_rate}")
        if self.spend_mean_shape <= 1.0:
            raise SynthError("spend_mean_shape must be > 1 (finite mean order value)")


@dataclass(frozen=True, slots=True)
class SynthLog:
    """The generated events, columnar, sorted by time (purchases and refunds interleaved)."""

    user: np.ndarray  # int64, 1-based user number -> "u<n>"
    order: np.ndarray  # int64, 1-based order number -> "o<n>" (purchases numbered in time order)
    ts_s: np.ndarray  # int64, epoch seconds
    cents: np.ndarray  # int64, amount in cents (positive for refunds too)
    refund: np.ndarray  # bool
    start: dt.date
    days: int

    def __len__(self) -> int:
        return len(self.user)

    @property
    def purchases(self) -> int:
        return int((~self.refund).sum())


def _seasonality(start: dt.date, days: int) -> np.ndarray:
    """Relative purchase intensity of each day of the window (weekly x annual)."""
    d0 = day_number(start)
    day = np.arange(d0, d0 + days)
    weekday = (day + 3) % 7  # 1970-01-01 was a Thursday
    doy = (day - day_number(dt.date(1970, 1, 1))) % 365.2425
    # A broad winter peak (centred mid-December) and a short pre-Christmas rush.
    annual = 1.0 + 0.18 * np.cos(2 * np.pi * (doy - 348) / 365.2425)
    rush = np.exp(-0.5 * ((doy - 340) / 9.0) ** 2) * 0.35
    return WEEKLY[weekday] * (annual + rush)


def generate(cfg: SynthConfig, progress: Progress | None = None) -> SynthLog:
    """Draw the whole log; memory is ~100 bytes per order."""
    cfg.check()
    note = progress or (lambda _phase, _done, _total: None)
    steps = 5
    note("generate", 0, steps)
    rng = np.random.default_rng(cfg.seed)
    n, m, horizon = cfg.users, cfg.orders, float(cfg.days)

    # Operational time: G(t) = integral of the seasonal intensity; uniform in G = seasonal in t.
    knots = np.arange(cfg.days + 1, dtype=np.float64)
    big_g = np.concatenate(([0.0], np.cumsum(_seasonality(cfg.start, cfg.days))))

    def to_op(t: np.ndarray) -> np.ndarray:
        return np.interp(t, knots, big_g)

    def from_op(y: np.ndarray) -> np.ndarray:
        return np.interp(y, big_g, knots)

    # Acquisition (first order) times, seasonal, numbered in order of acquisition.
    birth_op = np.sort(rng.uniform(0.0, big_g[-1], n))
    birth = from_op(birth_op)
    rate = rng.gamma(cfg.rate_shape, 1.0, n)
    mu = rng.gamma(cfg.dropout_shape, 1.0 / (cfg.dropout_shape * cfg.mean_lifetime_days), n)
    death = birth + rng.exponential(1.0, n) / mu
    alive_op = to_op(np.minimum(death, horizon)) - birth_op
    note("generate", 1, steps)

    weight = rate * alive_op
    total = weight.sum()
    repeats = np.zeros(n, dtype=np.int64)
    if m > n and total > 0:
        repeats = rng.multinomial(m - n, weight / total)
    elif m > n:  # nobody alive beyond their first day: spread repeats evenly
        repeats = rng.multinomial(m - n, np.full(n, 1.0 / n))
    who = np.repeat(np.arange(n, dtype=np.int64), repeats)
    rep_t = from_op(birth_op[who] + rng.random(len(who)) * alive_op[who])
    del weight, mu, death
    note("generate", 2, steps)

    # Purchases: first orders then repeats; gamma-gamma values.
    p_user = np.concatenate((np.arange(n, dtype=np.int64), who))
    p_t = np.concatenate((birth, rep_t))
    del who, rep_t
    p, q = cfg.spend_shape, cfg.spend_mean_shape
    gamma_scale = cfg.mean_order_value * (q - 1.0) / p
    nu = rng.gamma(q, 1.0 / gamma_scale, n)  # the user's value rate
    value = rng.gamma(p, 1.0, m) / nu[p_user]
    # Items at price points: the order's value shared over its items, each rounded to whole
    # dollars less a cent (E[round(x)] = x, so the mean moves by about a cent per item).
    items = 1 + rng.poisson(EXTRA_ITEMS, m)
    item_cents = np.maximum(np.rint(value / items) * 100 - 1, 99).astype(np.int64)
    p_cents = item_cents * items
    del value
    start_s = day_number(cfg.start) * S_PER_DAY
    p_day = np.minimum(p_t.astype(np.int64), cfg.days - 1)  # the seasonal day ...
    del p_t
    hour = rng.choice(24, size=m, p=HOURLY / HOURLY.sum())  # ... at a web shop's hour
    p_sec = p_day * S_PER_DAY + hour * 3600 + rng.integers(0, 3600, m)
    del p_day, hour
    # Order numbers follow time. A repeat drawn for the day of the first order may come at an
    # earlier hour: then it is the first order (the features read days, not the draw's order).
    by_time = np.argsort(p_sec, kind="stable")
    p_user, p_sec, p_cents = p_user[by_time], p_sec[by_time], p_cents[by_time]
    item_cents, items = item_cents[by_time], items[by_time]
    del by_time
    p_order = np.arange(1, m + 1, dtype=np.int64)
    note("generate", 3, steps)

    # Refunds: a few % of orders, 1 hour to a few weeks later: in full (75%), else some of a
    # several-item order's items, or part of a one-item order's price (a goodwill refund).
    hit = np.flatnonzero(rng.random(m) < cfg.refund_rate)
    delay = 3600 + (rng.exponential(7.0, len(hit)) * S_PER_DAY).astype(np.int64)
    r_sec = p_sec[hit] + delay
    keep = r_sec < cfg.days * S_PER_DAY  # refunds after the window's end have not happened yet
    hit, r_sec = hit[keep], r_sec[keep]
    full = rng.random(len(hit)) < 0.75
    some = rng.integers(1, np.maximum(items[hit], 2))  # 1 .. items-1 of them
    part = np.maximum(np.rint(p_cents[hit] * rng.uniform(0.1, 0.9, len(hit))), 1)
    r_cents = np.where(
        full, p_cents[hit], np.where(items[hit] > 1, item_cents[hit] * some, part)
    ).astype(np.int64)
    del item_cents, items
    note("generate", 4, steps)

    sec = np.concatenate((p_sec, r_sec))
    by_time = np.argsort(sec, kind="stable")  # a refund sorts after its purchase (later time)
    log = SynthLog(
        user=(np.concatenate((p_user, p_user[hit])) + 1)[by_time],
        order=np.concatenate((p_order, p_order[hit]))[by_time],
        ts_s=sec[by_time] + start_s,
        cents=np.concatenate((p_cents, r_cents))[by_time],
        refund=np.concatenate((np.zeros(m, dtype=bool), np.ones(len(hit), dtype=bool)))[by_time],
        start=cfg.start,
        days=cfg.days,
    )
    note("generate", steps, steps)
    return log


# --- output ---------------------------------------------------------------------------------


def _prefixed(prefix: str, numbers: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), "")


def _iso_ts(ts_s: np.ndarray, start: dt.date, days: int) -> pa.Array:
    """Epoch seconds -> ``YYYY-MM-DDTHH:MM:SSZ`` via lookup tables (Arrow's strftime is slow)."""
    d0 = day_number(start)
    day = ts_s // S_PER_DAY - d0
    dates = pa.array([(start + dt.timedelta(days=i)).isoformat() for i in range(days)])
    clock = pa.array(
        [f"T{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}Z" for t in range(S_PER_DAY)]
    )
    return pc.binary_join_element_wise(
        pc.take(dates, pa.array(day)), pc.take(clock, pa.array(ts_s % S_PER_DAY)), ""
    )


def _kinds(refund: np.ndarray) -> pa.Array:
    return pc.take(pa.array(["purchase", "refund"]), pa.array(refund.astype(np.int8)))


def _event_ids(kinds: pa.Array, order_ids: pa.Array) -> pa.Array:
    # The same ids events_from_orders derives from an orders file, so CSV and log agree.
    return pc.binary_join_element_wise(kinds, order_ids, ":")


def _slice(log: SynthLog, lo: int, hi: int) -> SynthLog:
    return SynthLog(
        user=log.user[lo:hi],
        order=log.order[lo:hi],
        ts_s=log.ts_s[lo:hi],
        cents=log.cents[lo:hi],
        refund=log.refund[lo:hi],
        start=log.start,
        days=log.days,
    )


def orders_table(log: SynthLog) -> pa.Table:
    """The contract's orders format: ``user_id,order_id,ts,amount,type,event_id``."""
    kinds = _kinds(log.refund)
    order_ids = _prefixed("o", log.order)
    return pa.table(
        {
            "user_id": _prefixed("u", log.user),
            "order_id": order_ids,
            "ts": _iso_ts(log.ts_s, log.start, log.days),
            "amount": pa.array(log.cents / 100.0),
            "type": kinds,
            "event_id": _event_ids(kinds, order_ids),
        }
    )


def events_frame(log: SynthLog) -> pd.DataFrame:
    """The event table (:data:`feature_store.offline.EVENT_COLUMNS`) the event log stores."""
    kinds = _kinds(log.refund)
    order_ids = _prefixed("o", log.order)
    ts_ms = log.ts_s * 1000
    table = pa.table(
        {
            "event_id": _event_ids(kinds, order_ids),
            "type": kinds,
            "user_id": _prefixed("u", log.user),
            "order_id": order_ids,
            "amount": pa.array(log.cents / 100.0),
            "currency": pa.nulls(len(log), pa.string()),
            "ts_ms": pa.array(ts_ms),
            "day": pa.array(ts_ms // MS_PER_DAY),
            "cents": pa.array(np.where(log.refund, -log.cents, log.cents)),
        }
    )
    return table.to_pandas()


def write_csv(log: SynthLog, path: Path, progress: Progress | None = None) -> int:
    """Write the orders CSV in chunks (to a temporary file renamed into place at the end, so a
    failure leaves nothing behind), gzipped when ``path`` ends in ``.gz``; returns the rows
    written."""
    chunk = 1_000_000
    total = len(log)
    schema = orders_table(_slice(log, 0, 0)).schema
    gz = path.name.lower().endswith(".gz")
    with (
        replaced_atomically(path) as staged,
        pa.CompressedOutputStream(str(staged), "gzip") if gz else staged.open("wb") as sink,
    ):
        sink.write((",".join(schema.names) + "\n").encode())
        options = pacsv.WriteOptions(include_header=False, quoting_style="none")
        with pacsv.CSVWriter(sink, schema, write_options=options) as w:
            for lo in range(0, total, chunk):
                w.write_table(orders_table(_slice(log, lo, min(lo + chunk, total))))
                if progress:
                    progress("write csv", min(lo + chunk, total), total)
    return total


def write_log(log: SynthLog, root: Path, progress: Progress | None = None) -> int:
    """Write the events as a date-partitioned event log under ``root`` (new or empty); returns
    the files written. They go to a staging folder inside ``root`` first (log readers skip any
    folder that is not a ``date=`` partition) and are moved into place when all are written,
    so a failure (a full disk, Ctrl-C) leaves no partial log to train on."""
    from feature_store.event_log import write_events

    made = missing_dirs(root)
    root.mkdir(parents=True, exist_ok=True)
    moved: list[Path] = []
    try:
        with staging_dir(root, SYNTH_STAGING) as staging:
            chunk = 1_000_000
            total = len(log)
            files = 0
            for lo in range(0, total, chunk):
                part = events_frame(_slice(log, lo, min(lo + chunk, total)))
                files += len(write_events(staging, part, durable=False))
                if progress:
                    progress("write event log", min(lo + chunk, total), total)
            for folder in staged(staging):
                folder.replace(root / folder.name)
                moved.append(root / folder.name)
    except BaseException:
        for folder in moved:
            shutil.rmtree(folder, ignore_errors=True)
        remove_empty(made)
        raise
    return files
