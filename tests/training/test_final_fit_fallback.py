"""The selected model's final fit failing on the cutoff's own snapshot (it was fitted on the
inner cutoff's): a label-free model forecasts instead, in clv backtest and clv train."""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
from typer.testing import CliRunner

from clv.errors import ModelError
from clv.settings import Settings
from feature_store.event_log import write_events
from feature_store.features import day_number
from training.backtest import backtest_events
from training.datasets import load_orders
from training.models.base import TrainingSet
from training.models.candidates import CANDIDATES
from training.models.naive import HistoricalRate
from training.registry import ModelRegistry
from training.selection import Selection
from training.train import TrainResult

# Ten customers buy on 2023-01-01; u0 and u1 buy again on 2023-01-11 (two repeat buyers with
# positive spend, so Gamma-Gamma can be fitted as of the validation's inner cutoff); u1's repeat
# order is refunded in full on 2023-02-10, after the inner cutoff: as of the cutoff only one
# repeat buyer with positive spend is left, and Gamma-Gamma cannot be fitted.
ORDERS = (
    "user_id,order_id,ts,amount,type\n"
    + "".join(f"u{i},o{i},2023-01-01T10:00:00Z,10,purchase\n" for i in range(10))
    + (
        "u0,o10,2023-01-11T10:00:00Z,20,purchase\n"
        "u1,o11,2023-01-11T10:00:00Z,20,purchase\n"
        "u1,o11,2023-02-10T12:00:00Z,20,refund\n"
    )
)
CUTOFF = dt.date(2023, 2, 15)


@pytest.fixture
def orders(tmp_path: Path) -> Path:
    path = tmp_path / "orders.csv"
    path.write_text(ORDERS)
    return path


def test_a_champion_whose_final_fit_fails_gives_way_to_a_label_free_model(orders: Path) -> None:
    # Fails if the run ends without a forecast (it raised "could not be fitted") although the
    # naive rate, a candidate of the same selection, forecasts every customer.
    result = backtest_events(load_orders(orders), day_number(CUTOFF), 365)
    assert result.selection.champion == "naive_rate"
    assert "final fit of bgnbd_gg failed" in result.selection.reason
    assert len(result.predictions) == 10 and result.predictions.notna().all().all()
    assert "bgnbd_gg" in result.final_fit_errors


def test_no_candidate_that_can_forecast_is_a_failure_not_bad_input(orders: Path) -> None:
    # Fails if a valid file whose only candidate cannot be fitted is said to be bad input
    # (DatasetError, exit 2): it is a model that cannot be fitted (ModelError, exit 1).
    with pytest.raises(ModelError, match="bgnbd_gg could not be fitted"):
        backtest_events(load_orders(orders), day_number(CUTOFF), 365, candidates=["bgnbd_gg"])


def test_the_cli_writes_the_fallback_forecast(orders: Path, tmp_path: Path) -> None:
    from clv.cli import app

    out = tmp_path / "pred.csv"
    args = ["backtest", "--orders", str(orders), "--cutoff", str(CUTOFF)]
    result = CliRunner().invoke(app, [*args, "--horizon-days", "365", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out)) == 10


def test_clv_train_registers_the_fallback_as_the_first_champion(
    orders: Path, tmp_path: Path
) -> None:
    # Fails if the first model of a registry is lost to a final fit a label-free model avoids
    # (a young log: the stack has no champion to serve until one exists).
    from training.train import train

    log = tmp_path / "events"
    write_events(log, load_orders(orders), durable=False)
    settings = Settings(event_log_dir=log, model_dir=tmp_path / "models")
    result = train(settings, progress=False)
    assert result.promoted
    registry = ModelRegistry(tmp_path / "models")
    assert registry.champion_version() == result.version
    assert result.model_name == registry.load(result.version).model.name == "naive_rate"
    assert "final fit of bgnbd_gg failed" in result.selection_reason


# No refund (a new customer's first order in its place, so the log ends on the same day): two
# repeat buyers are left as of the cutoff, and BG/NBD+GG can be fitted there too.
ORDERS_WITHOUT_THE_REFUND = ORDERS.replace(
    "u1,o11,2023-02-10T12:00:00Z,20,refund", "u10,o12,2023-02-10T12:00:00Z,20,purchase"
)


class _CannotFit(HistoricalRate):
    def fit(self, ds: TrainingSet) -> _CannotFit:
        raise ValueError("this model cannot be fitted here")


class _CannotForecast(HistoricalRate):
    def predict(self, features: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        raise ModelError("this model forecasts no finite value")


def _chosen(monkeypatch: pytest.MonkeyPatch, module: ModuleType, champion: str) -> None:
    """The selection in ``module`` names ``champion`` (a candidate it scored, or skipped)."""
    real = module.select_champion

    def choose(*args: object, **kwargs: object) -> Selection:
        selection: Selection = real(*args, **kwargs)
        assert champion in selection.scores
        selection.champion = champion
        return selection

    monkeypatch.setattr(module, "select_champion", choose)


def _train(tmp_path: Path, orders: str, candidates: list[str]) -> TrainResult:
    from training.train import train

    path = tmp_path / "orders.csv"
    path.write_text(orders)
    log = tmp_path / "events"
    write_events(log, load_orders(path), durable=False)
    settings = Settings(event_log_dir=log, model_dir=tmp_path / "models")
    return train(settings, progress=False, candidates=candidates)


ALL_THREE = ["ridge", "naive_rate", "bgnbd_gg"]


def _train_when_ridge_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bgnbd_gg: type | None = None
) -> TrainResult:
    """clv train over :data:`ALL_THREE` with ridge chosen and unable to fit, and ``bgnbd_gg``
    (when given) standing in for the reference."""
    import training.selection

    monkeypatch.setitem(CANDIDATES, "ridge", _CannotFit)
    if bgnbd_gg is not None:
        monkeypatch.setitem(CANDIDATES, "bgnbd_gg", bgnbd_gg)
    _chosen(monkeypatch, training.selection, "ridge")
    return _train(tmp_path, ORDERS_WITHOUT_THE_REFUND, ALL_THREE)


def test_a_failed_champion_gives_way_to_the_reference_first_in_backtest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if the fallback takes the candidates in another order than fallback_order's (the
    # naive rate before BG/NBD+GG, which both forecast here) when a model that learns from
    # labels was chosen and has too little history for its final fit.
    import training.backtest

    _chosen(monkeypatch, training.backtest, "ridge")
    path = tmp_path / "orders.csv"
    path.write_text(ORDERS_WITHOUT_THE_REFUND)
    result = backtest_events(load_orders(path), day_number(CUTOFF), 365, candidates=ALL_THREE)
    assert result.selection.champion == "bgnbd_gg"
    assert "final fit of ridge failed" in result.selection.reason
    assert "ridge" in result.final_fit_errors and "naive_rate" not in result.model_predictions


def test_a_failed_champion_gives_way_to_the_reference_first_in_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if clv train takes the label-free models in another order than fallback_order's
    # (the naive rate registered where BG/NBD+GG, first in that order, forecasts).
    result = _train_when_ridge_fails(tmp_path, monkeypatch)
    assert result.model_name == "bgnbd_gg"
    assert "final fit of ridge failed (this model cannot be fitted here)" in result.selection_reason


def test_a_fallback_that_cannot_forecast_is_passed_over_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if clv train registers a fallback whose fit succeeds but whose forecast fails (it
    # would serve no customer), or gives up at the first fallback that fails instead of
    # trying the next one.
    result = _train_when_ridge_fails(tmp_path, monkeypatch, _CannotForecast)
    assert result.model_name == "naive_rate"
    model = ModelRegistry(tmp_path / "models").load(result.version).model
    assert type(model) is HistoricalRate


def test_clv_train_with_nothing_to_fall_back_on_fails_with_the_final_fits_error(
    tmp_path: Path,
) -> None:
    # Fails if clv train, when no other candidate of the selection can forecast, ends with
    # another error than the champion's own final fit's (a ClvError: one line, exit 1), or
    # registers a model all the same.
    with pytest.raises(ModelError, match="Gamma-Gamma needs repeat buyers with positive spend"):
        _train(tmp_path, ORDERS, ["bgnbd_gg"])
    assert not (tmp_path / "models").exists() or not ModelRegistry(tmp_path / "models").versions()


class _WarnsWhenFitted(HistoricalRate):
    def fit(self, ds: TrainingSet) -> _WarnsWhenFitted:
        warnings.warn("a note from this fit", UserWarning, stacklevel=1)
        return super().fit(ds)


def test_the_fallbacks_own_fit_warnings_are_kept_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if the version registered in the failed champion's place is stored without what its
    # own final fit warned (the metadata's final_fit_warnings would describe no fit).
    result = _train_when_ridge_fails(tmp_path, monkeypatch, _WarnsWhenFitted)
    assert result.model_name == "bgnbd_gg"
    meta = ModelRegistry(tmp_path / "models").metadata(result.version)
    assert any("a note from this fit" in w for w in meta["extra"]["final_fit_warnings"])


def test_a_fallback_the_targets_refused_does_not_displace_a_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if the label-free model that takes a failed final fit's place is weighed against
    # the stored champion with the composite the selection refused it on (it missed the
    # targets): a champion that misses them ranks below BG/NBD+GG, and so must the fallback.
    import training.selection
    from training.train import train

    models = tmp_path / "models"
    for name, orders in (("first", ORDERS_WITHOUT_THE_REFUND), ("second", ORDERS)):
        path = tmp_path / f"{name}.csv"
        path.write_text(orders)
        write_events(tmp_path / name, load_orders(path), durable=False)
    first = train(Settings(event_log_dir=tmp_path / "first", model_dir=models), progress=False)
    assert first.promoted and first.model_name == "bgnbd_gg"
    real = training.selection.select_champion

    def refused_yet_higher(*args: object, **kwargs: object) -> Selection:
        selection: Selection = real(*args, **kwargs)
        naive = selection.scores["naive_rate"]  # above the reference, but refused
        naive.score, naive.qualifies, naive.missed = 0.5, False, ["total bias outside ±10%"]
        return selection

    monkeypatch.setattr(training.selection, "select_champion", refused_yet_higher)
    second = train(Settings(event_log_dir=tmp_path / "second", model_dir=models), progress=False)
    assert second.model_name == "naive_rate"  # the fallback, registered
    assert not second.promoted, second.decision.reason
    assert ModelRegistry(models).champion_version() == first.version
