"""Shared fixtures: the CDNOW copy the package ships (loaded once), the registry's clock."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

import training.registry as registry_module
from training.datasets import load_orders

DATA = Path(__file__).resolve().parents[2] / "clv" / "data"


@pytest.fixture(scope="session")
def sample_events() -> pd.DataFrame:
    return load_orders(DATA / "CDNOW_sample.txt.gz", "cdnow")


@pytest.fixture(scope="session")
def small_orders_csv(tmp_path_factory: pytest.TempPathFactory, sample_events: pd.DataFrame) -> Path:
    """A CSV slice of the sample: its first 400 customers, whole history."""
    users = sorted(sample_events["user_id"].unique())[:400]
    ev = sample_events[sample_events["user_id"].isin(users)]
    ts = pd.to_datetime(ev["ts_ms"], unit="ms", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    table = pd.DataFrame(
        {"user_id": ev["user_id"], "order_id": ev["order_id"], "ts": ts, "amount": ev["amount"]}
    )
    path = tmp_path_factory.mktemp("orders") / "orders.csv"
    table.to_csv(path, index=False)
    return path


@pytest.fixture
def minutes(monkeypatch: pytest.MonkeyPatch) -> list[dt.datetime]:
    """The registry's clock, a minute further at every reading (versions registered in one
    test's second would otherwise share a time, and sort by their hashes)."""
    now = [dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)]

    def later() -> dt.datetime:
        now[0] += dt.timedelta(minutes=1)
        return now[0]

    monkeypatch.setattr(registry_module, "_utc_now", later)
    return now
