"""Shared fixtures: the CDNOW copy the package ships, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

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
