"""The time-ordered, customer-disjoint splits the regressors' grid search validates on."""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.models.regressors import cutoff_splits


def test_splits_train_on_earlier_cutoffs_and_other_customers() -> None:
    users = pd.Index([f"u{i}" for i in range(200)])
    cutoff_day = np.repeat([100, 130, 160, 190], len(users))
    stacked = np.tile(users.to_numpy(), 4)
    splits = cutoff_splits(cutoff_day, stacked, max_splits=3)
    assert len(splits) == 3
    validated = []
    for train, val in splits:
        (c,) = np.unique(cutoff_day[val])
        validated.append(c)
        assert (cutoff_day[train] < c).all()  # the past only
        assert not set(stacked[train]) & set(stacked[val])  # no validated customer's label
        assert 0.3 < len(set(stacked[val])) / len(users) < 0.7  # about half of them
    assert validated == [130, 160, 190]
    sides = [frozenset(stacked[val]) for _, val in splits]
    assert sides[0] != sides[1] and sides[0] == sides[2]  # the halves alternate
    again = cutoff_splits(cutoff_day, stacked, max_splits=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))
