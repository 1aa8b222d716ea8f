"""The Parquet event log: what reading it deduplicates."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from feature_store.event_log import read_events, write_events
from feature_store.features import day_number
from feature_store.offline import events_from_orders, features_at


def test_an_event_id_is_deduplicated_within_a_user_not_across_users(tmp_path: Path) -> None:
    """The online dedup set lives in each user's hash, so two users' events may share an id
    (two shops' order numbers, say) and both count; a user's redelivered copy counts once."""
    orders = pd.DataFrame(
        {
            "user_id": ["a", "b", "a"],
            "order_id": ["1", "1", "1"],
            "ts": ["2024-01-01T10:00:00Z"] * 3,
            "amount": [10.0, 20.0, 10.0],
            "event_id": ["same-id"] * 3,
        }
    )
    write_events(tmp_path, events_from_orders(orders))
    log = read_events(tmp_path)
    assert sorted(zip(log["user_id"], log["event_id"], strict=True)) == [
        ("a", "same-id"),
        ("b", "same-id"),
    ]
    f = features_at(log, day_number(dt.date(2024, 1, 1)))
    assert f.loc["a", "revenue_total"] == 10.0 and f.loc["b", "revenue_total"] == 20.0
    assert len(read_events(tmp_path, dedupe=False)) == 3
