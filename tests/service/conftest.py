"""A registry with a real champion (BG/NBD + Gamma-Gamma fitted on the CDNOW sample), copied
per test, and the API served on a free port in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from clv.local_stack import LocalProcess, free_port
from clv.settings import Settings
from feature_store.features import day_number
from feature_store.redis_client import connect
from feature_store.redis_store import FeatureStore
from service.server import serve_api
from training.datasets import build_training_set, load_orders
from training.models.base import CLVModel
from training.models.btyd import BGNBDGammaGamma
from training.registry import DataWindow, ModelRegistry, Validation

DATA = Path(__file__).resolve().parents[2] / "clv" / "data"
CUTOFF = day_number(dt.date(1997, 9, 30))


def register(model_dir: Path, model: CLVModel, *, force: bool = True) -> str:
    reg = ModelRegistry(model_dir)
    version = reg.register(
        model,
        data_window=DataWindow(
            first_event_day=CUTOFF - 272, last_event_day=CUTOFF, cutoff_day=CUTOFF, horizon_days=365
        ),
        validation=Validation("mae", False, 1.0, CUTOFF - 91, 91, users=100),
        candidates={},
        data_fingerprint="f" * 64,
    )
    reg.offer(version, force=force)
    return version


@pytest.fixture(scope="session")
def fitted_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    events = load_orders(DATA / "CDNOW_sample.txt.gz", "cdnow")
    model = BGNBDGammaGamma().fit(build_training_set(events, CUTOFF, 91, n_cutoffs=1))
    root = tmp_path_factory.mktemp("fitted") / "models"
    return root, register(root, model)


@pytest.fixture
def model_dir(fitted_registry: tuple[Path, str], tmp_path: Path) -> Path:
    """A registry of the test's own whose champion is the fitted BG/NBD + Gamma-Gamma."""
    return Path(shutil.copytree(fitted_registry[0], tmp_path / "models"))


@pytest.fixture
def api_settings(redis_server: LocalProcess, model_dir: Path, tmp_path: Path) -> Settings:
    import uuid

    return Settings(
        redis_url=redis_server.address,
        model_dir=model_dir,
        event_log_dir=tmp_path / "events",
        api_port=free_port(),
        key_prefix=f"t{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture
async def store(api_settings: Settings) -> AsyncIterator[FeatureStore]:
    redis = connect(api_settings.redis_url)
    yield FeatureStore(redis, prefix=api_settings.key_prefix)
    await redis.aclose()


async def start_api(settings: Settings, stop: asyncio.Event) -> asyncio.Task[None]:
    """serve_api in a task, once it answers /healthz (a test fails, not hangs, if it never)."""
    task = asyncio.create_task(serve_api(settings, stop))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api_port}") as client:
        for _ in range(200):
            if task.done():
                task.result()
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return task
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the API did not answer /healthz within 10 s")


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The API for ``settings`` and a client of it; stopped (and awaited) on the way out."""
    stop = asyncio.Event()
    task = await start_api(settings, stop)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api_port}") as client:
            yield client
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def api(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(api_settings) as client:
        yield client
