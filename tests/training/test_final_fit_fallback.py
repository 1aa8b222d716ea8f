"""The selected model's final fit failing on the cutoff's own snapshot (it was fitted on the
inner cutoff's): a label-free model forecasts instead, in clv backtest and clv train."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from clv.errors import ModelError
from clv.settings import Settings
from feature_store.event_log import write_events
from feature_store.features import day_number
from training.backtest import backtest_events
from training.datasets import load_orders
from training.registry import ModelRegistry

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
