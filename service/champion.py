"""The champion model the API scores with, swapped without a restart when the pointer moves.

The registry's pointer is one small file: it is polled, and a new champion is loaded (checksums
and feature names verified, as every load is) before it replaces the old one, so a request is
always scored by a whole model. A champion that fails to load leaves the one in service.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from prometheus_client import Counter, Gauge

from clv.errors import ModelError
from training.registry import LoadedModel, ModelRegistry

log = logging.getLogger(__name__)

RELOADS = Counter("clv_model_reloads", "champion models loaded by the API", ["outcome"])
MODEL_LOADED = Gauge("clv_model_loaded_timestamp_seconds", "when the API loaded its model")


class NoChampion(ModelError):
    """The registry has no champion yet: a state, before the first ``clv train``, not a fault."""


class Champion:
    def __init__(self, model_dir: Path) -> None:
        self.registry = ModelRegistry(model_dir)
        self.loaded: LoadedModel | None = None
        self.problem: str | None = "not loaded yet"  # why there is no (new) model, for readyz
        self._lock = asyncio.Lock()

    async def refresh(self, *, force: bool = False) -> bool:
        """Load the registry's champion if it is not the one in service (``force``: load it
        again anyway). True when the model in service changed. Raises :class:`ModelError` when
        there is no champion or it fails to load; the model in service stays."""
        async with self._lock:
            try:
                version = await asyncio.to_thread(self.registry.champion_version)
                if version is None:
                    raise NoChampion(
                        f"no champion model in {self.registry.root}: run `clv train` first"
                    )
                if not force and self.loaded is not None and self.loaded.version == version:
                    return False
                loaded = await asyncio.to_thread(self.registry.load_champion)
            except ModelError as exc:
                self.problem = str(exc)
                if not isinstance(exc, NoChampion):  # (no champion yet is no failed load)
                    RELOADS.labels("failed").inc()
                raise
            changed = self.loaded is None or self.loaded.version != loaded.version
            self.loaded, self.problem = loaded, None
            RELOADS.labels("loaded").inc()
            MODEL_LOADED.set_to_current_time()
            if changed:
                log.info("serving model %s", loaded.version)
            return changed

    async def watch(self, every_s: float) -> None:
        """Poll the pointer until cancelled. Each distinct failure is logged once (a missing
        champion at INFO: it is what a new deployment has until its first training)."""
        said = self.problem
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh()
                said = None
            except Exception as exc:  # a model directory gone, unreadable: said, polled again
                if str(exc) != said:
                    level = logging.INFO if isinstance(exc, NoChampion) else logging.WARNING
                    log.log(level, "model not (re)loaded: %s", exc)
                    said = str(exc)
