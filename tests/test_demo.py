"""What the demo says about its event log."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from clv.demo import events_not_replayed
from feature_store.event_log import write_events
from feature_store.offline import events_from_orders


def _orders(users: list[str], ids: list[str]) -> pd.DataFrame:
    return events_from_orders(
        pd.DataFrame(
            {
                "user_id": users,
                "order_id": ids,
                "ts": ["1997-01-01T10:00:00Z"] * len(users),
                "amount": [10.0] * len(users),
                "event_id": ids,
            }
        )
    )


def test_events_the_demo_did_not_replay_are_counted(tmp_path: Path) -> None:
    replayed = _orders(["a", "b"], ["1", "2"])
    write_events(tmp_path, replayed)
    write_events(tmp_path, replayed)  # a second demo appends the same events: none foreign
    assert events_not_replayed(tmp_path, replayed) == 0
    # a hand replay: a new user, and a known id under another user
    write_events(tmp_path, _orders(["c", "b"], ["3", "1"]))
    assert events_not_replayed(tmp_path, replayed) == 2
