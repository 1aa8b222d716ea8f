"""The model registry: versioned, verified artifacts under ``CLV_MODEL_DIR`` and a champion pointer.

Layout::

    <root>/<version>/model.pkl        the pickled CLVModel
    <root>/<version>/metadata.json    what it is, what it was trained on, how it validated
    <root>/CHAMPION                   {"version": ..., "metadata_file_sha256": ...}, replaced
                                      atomically (``sha256sum <version>/metadata.json``; the
                                      ``metadata_sha256`` inside the file hashes its body)
    <root>/promotions.jsonl           one line per promotion decision (audit trail)

Old versions are removed by :meth:`ModelRegistry.prune` (``CLV_MODEL_KEEP``): the champion and
the newest versions stay, so hourly retraining does not fill the disk.

A version is ``<UTC time>-<short hash of the model file>``, e.g. ``20261128T100000Z-3f2a1c``.
Versions are staged in a hidden directory and renamed into place, so a reader never sees half
a version; the pointer is written to a temporary file and ``os.replace``-d over the old one.

**Nothing is unpickled before it is verified.** Loading reads ``metadata.json`` of a version
directory inside the registry, checks its self-hash (and, through the pointer, its file hash),
its version and its feature names (must equal :data:`feature_store.features.FEATURE_NAMES`),
then reads the one model file that metadata names and checks its sha256 — and only then
unpickles those very bytes. The hashes catch corruption and careless edits; they are not a
signature: anyone who can write the registry directory can replace what the service runs, so
the directory must be writable by the trainer only.

**Promotion rule.** A challenger replaces the champion only if its validation score is strictly
better on the *same* metric over the *same* validation window (the challenger's: features as of
``train_end_day``, realised revenue in the ``label_days`` after it). The champion's score on that
window is its stored score when it validated on that very window, otherwise the caller's
``evaluate`` callback's: it scores the champion's artifact on the challenger's window, or, when
that artifact was fitted on part of the window's outcomes, the champion's recipe refitted
before the window (a :class:`ChampionScore`; a tie then promotes the challenger, the same
recipe on newer data). Other ties keep the champion. A challenger whose data ends before the
champion's (an older copy of the log, a run that read the log long before it decided) never
replaces it: its window says nothing of the newer data. The first model always promotes;
``force`` promotes unconditionally; a champion that can no longer be loaded, or that ``evaluate``
cannot score on the window (it could not serve either), is replaced.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import pickle
import platform
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from clv.errors import ClvError, ModelError, one_line
from clv.files import (
    check_usable_dir,
    fsync_dir,
    fsync_names,
    missing_dirs,
    replaced_atomically,
    staging_dir,
)
from feature_store.features import FEATURE_NAMES, day_date
from training.models.base import CLVModel

log = logging.getLogger(__name__)

FORMAT = 1
MODEL_FILE = "model.pkl"
METADATA_FILE = "metadata.json"
POINTER_FILE = "CHAMPION"
HISTORY_FILE = "promotions.jsonl"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"  # a version being written; renamed to its name when complete
REMOVING_PREFIX = ".removing-"  # a version being removed: renamed out of the versions first
UNOFFERED_GRACE = dt.timedelta(days=1)  # a version not offered yet may be another run's
MAX_METADATA_BYTES = 4 << 20
VERSION_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6,16}")

T = TypeVar("T")


def units(currency: str) -> dict[str, str]:
    """The ``units`` block of ``metadata.json``: how to read its numbers."""
    return {
        "*_day": "days since 1970-01-01 (UTC), as in the features; each *_date is the same day",
        "*_days": "a number of days",
        "money": f"{currency} (rmse, mae and the predicted values, as the events' amounts)",
        "bias": "a fraction: sum(predicted) / sum(actual) - 1 (-0.05 is 5% low)",
        "gini, spearman, top10_capture": "unitless, from 0 to 1 (top10_capture: a share)",
        "decile_mape, decile_mape_level": "a fraction (0.2: the decile means are 20% off)",
        "composite": "the sum of the relative gains over the reference; 0 is the reference",
        "seconds": "wall-clock seconds",
        "candidates": "each candidate's validation metrics; the reference (qualifies: null) "
        "is what the targets are measured against",
    }


# --- what a version records --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataWindow:
    """The event data a model was trained on (UTC day numbers, inclusive)."""

    first_event_day: int
    last_event_day: int
    cutoff_day: int  # the last day whose events the model may have used
    horizon_days: int  # what its predicted_value covers

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        for key in ("first_event_day", "last_event_day", "cutoff_day"):
            out[key.replace("_day", "_date")] = day_date(getattr(self, key)).isoformat()
        return out


@dataclass(frozen=True, slots=True)
class Validation:
    """A model's score on one validation window with one metric (the promotion yardstick)."""

    metric: str
    higher_is_better: bool
    score: float
    train_end_day: int  # features as of this day ...
    label_days: int  # ... against revenue realised in the next label_days days
    users: int = 0
    data_fingerprint: str = ""  # of the events the window was built from

    def same_window(self, other: Validation) -> bool:
        """Same metric over the same window of the same data: stored scores are comparable."""
        key = ("metric", "higher_is_better", "train_end_day", "label_days", "data_fingerprint")
        return all(getattr(self, k) == getattr(other, k) for k in key)

    def better_than(self, other_score: float) -> bool:
        """Strictly better than ``other_score`` on this metric (NaN never wins, beats NaN)."""
        if not math.isfinite(self.score):
            return False
        if not math.isfinite(other_score):
            return True
        if self.higher_is_better:
            return self.score > other_score
        return self.score < other_score

    def to_json(self) -> dict[str, Any]:
        train_end = day_date(self.train_end_day).isoformat()
        return {**asdict(self), "score": _finite(self.score), "train_end_date": train_end}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Validation:
        try:
            score = raw["score"]
            return cls(
                metric=str(raw["metric"]),
                higher_is_better=bool(raw["higher_is_better"]),
                score=float("nan") if score is None else float(score),
                train_end_day=int(raw["train_end_day"]),
                label_days=int(raw["label_days"]),
                users=int(raw.get("users", 0)),
                data_fingerprint=str(raw.get("data_fingerprint", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"metadata has an unreadable validation record: {exc}") from exc


@dataclass(frozen=True, slots=True)
class LoadedModel:
    version: str
    model: CLVModel
    metadata: dict[str, Any]

    @property
    def horizon_days(self) -> int:
        return int(self.metadata["data_window"]["horizon_days"])


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of offering a registered version as the new champion."""

    version: str
    promoted: bool
    reason: str
    metric: str | None = None
    challenger_score: float | None = None
    champion_version: str | None = None
    champion_score: float | None = None
    decided_at: str = field(default_factory=lambda: _utc_now().isoformat())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["challenger_score"] = _finite(self.challenger_score)
        out["champion_score"] = _finite(self.champion_score)
        return out


@dataclass(frozen=True, slots=True)
class ChampionScore:
    """What an :data:`Evaluate` callback may return instead of a bare score: the score, how it
    was obtained (for the decision's reason) and whether an exact tie promotes the challenger
    (right when the champion's *recipe* was scored on the challenger's window: the two are then
    the same procedure, and the challenger has seen newer data)."""

    score: float
    how: str
    ties_promote: bool = False


#: Scores a (loaded, verified) champion on the challenger's validation window.
Evaluate = Callable[[LoadedModel, Validation], "float | ChampionScore"]


def library_versions() -> dict[str, str]:
    """Versions of what a pickled model depends on, recorded beside it."""
    import numpy
    import pandas
    import scipy
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "scikit-learn": sklearn.__version__,
        "scipy": scipy.__version__,
    }


# --- helpers --------------------------------------------------------------------------------


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _finite(v: float | None) -> float | None:
    """JSON has no NaN: non-finite numbers are stored as null."""
    return None if v is None or not math.isfinite(v) else float(v)


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        with contextlib.suppress(Exception):
            return _clean(obj.tolist())
    return repr(obj)


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json(text: str | bytes) -> Any:
    """``text`` parsed as JSON; anything else, nesting deeper than the parser goes included
    (a file the registry did not write), a ValueError."""
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deep") from exc


def _read_regular(path: Path, limit: int | None = None) -> bytes:
    """A regular file's bytes, refusing symlinks (an artifact must live in the registry)."""
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the reader before the regular-file check
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise ModelError(f"{path} is missing") from exc
    except OSError as exc:
        raise ModelError(f"{path} cannot be opened safely: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ModelError(f"{path} is not a regular file")
    if limit is not None and st.st_size > limit:  # refused unread (a read of limit + 1
        os.close(fd)  # bytes would first reserve that much memory, whatever the file holds)
        raise ModelError(f"{path} is larger than {limit} bytes")
    with os.fdopen(fd, "rb") as f:
        data = f.read(st.st_size + 1)  # (a file grown since the fstat: seen, not read whole)
    if limit is not None and len(data) > limit:
        raise ModelError(f"{path} is larger than {limit} bytes")
    return data


# --- the registry ---------------------------------------------------------------------------


def _own_file(path: Path) -> IO[str]:
    """One of the registry's own files, opened to append: never through a link (a link in its
    place is an error, not a way to write outside the registry)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelError(f"{path} is a symbolic link, not the registry's file") from None
        raise
    return os.fdopen(fd, "a")


def _record(history: IO[str], decision: Decision) -> None:
    """One line of the decision history, written through at once (before the next step)."""
    history.write(json.dumps(decision.to_json(), allow_nan=False) + "\n")
    history.flush()


class ModelRegistry:
    """Versioned model artifacts under ``root`` plus the champion pointer."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # paths
    @property
    def pointer_path(self) -> Path:
        return self.root / POINTER_FILE

    def _version_dir(self, version: str) -> Path:
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            raise ModelError(f"{version!r} is not a model version (like 20261128T100000Z-3f2a1c)")
        return self.root / version

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise registrations and promotions of concurrent trainers."""
        self.root.mkdir(parents=True, exist_ok=True)
        with _own_file(self.root / LOCK_FILE) as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # writing
    def check_writable(self) -> None:
        """Before any work that ends in :meth:`register` and :meth:`offer`: this process can
        write in the directory (or, when it does not exist yet, make it: it is made only when
        a model is registered, so a run that fails first leaves nothing behind), and the
        pointer, history and lock are files where they exist (the history and lock not links,
        which are never written through), so a run that could not promote leaves no orphan
        version, nor a champion it could not record."""
        try:
            check_usable_dir(self.root, "the model directory", "CLV_MODEL_DIR")
        except ClvError as exc:
            raise ModelError(str(exc)) from None
        for name in (POINTER_FILE, HISTORY_FILE, LOCK_FILE):
            path = self.root / name
            if not path.is_symlink() and path.exists() and not path.is_file():
                raise ModelError(f"model directory {self.root}: {name} is not a regular file")
            if name != POINTER_FILE and path.is_symlink():  # never written through (_own_file)
                raise ModelError(f"{path} is a symbolic link, not the registry's file")
            if name != POINTER_FILE and path.is_file():  # the pointer is replaced, not written
                try:
                    _own_file(path).close()  # opened to append, nothing written
                except OSError as exc:
                    raise ModelError(f"{path} cannot be written: {exc.strerror}") from None

    def register(
        self,
        model: CLVModel,
        *,
        data_window: DataWindow,
        validation: Validation,
        candidates: Mapping[str, Mapping[str, float]],
        data_fingerprint: str,
        feature_names: tuple[str, ...] = FEATURE_NAMES,
        extra: Mapping[str, Any] | None = None,
        currency: str = "USD",
    ) -> str:
        """Store ``model`` as a new version (never the champion by itself); returns the version.
        ``currency``: the unit of the money figures, said in the metadata's ``units``."""
        blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        digest = _sha256(blob)
        created = _utc_now()
        made = missing_dirs(self.root)  # made by the lock: on disk with the first version
        with self._lock():
            version = f"{created:%Y%m%dT%H%M%SZ}-{digest[:6]}"
            if (self.root / version).exists():  # same model, same second: salt the short hash
                version = f"{created:%Y%m%dT%H%M%SZ}-{_sha256(blob + uuid.uuid4().bytes)[:8]}"
            body: dict[str, Any] = {
                "format": FORMAT,
                "version": version,
                "model_name": getattr(model, "name", type(model).__name__),
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "model_params": _clean(dict(model.get_params())),  # JSON values, else repr
                "feature_names": list(feature_names),
                "data_window": data_window.to_json(),
                "validation": validation.to_json(),
                "candidates": _clean(dict(candidates)),
                "data_fingerprint": data_fingerprint,
                "libraries": library_versions(),
                "artifact": {"file": MODEL_FILE, "sha256": digest, "bytes": len(blob)},
                "created_at": created.isoformat().replace("+00:00", "Z"),
                "extra": _clean(dict(extra or {})),
                "units": units(currency),
            }
            body["metadata_sha256"] = _sha256(_canonical(body))
            with staging_dir(self.root, STAGING_PREFIX) as stage:
                # made as any folder is, so the umask sets its mode (the staging folder's is
                # 0700): a service running as another user must be able to read it
                folder = stage / version
                folder.mkdir()
                _write_file(folder / MODEL_FILE, blob)
                _write_file(folder / METADATA_FILE, json.dumps(body, indent=2).encode() + b"\n")
                fsync_dir(folder)
                os.rename(folder, self.root / version)
                fsync_dir(self.root)
                fsync_names(self.root, made)  # the registry's own name too (as the event log)
        log.info("registered model %s (%s)", version, body["model_name"])
        return version

    # reading (verification happens here, before any unpickling)
    def versions(self) -> list[str]:
        """Registered versions, oldest first (names only; nothing is verified)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if VERSION_RE.fullmatch(p.name) and p.is_dir()
        )

    def metadata(self, version: str, *, expect_sha256: str | None = None) -> dict[str, Any]:
        """The verified metadata of ``version`` (raises :class:`ModelError` on any mismatch)."""
        folder = self._version_dir(version)
        try:
            if folder.is_symlink() or not folder.is_dir():
                raise ModelError(f"model version {version} is not in the registry at {self.root}")
        except OSError as exc:
            raise ModelError(f"model version {version}: {folder} is unreadable: {exc}") from exc
        raw = _read_regular(folder / METADATA_FILE, MAX_METADATA_BYTES)
        if expect_sha256 is not None and _sha256(raw) != expect_sha256:
            raise ModelError(
                f"model {version}: metadata.json changed since it was promoted "
                "(its sha256 differs from the champion pointer's); refusing to load"
            )
        try:
            meta = _json(raw)
        except ValueError as exc:  # (not UTF-8, not JSON, nested too deep)
            raise ModelError(f"model {version}: metadata.json is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise ModelError(f"model {version}: metadata.json is not a JSON object")
        claimed = meta.pop("metadata_sha256", None)
        try:
            actual = _sha256(_canonical(meta))
        except ValueError as exc:
            raise ModelError(f"model {version}: metadata.json holds non-finite numbers") from exc
        if claimed != actual:
            raise ModelError(
                f"model {version}: metadata.json was modified after registration "
                "(self-hash mismatch); refusing to load"
            )
        meta["metadata_sha256"] = claimed
        if meta.get("format") != FORMAT:
            raise ModelError(f"model {version}: unknown metadata format {meta.get('format')!r}")
        if meta.get("version") != version:
            raise ModelError(
                f"model {version}: metadata describes version {meta.get('version')!r} instead"
            )
        names = meta.get("feature_names")
        if names != list(FEATURE_NAMES):
            raise ModelError(
                f"model {version} was trained on features {names!r}, but this code computes "
                f"{list(FEATURE_NAMES)!r}; retrain it (clv train) before serving it"
            )
        # What the registry and the trainer read of it: a version without them cannot be
        # served or compared with, even if its hashes match (metadata written by other code)
        try:
            window = meta["data_window"]
            for key in ("first_event_day", "last_event_day", "cutoff_day", "horizon_days"):
                int(window[key])
            if not isinstance(meta["model_name"], str) or not isinstance(meta["extra"], dict):
                raise TypeError("model_name or extra is not what it should be")
            if not isinstance(meta["candidates"], dict):
                raise TypeError("candidates is not an object")
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"model {version}: metadata.json lacks or garbles what it must hold "
                f"({type(exc).__name__}: {exc}); refusing to load"
            ) from exc
        try:
            Validation.from_json(meta["validation"])
        except (KeyError, TypeError, ModelError) as exc:
            raise ModelError(f"model {version}: metadata.json: {exc}; refusing to load") from exc
        return meta

    def trained_on(self, data_fingerprint: str, inputs: Mapping[str, Any]) -> dict[str, Any] | None:
        """The verified metadata of the newest version that was trained on the data
        ``data_fingerprint`` names with ``inputs`` recorded as its ``extra.inputs`` (what else
        decides the model: code, libraries, settings) and offered for promotion, or ``None``.

        Only a version whose metadata and model file verify can match, and only one that was
        offered (it is the champion or has a decision in the history): a run stopped between
        registering and offering left a version the champion was never compared with."""
        wanted = json.loads(json.dumps(_clean(dict(inputs))))  # as the metadata holds it
        offered = self._offered()
        for version in reversed(self.versions()):
            if version not in offered:
                continue
            try:
                meta = self.metadata(version)
            except ModelError:
                continue
            extra = meta.get("extra")
            if not (
                meta.get("data_fingerprint") == data_fingerprint
                and isinstance(extra, dict)
                and extra.get("inputs") == wanted
            ):
                continue
            try:  # the model file too, read only for the match (a forest's can be large)
                self._model_bytes(version, meta)
            except ModelError:
                continue
            return meta
        return None

    def _history(self) -> list[dict[str, Any]]:
        """The recorded decisions, oldest first (a torn last line, from a run killed while it
        wrote it, is no decision)."""
        path = self.root / HISTORY_FILE
        found: list[dict[str, Any]] = []
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    decision = _json(line)
                except ValueError:
                    continue
                if isinstance(decision, dict) and isinstance(decision.get("version"), str):
                    found.append(decision)
        return found

    def _champion_or_none(self) -> str | None:
        """The champion's version; ``None`` also when the pointer is unreadable."""
        try:
            return self.champion_version()
        except ModelError:
            return None

    def _offered(self) -> set[str]:
        """Versions with a decision in the history, and the champion."""
        found = {d["version"] for d in self._history()}
        champion = self._champion_or_none()
        return found | ({champion} if champion else set())

    def _record_lost_promotion(self, history: IO[str]) -> None:
        """Under the lock: a run killed outright (SIGKILL, a crash) after moving the pointer and
        before recording its decision left a champion that no line of the history promotes.
        Record it now, from the pointer, into ``history``, so that it names every champion."""
        try:
            pointer = self._pointer()
        except ModelError:
            return  # a broken pointer: the next decision replaces it, and says why
        if pointer is None:
            return
        version = str(pointer["version"])
        if any(d["version"] == version and d.get("promoted") for d in self._history()):
            return
        _record(
            history,
            Decision(
                version,
                True,
                "recorded afterwards: the run that promoted it stopped before recording it "
                f"(its reason, from the pointer: {pointer.get('reason')})",
                decided_at=str(pointer.get("promoted_at") or _utc_now().isoformat()),
            ),
        )

    def _verified(
        self, version: str, expect_metadata_sha256: str | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """The metadata and model bytes of ``version``, both checked (nothing unpickled)."""
        meta = self.metadata(version, expect_sha256=expect_metadata_sha256)
        return meta, self._model_bytes(version, meta)

    def _model_bytes(self, version: str, meta: Mapping[str, Any]) -> bytes:
        """The model file of ``version``, checked against its (verified) metadata."""
        artifact = meta.get("artifact")
        if not isinstance(artifact, dict) or artifact.get("file") != MODEL_FILE:
            raise ModelError(f"model {version}: metadata names no {MODEL_FILE} artifact")
        size = artifact.get("bytes")
        # the verified metadata's size bounds the read: a larger file in its place (a foreign
        # one, say) is refused unread, not hashed after being read whole
        limit = size if isinstance(size, int) and not isinstance(size, bool) else None
        if limit is not None and limit < 0:
            raise ModelError(f"model {version}: metadata gives {MODEL_FILE} {limit} bytes")
        blob = _read_regular(self.root / version / MODEL_FILE, limit)
        if _sha256(blob) != artifact.get("sha256"):
            raise ModelError(
                f"model {version}: {MODEL_FILE} does not match the sha256 in its metadata "
                "(corrupt or replaced file); refusing to unpickle it"
            )
        return blob

    def load(self, version: str, *, expect_metadata_sha256: str | None = None) -> LoadedModel:
        """Verify ``version`` (metadata, feature names, model sha256), then unpickle it."""
        meta, blob = self._verified(version, expect_metadata_sha256)
        try:
            model = pickle.loads(blob)  # verified bytes only (see module docstring)
        except Exception as exc:
            raise ModelError(f"model {version}: cannot unpickle {MODEL_FILE}: {exc}") from exc
        if not isinstance(model, CLVModel):
            kind = type(model).__name__
            raise ModelError(f"model {version}: artifact is a {kind}, not a CLVModel")
        recorded = meta.get("libraries", {})
        for lib, now in library_versions().items():
            if lib != "python" and recorded.get(lib) not in (None, now):
                log.warning(
                    "model %s was pickled with %s %s, running %s",
                    version,
                    lib,
                    recorded.get(lib),
                    now,
                )
        return LoadedModel(version=version, model=model, metadata=meta)

    # the champion
    def _pointer(self) -> dict[str, Any] | None:
        path = self.pointer_path
        try:
            if self.root.exists() and not self.root.is_dir():
                raise ModelError(f"the model directory {self.root} is not a directory")
            if not path.exists() and not path.is_symlink():
                return None
        except OSError as exc:  # (a folder this process may not enter, say)
            raise ModelError(f"the model directory {self.root} is unreadable: {exc}") from exc
        try:
            raw = _read_regular(path, MAX_METADATA_BYTES)
        except ModelError as exc:
            raise ModelError(f"champion pointer unreadable: {exc}") from exc
        try:
            pointer = _json(raw)
            if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
                raise ValueError("no version")
        except ValueError as exc:
            raise ModelError(f"champion pointer {self.pointer_path} is unreadable: {exc}") from exc
        return pointer

    def champion_version(self) -> str | None:
        """The champion's version, or ``None``: one small file read, cheap enough to poll."""
        pointer = self._pointer()
        return None if pointer is None else str(pointer["version"])

    def _of_champion(self, use: Callable[[str, str], T]) -> T:
        """``use(version, metadata_file_sha256)`` on the champion the pointer names; when it
        fails (ModelError) and the pointer has changed meanwhile, on the new champion."""
        pointer = self._pointer()
        if pointer is None:
            raise ModelError(f"no champion model in {self.root}: run `clv train` first")
        # the file's hash; "metadata_sha256" in pointers written before the rename
        file_sha = pointer.get("metadata_file_sha256") or pointer.get("metadata_sha256")
        if not isinstance(file_sha, str):  # the check it vouches for cannot be skipped
            raise ModelError(
                f"champion pointer {self.pointer_path} holds no hash of the champion's "
                "metadata: promote a model again (`clv train --force`)"
            )
        try:
            return use(str(pointer["version"]), file_sha)
        except ModelError:
            if self._pointer() == pointer:  # still the champion: it is what is broken
                raise
            return self._of_champion(use)  # replaced, its version maybe pruned, while we read

    def load_champion(self) -> LoadedModel:
        """The verified champion (raises :class:`ModelError` when there is none or it fails)."""
        return self._of_champion(lambda v, sha: self.load(v, expect_metadata_sha256=sha))

    def verify_champion(self) -> str:
        """The champion's version once its pointer, metadata and model file check out, as
        :meth:`load_champion` checks them but with nothing unpickled (raises
        :class:`ModelError` otherwise). It reads the model file: for a periodic check, not a
        request's."""

        def verified(version: str, sha: str) -> str:
            self._verified(version, sha)
            return version

        return self._of_champion(verified)

    def _write_pointer(self, version: str, decision: Decision) -> None:
        meta_raw = _read_regular(self.root / version / METADATA_FILE, MAX_METADATA_BYTES)
        pointer = {
            "version": version,
            "metadata_file_sha256": _sha256(meta_raw),  # as sha256sum prints it
            "promoted_at": decision.decided_at,
            "reason": decision.reason,
        }
        with replaced_atomically(self.pointer_path, follow_links=False) as staged:
            _write_file(staged, json.dumps(pointer, indent=2).encode() + b"\n")
        fsync_dir(self.root)

    def offer(
        self, version: str, *, evaluate: Evaluate | None = None, force: bool = False
    ) -> Decision:
        """Promote ``version`` if it beats the champion (see the module docstring's rule)."""
        # The history is opened before anything else: one this run cannot write fails the
        # offer with the champion unchanged, not after it moved. (A write that fails after the
        # move, a full disk, is recorded by the next offer, from the pointer.)
        with self._lock(), _own_file(self.root / HISTORY_FILE) as history:
            self._record_lost_promotion(history)
            meta = self.metadata(version)
            val = Validation.from_json(meta["validation"])
            cutoff_day = int(meta["data_window"]["cutoff_day"])
            decision = self._decide(version, val, evaluate, force, cutoff_day)
            if decision.promoted:
                self._write_pointer(version, decision)
            _record(history, decision)
        log.info(
            "model %s %s: %s",
            version,
            "promoted" if decision.promoted else "kept back",
            decision.reason,
        )
        return decision

    def prune(self, keep: int) -> list[str]:
        """Remove old versions, keeping the champion and the ``keep`` newest; returns the
        versions removed. A version not offered yet is kept for a day whatever its rank: it may
        be another trainer's, registered and about to be offered. Each goes in one rename out
        of the versions (a reader sees it whole or not at all), then is deleted; what a run
        killed in between left is deleted by the next prune."""
        if keep < 1:
            raise ValueError(f"keep at least the newest version, not {keep}")
        if not self.root.is_dir():
            return []
        removed: list[str] = []
        with self._lock():
            champion = self._champion_or_none()
            offered = {d["version"] for d in self._history()}  # the champion is kept anyway
            young = f"{_utc_now() - UNOFFERED_GRACE:%Y%m%dT%H%M%SZ}"
            for version in self.versions()[:-keep]:
                if version == champion or (version not in offered and version > young):
                    continue
                try:
                    os.rename(self.root / version, self.root / f"{REMOVING_PREFIX}{version}")
                except OSError as exc:  # left where it is; the others still go
                    log.warning("could not remove old model version %s: %s", version, exc)
                    continue
                removed.append(version)
            if removed:
                fsync_dir(self.root)
            for left in self.root.glob(f"{REMOVING_PREFIX}*"):
                shutil.rmtree(left, ignore_errors=True)
            # A pointer being written by a run killed outright (pointers are written under
            # this lock, so none is being written now).
            for left in self.root.glob(f".{POINTER_FILE}.*.tmp"):
                left.unlink(missing_ok=True)
        if removed:
            log.info("removed %d old model version(s): %s", len(removed), ", ".join(removed))
        return removed

    def _decide(
        self,
        version: str,
        val: Validation,
        evaluate: Evaluate | None,
        force: bool,
        cutoff_day: int,
    ) -> Decision:
        common: dict[str, Any] = {"metric": val.metric, "challenger_score": val.score}
        try:
            current = self.champion_version()
        except ModelError as exc:  # as with a champion that cannot be loaded: replace it
            return Decision(version, True, str(exc), **common)
        if force:
            return Decision(version, True, "forced", champion_version=current, **common)
        if current is None:
            return Decision(version, True, "first model: no champion yet", **common)
        if current == version:
            return Decision(
                version, False, "already the champion", champion_version=current, **common
            )
        try:
            champion = self.load_champion()
        except ModelError as exc:
            return Decision(
                version,
                True,
                f"champion {current} cannot be loaded ({exc})",
                champion_version=current,
                **common,
            )
        champ_cutoff_day = int(champion.metadata["data_window"]["cutoff_day"])
        if cutoff_day < champ_cutoff_day:
            # An older copy of the log, or a run that read the log long before it decided:
            # the comparison on its window would say nothing of data it never saw.
            return Decision(
                version,
                False,
                f"trained on data up to {day_date(cutoff_day)}, before the champion's "
                f"{day_date(champ_cutoff_day)}: a model of older data does not replace one of "
                "newer data (clv train --force promotes it anyway)",
                champion_version=current,
                **common,
            )
        stored = Validation.from_json(champion.metadata["validation"])
        ties_promote = False
        if stored.same_window(val):
            champ_score, how = stored.score, "its stored score on the same window"
        elif evaluate is not None:
            try:
                scored = evaluate(champion, val)
            except MemoryError:
                raise
            except Exception as exc:  # it could not serve either: as one that cannot be loaded
                return Decision(
                    version,
                    True,
                    f"champion {current} cannot be scored on this window ({one_line(exc)})",
                    champion_version=current,
                    **common,
                )
            if isinstance(scored, ChampionScore):
                champ_score, how, ties_promote = scored.score, scored.how, scored.ties_promote
            else:
                champ_score, how = float(scored), "re-scored on this window"
                champ_cutoff = int(champion.metadata["data_window"]["cutoff_day"])
                if champ_cutoff > val.train_end_day:
                    # Its fit saw part of the window's outcomes: the comparison leans its way.
                    how += ", which its training data overlaps"
        else:
            return Decision(
                version,
                False,
                "champion validated on another window and no evaluator was given: keeping it",
                champion_version=current,
                champion_score=stored.score,
                **common,
            )
        tie = ties_promote and val.score == champ_score
        better = val.better_than(champ_score) or tie
        direction = "higher" if val.higher_is_better else "lower"
        verdict = "a tie: the newer fit wins" if tie else "better" if better else "not better"
        reason = (
            f"{val.metric} {val.score:.6g} vs champion {champ_score:.6g} ({how}; "
            f"{direction} is better): {verdict}"
        )
        return Decision(
            version, better, reason, champion_version=current, champion_score=champ_score, **common
        )


# --- conveniences for a service that only serves --------------------------------------------


def champion_version(model_dir: Path) -> str | None:
    """The champion's version in ``model_dir`` (cheap: poll it to hot-reload a new champion)."""
    return ModelRegistry(model_dir).champion_version()


def load_champion(model_dir: Path) -> LoadedModel:
    """The verified champion of ``model_dir``."""
    return ModelRegistry(model_dir).load_champion()
