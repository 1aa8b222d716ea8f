"""No look-ahead inside the training pipeline, past the plain feature builder: the stacked
cutoffs of a training set (with the per-cutoff BG/NBD+GG fits the hybrids read) and the
selection's validation, which must see only the days before its own inner cutoff."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from feature_store.features import day_number
from tests.training.test_datasets import _perturb_future
from training.datasets import build_training_set
from training.models.candidates import CANDIDATES
from training.models.hybrid import stacked_btyd
from training.selection import select_champion
from training.train import SLOW_CANDIDATES

AS_OF = day_number(dt.date(1997, 12, 31))


def _rows_at(frame: pd.DataFrame, cutoff_day: np.ndarray, c: int) -> pd.DataFrame:
    return frame[cutoff_day == c].sort_index()


def test_every_stacked_cutoff_sees_only_its_own_past(sample_events: pd.DataFrame) -> None:
    """For each stacked cutoff ``c``: changing, dropping and adding orders after ``c`` changes
    neither the features nor the BG/NBD+GG outputs (the hybrids' inputs, from a fit per
    cutoff) at ``c``; changing those after ``c``'s label window leaves its labels too."""
    a = build_training_set(sample_events, AS_OF, 91, n_cutoffs=3, step_days=30)
    block_a, _ = stacked_btyd(a)
    assert len(a.cutoffs) == 3
    for k, c in enumerate(a.cutoffs):
        b = build_training_set(_perturb_future(sample_events, c), AS_OF, 91, n_cutoffs=3)
        block_b, _ = stacked_btyd(b)
        assert list(b.cutoffs) == list(a.cutoffs)
        pd.testing.assert_frame_equal(
            _rows_at(a.features, a.cutoff_day, c), _rows_at(b.features, b.cutoff_day, c)
        )
        pd.testing.assert_frame_equal(
            _rows_at(block_a, a.cutoff_day, c), _rows_at(block_b, b.cutoff_day, c)
        )
        if k < len(a.cutoffs) - 1:  # the probe has teeth: a later cutoff does see the change
            later = a.cutoffs[k + 1]
            assert not _rows_at(block_a, a.cutoff_day, later).equals(
                _rows_at(block_b, b.cutoff_day, later)
            )
        window = int(a.label_days[a.cutoff_day == c][0])
        b = build_training_set(_perturb_future(sample_events, c + window), AS_OF, 91, n_cutoffs=3)
        labels_a = pd.Series(a.label, index=a.features.index)[a.cutoff_day == c].sort_index()
        labels_b = pd.Series(b.label, index=b.features.index)[b.cutoff_day == c].sort_index()
        pd.testing.assert_series_equal(labels_a, labels_b)


def test_the_selection_validates_on_the_past_of_its_inner_cutoff(
    sample_events: pd.DataFrame,
) -> None:
    """Every candidate's validation forecast is the same when the orders between the
    selection's inner cutoff and the cutoff change: only its scoring sees them."""
    users = sorted(sample_events["user_id"].unique())[:900]
    ev = sample_events[sample_events["user_id"].isin(users)]
    # every candidate but the two `clv train` leaves out at scale (the forest's parallel sums
    # also differ run to run in the last bits, which this exact comparison would catch)
    names = [n for n in CANDIDATES if n not in SLOW_CANDIDATES]
    assert {"hybrid_btyd_features", "hybrid_btyd_residual"} <= set(names)
    first = select_champion(ev, AS_OF, 91, names=names)
    inner = first.inner_cutoff_day
    assert inner is not None and inner < AS_OF
    changed = ev.copy()
    after = changed["day"] > inner
    changed.loc[after, "cents"] = changed.loc[after, "cents"] * 4 + 3
    changed.loc[after, "amount"] = changed.loc[after, "cents"] / 100
    second = select_champion(changed, AS_OF, 91, names=names)
    assert second.inner_cutoff_day == inner
    assert first.val_actual is not None and second.val_actual is not None
    assert not np.allclose(first.val_actual, second.val_actual)  # the scored window changed
    assert sorted(first.val_predictions) == sorted(names)
    for name in names:
        np.testing.assert_array_equal(
            first.val_predictions[name], second.val_predictions[name], err_msg=name
        )
