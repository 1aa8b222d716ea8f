"""Registry rules: promotion only on a strictly better score, verified loading, atomic pointer."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clv.errors import ModelError
from feature_store.features import FEATURE_NAMES
from tests.fsyncs import recorded_fsyncs, unreadable_folder
from training.models.naive import HistoricalRate
from training.registry import (
    HISTORY_FILE,
    LOCK_FILE,
    METADATA_FILE,
    MODEL_FILE,
    POINTER_FILE,
    ChampionScore,
    DataWindow,
    LoadedModel,
    ModelRegistry,
    Validation,
    champion_version,
    load_champion,
)

WINDOW = DataWindow(first_event_day=9000, last_event_day=9700, cutoff_day=9700, horizon_days=365)


def validation(score: float, train_end_day: int = 9500, metric: str = "mae") -> Validation:
    return Validation(
        metric=metric,
        higher_is_better=False,
        score=score,
        train_end_day=train_end_day,
        label_days=200,
        users=100,
    )


def register(reg: ModelRegistry, score: float, *, min_age: int = 30, **kw: object) -> str:
    return reg.register(
        HistoricalRate(min_age_days=min_age),
        data_window=WINDOW,
        validation=validation(score, **kw),  # type: ignore[arg-type]
        candidates={"naive_rate": {"mae": score, "gini": float("nan")}},
        data_fingerprint="f" * 64,
    )


def flip_a_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


def edited_metadata(reg: ModelRegistry, v: str, edit: Callable[[dict[str, Any]], None]) -> bytes:
    """``v``'s metadata.json changed by ``edit`` with its self-hash recomputed: consistent on
    its own, not with a pointer's hash of the file. The bytes written."""
    from training.registry import _canonical, _sha256

    path = reg.root / v / METADATA_FILE
    meta = json.loads(path.read_text())
    meta.pop("metadata_sha256")
    edit(meta)
    meta["metadata_sha256"] = _sha256(_canonical(meta))
    raw = json.dumps(meta, indent=2).encode() + b"\n"
    path.write_bytes(raw)
    return raw


@pytest.fixture
def reg(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


def test_first_model_always_promotes(reg: ModelRegistry) -> None:
    assert reg.champion_version() is None
    v = register(reg, 100.0)
    assert reg.champion_version() is None  # registering alone never promotes
    d = reg.offer(v)
    assert d.promoted and "first model" in d.reason
    assert reg.champion_version() == v == champion_version(reg.root)
    loaded = load_champion(reg.root)
    assert loaded.version == v and isinstance(loaded.model, HistoricalRate)


def test_better_challenger_promotes_worse_is_registered_only(reg: ModelRegistry) -> None:
    v1 = register(reg, 100.0, min_age=1)
    reg.offer(v1)
    worse = register(reg, 120.0, min_age=2)
    d = reg.offer(worse)
    assert not d.promoted and d.champion_score == 100.0 and d.challenger_score == 120.0
    assert reg.champion_version() == v1
    assert worse in reg.versions()  # kept, loadable, just not the champion
    assert reg.load(worse).version == worse
    tie = register(reg, 100.0, min_age=3)
    assert not reg.offer(tie).promoted  # ties keep the champion
    better = register(reg, 90.0, min_age=4)
    d = reg.offer(better)
    assert d.promoted and reg.champion_version() == better
    history = (reg.root / HISTORY_FILE).read_text().splitlines()
    assert [json.loads(line)["promoted"] for line in history] == [True, False, False, True]


def test_higher_is_better_metric(reg: ModelRegistry) -> None:
    def reg_gini(score: float, age: int) -> str:
        val = Validation("gini", True, score, 9500, 200)
        return reg.register(
            HistoricalRate(age),
            data_window=WINDOW,
            validation=val,
            candidates={},
            data_fingerprint="x",
        )

    reg.offer(reg_gini(0.5, 1))
    assert not reg.offer(reg_gini(0.4, 2)).promoted
    assert reg.offer(reg_gini(0.6, 3)).promoted


def test_force_promotes_a_worse_model(reg: ModelRegistry) -> None:
    reg.offer(register(reg, 100.0, min_age=1))
    worse = register(reg, 500.0, min_age=2)
    d = reg.offer(worse, force=True)
    assert d.promoted and d.reason == "forced"
    assert reg.champion_version() == worse


def test_a_model_of_older_data_never_replaces_one_of_newer_data(reg: ModelRegistry) -> None:
    champion = register(reg, 100.0, min_age=1)
    reg.offer(champion)
    older = dataclasses.replace(WINDOW, last_event_day=9640, cutoff_day=9640)
    stale = reg.register(
        HistoricalRate(min_age_days=2),
        data_window=older,
        validation=validation(50.0, train_end_day=9440),  # far better on its own window
        candidates={},
        data_fingerprint="e" * 64,
    )
    # An older copy of the log (or a trainer that read the log long before it decided): its
    # window says nothing of the two months it never saw, however well it scores there.
    d = reg.offer(stale, evaluate=lambda c, v: ChampionScore(90.0, "recipe", ties_promote=True))
    # Fails if the stale fit wins (it did: "a tie: the newer fit wins" or "better").
    assert not d.promoted and reg.champion_version() == champion
    assert "up to 1996-05-24, before the champion's 1996-07-23" in d.reason
    assert "--force" in d.reason
    assert reg.offer(stale, force=True).promoted  # the way to roll back on purpose
    newer = dataclasses.replace(WINDOW, last_event_day=9760, cutoff_day=9760)
    fresh = reg.register(
        HistoricalRate(min_age_days=3),
        data_window=newer,
        validation=validation(80.0, train_end_day=9560),
        candidates={},
        data_fingerprint="d" * 64,
    )
    assert reg.offer(fresh, evaluate=lambda c, v: 90.0).promoted


def test_a_history_it_cannot_write_fails_the_offer_before_the_champion_moves(
    reg: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.registry as registry

    first = register(reg, 100.0, min_age=1)
    reg.offer(first)
    own_file = registry._own_file

    def history_refused(path: Path) -> object:
        if path.name == HISTORY_FILE:  # say another user's file, mode 0644
            raise PermissionError(13, "Permission denied", str(path))
        return own_file(path)

    monkeypatch.setattr(registry, "_own_file", history_refused)
    # Fails if the check before any work lets the run train for its whole length first.
    with pytest.raises(ModelError, match=f"{HISTORY_FILE} cannot be written: Permission denied"):
        reg.check_writable()
    better = register(reg, 90.0, min_age=2)
    with pytest.raises(PermissionError):
        reg.offer(better)
    # Fails if the pointer moved before the decision could be recorded (the run then said it
    # failed while its model served, with no line of the history promoting it).
    assert reg.champion_version() == first
    monkeypatch.setattr(registry, "_own_file", own_file)
    reg.check_writable()
    assert reg.offer(better).promoted
    history = [json.loads(line) for line in (reg.root / HISTORY_FILE).read_text().splitlines()]
    assert [(d["version"], d["promoted"]) for d in history] == [(first, True), (better, True)]


def test_other_window_rescores_the_champion(reg: ModelRegistry) -> None:
    v1 = register(reg, 100.0, min_age=1, train_end_day=9400)
    reg.offer(v1)
    seen: list[tuple[str, int]] = []

    def evaluate(champion: LoadedModel, val: Validation) -> float:
        seen.append((champion.version, val.train_end_day))
        return 80.0  # the champion does better on the new window than the challenger's 90

    v2 = register(reg, 90.0, min_age=2, train_end_day=9500)
    d = reg.offer(v2, evaluate=evaluate)
    assert seen == [(v1, 9500)]
    assert not d.promoted and d.champion_score == 80.0
    # Without an evaluator a champion from another window is kept (no apples-to-oranges).
    assert not reg.offer(v2).promoted
    v3 = register(reg, 70.0, min_age=3, train_end_day=9500)
    assert reg.offer(v3, evaluate=evaluate).promoted


def test_a_tie_with_the_champions_recipe_promotes_the_newer_fit(reg: ModelRegistry) -> None:
    v1 = register(reg, 100.0, min_age=1, train_end_day=9400)
    reg.offer(v1)
    v2 = register(reg, 90.0, min_age=2, train_end_day=9500)

    def artifact(champion: LoadedModel, val: Validation) -> float:
        return 90.0  # a tie with the champion's own artifact keeps the champion

    def recipe(champion: LoadedModel, val: Validation) -> ChampionScore:
        return ChampionScore(90.0, "its recipe refitted before this window", ties_promote=True)

    kept = reg.offer(v2, evaluate=artifact)
    assert not kept.promoted and "not better" in kept.reason
    won = reg.offer(v2, evaluate=recipe)
    assert won.promoted and "the newer fit wins" in won.reason
    assert "its recipe refitted before this window" in won.reason
    v3 = register(reg, 95.0, min_age=3, train_end_day=9600)
    lost = reg.offer(v3, evaluate=lambda c, v: ChampionScore(90.0, "recipe", ties_promote=True))
    assert not lost.promoted  # worse than the recipe: no tie, no promotion


def test_nan_challenger_never_wins(reg: ModelRegistry) -> None:
    reg.offer(register(reg, 100.0, min_age=1))
    assert not reg.offer(register(reg, float("nan"), min_age=2)).promoted


# --- refusing what cannot be trusted ---------------------------------------------------------


def test_flipped_byte_in_model_file_is_refused(reg: ModelRegistry) -> None:
    v = register(reg, 1.0)
    reg.offer(v)
    flip_a_byte(reg.root / v / MODEL_FILE)
    with pytest.raises(ModelError, match="does not match the sha256"):
        reg.load_champion()


def test_a_model_file_larger_than_its_metadata_says_is_refused_before_it_is_read_whole(
    reg: ModelRegistry,
) -> None:
    # The verified metadata's size bounds the read: a file grown in place of the artifact (a
    # foreign one, say) is refused after size + 1 bytes, not hashed after being read whole.
    v = register(reg, 1.0)
    reg.offer(v)
    path = reg.root / v / MODEL_FILE
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"\0" * (1 << 20))
    with pytest.raises(ModelError, match=f"larger than {size} bytes"):
        reg.load_champion()
    with pytest.raises(ModelError, match=f"larger than {size} bytes"):
        reg.verify_champion()


@pytest.mark.parametrize("claimed", [1 << 40, 1 << 63, -4])
def test_a_size_in_the_metadata_never_sizes_the_read(reg: ModelRegistry, claimed: int) -> None:
    # Fails if (registry.py) the recorded size is the read's length: a self-consistent
    # metadata claiming 2**40 bytes made it reserve that much (MemoryError; 2**63:
    # OverflowError), neither a ModelError, so retraining's check died of it; a negative one
    # read the whole file. The file as registered still loads; a negative size is refused.
    from training.registry import _sha256

    v = register(reg, 1.0)
    reg.offer(v)
    raw = edited_metadata(reg, v, lambda meta: meta["artifact"].update(bytes=claimed))
    pointer = json.loads(reg.pointer_path.read_text())
    pointer["metadata_file_sha256"] = _sha256(raw)
    reg.pointer_path.write_text(json.dumps(pointer))
    if claimed < 0:
        with pytest.raises(ModelError, match=r"metadata gives model\.pkl -4 bytes"):
            reg.verify_champion()
    else:
        assert reg.verify_champion() == v and reg.load_champion().version == v


def test_verify_champion_checks_the_files_without_unpickling(
    reg: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelError, match="no champion"):
        reg.verify_champion()
    v = register(reg, 1.0)
    reg.offer(v)

    def no_unpickling(_data: bytes) -> object:
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    assert reg.verify_champion() == v
    flip_a_byte(reg.root / v / MODEL_FILE)
    with pytest.raises(ModelError, match="does not match the sha256"):
        reg.verify_champion()
    (reg.root / v / METADATA_FILE).unlink()
    with pytest.raises(ModelError, match="missing"):
        reg.verify_champion()


def test_edited_metadata_is_refused(reg: ModelRegistry) -> None:
    v = register(reg, 1.0)
    reg.offer(v)
    path = reg.root / v / METADATA_FILE
    meta = json.loads(path.read_text())
    meta["validation"]["score"] = 0.0  # a careless "fix" of the score
    path.write_text(json.dumps(meta, indent=2))
    with pytest.raises(ModelError, match="modified after registration"):
        reg.load(v)


def test_metadata_edited_with_recomputed_self_hash_is_refused_via_pointer(
    reg: ModelRegistry,
) -> None:
    v = register(reg, 1.0)
    reg.offer(v)
    path = reg.root / v / METADATA_FILE
    pointer = json.loads((reg.root / POINTER_FILE).read_text())
    # the pointer holds the file's hash, as sha256sum prints it
    assert pointer["metadata_file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    edited_metadata(reg, v, lambda meta: meta.update(model_name="something_else"))
    reg.load(v)  # self-consistent on its own ...
    with pytest.raises(ModelError, match="changed since it was promoted"):
        reg.load_champion()  # ... but not what was promoted
    # a pointer written before the key's rename is checked all the same
    pointer["metadata_sha256"] = pointer.pop("metadata_file_sha256")
    (reg.root / POINTER_FILE).write_text(json.dumps(pointer))
    with pytest.raises(ModelError, match="changed since it was promoted"):
        reg.load_champion()
    # and one with no hash at all (or a null one) is refused, not loaded unchecked
    for hashless in ({"version": v}, {"version": v, "metadata_file_sha256": None}):
        (reg.root / POINTER_FILE).write_text(json.dumps(hashless))
        with pytest.raises(ModelError, match="holds no hash of the champion's metadata"):
            reg.load_champion()


@pytest.mark.parametrize(
    "names",
    [("orders_total", "revenue_total"), tuple(reversed(FEATURE_NAMES))],
    ids=["others", "another order"],
)
def test_feature_name_mismatch_is_refused_before_unpickling(
    reg: ModelRegistry, monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]
) -> None:
    v = reg.register(
        HistoricalRate(),
        data_window=WINDOW,
        validation=validation(1.0),
        candidates={},
        data_fingerprint="x",
        feature_names=names,
    )

    def no_unpickling(*_a: object, **_k: object) -> object:
        raise AssertionError("unpickled before verification")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(ModelError, match="trained on features"):
        reg.load(v)


def test_stray_pickle_without_metadata_is_never_unpickled(
    reg: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.root.mkdir(parents=True)
    stray = reg.root / "20261128T100000Z-abcdef"
    stray.mkdir()
    (stray / MODEL_FILE).write_bytes(pickle.dumps(HistoricalRate()))
    pointer = {"version": stray.name, "metadata_file_sha256": "0" * 64}
    (reg.root / POINTER_FILE).write_text(json.dumps(pointer))

    def no_unpickling(*_a: object, **_k: object) -> object:
        raise AssertionError("unpickled a stray file")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(ModelError, match=r"metadata\.json is missing"):
        reg.load_champion()
    for bad in ("../outside", "model.pkl", "20261128T100000Z-abcdef/../x"):
        with pytest.raises(ModelError, match="is not a model version"):
            reg.load(bad)


def test_symlinked_model_file_is_refused(reg: ModelRegistry, tmp_path: Path) -> None:
    v = register(reg, 1.0)
    outside = tmp_path / "evil.pkl"
    outside.write_bytes((reg.root / v / MODEL_FILE).read_bytes())
    (reg.root / v / MODEL_FILE).unlink()
    (reg.root / v / MODEL_FILE).symlink_to(outside)
    with pytest.raises(ModelError, match="cannot be opened safely"):
        reg.load(v)


def test_unloadable_champion_is_replaced(reg: ModelRegistry) -> None:
    v1 = register(reg, 1.0, min_age=1)
    reg.offer(v1)
    (reg.root / v1 / MODEL_FILE).write_bytes(b"garbage")
    v2 = register(reg, 50.0, min_age=2)
    d = reg.offer(v2)
    assert d.promoted and "cannot be loaded" in d.reason


def test_a_champion_that_cannot_be_scored_is_replaced_not_a_crash(reg: ModelRegistry) -> None:
    """A champion that loads but cannot forecast the window (an old pickle under newer
    libraries, non-finite forecasts) could not serve either: it is replaced, and the decision is
    recorded, rather than every later training stopping on it."""
    v1 = register(reg, 1.0, min_age=1)
    reg.offer(v1)
    v2 = register(reg, 50.0, min_age=2, train_end_day=9400)  # another window: evaluate is asked

    def evaluate(champion: object, val: Validation) -> float:
        raise ModelError("model produced non-finite forecasts\n(details)")

    d = reg.offer(v2, evaluate=evaluate)
    assert d.promoted and reg.champion_version() == v2
    assert f"champion {v1} cannot be scored on this window" in d.reason
    assert "non-finite forecasts ... (details)" in d.reason
    lines = (reg.root / HISTORY_FILE).read_text().splitlines()
    assert json.loads(lines[-1])["promoted"] is True


def test_running_out_of_memory_while_scoring_the_champion_promotes_nothing(
    reg: ModelRegistry,
) -> None:
    v1 = register(reg, 1.0, min_age=1)
    reg.offer(v1)
    v2 = register(reg, 50.0, min_age=2, train_end_day=9400)

    def evaluate(champion: object, val: Validation) -> float:
        raise MemoryError

    with pytest.raises(MemoryError):
        reg.offer(v2, evaluate=evaluate)
    assert reg.champion_version() == v1


def test_metadata_records_what_was_trained(reg: ModelRegistry) -> None:
    v = register(reg, 12.5)
    meta = reg.metadata(v)
    assert meta["version"] == v
    assert meta["model_name"] == "naive_rate"
    assert meta["data_window"]["cutoff_date"] == "1996-07-23"
    assert meta["candidates"]["naive_rate"] == {"mae": 12.5, "gini": None}  # NaN -> null
    assert set(meta["libraries"]) == {"python", "numpy", "pandas", "scikit-learn", "scipy"}
    assert len(meta["artifact"]["sha256"]) == 64 and meta["data_fingerprint"] == "f" * 64
    assert meta["created_at"].endswith("Z")


# --- the pointer ----------------------------------------------------------------------------


def test_pointer_is_replaced_atomically(
    reg: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = register(reg, 100.0, min_age=1)
    reg.offer(v1)
    before = (reg.root / POINTER_FILE).read_bytes()
    v2 = register(reg, 1.0, min_age=2)
    real_replace = os.replace

    def crash(src: object, dst: object) -> None:
        # The new pointer is complete on disk under a temporary name when the swap happens.
        assert json.loads(Path(str(src)).read_text())["version"] == v2
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        reg.offer(v2)
    assert (reg.root / POINTER_FILE).read_bytes() == before  # old champion intact
    assert not [p for p in reg.root.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(os, "replace", real_replace)
    assert reg.offer(v2).promoted and reg.champion_version() == v2


def test_registration_is_staged(reg: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="disk full"):
        register(reg, 1.0)
    assert reg.versions() == []
    assert not [p for p in reg.root.iterdir() if p.name.startswith(".staging")]


def test_a_registration_cut_short_by_kill_9_is_cleared_by_the_next(reg: ModelRegistry) -> None:
    """A trainer killed mid-write leaves its staging folder (no cleanup runs); the next
    registration removes it, since no live process holds its lock, and never a live one's."""
    hold = (
        "import sys; from pathlib import Path; from clv.files import staging_dir\n"
        "with staging_dir(Path(sys.argv[1]), '.staging-') as d:\n"
        "    (d / 'model.pkl').write_bytes(b'half'); print(d, flush=True); sys.stdin.read()\n"
    )
    reg.root.mkdir(parents=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", hold, str(reg.root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],  # this checkout's clv
        )
        for _ in range(2)
    ]
    killed, live = (Path(p.stdout.readline().strip()) for p in procs)  # type: ignore[union-attr]
    procs[0].kill()
    procs[0].wait()
    try:
        v = register(reg, 1.0)
        assert not killed.exists() and (live / "model.pkl").exists()
        assert reg.versions() == [v]
    finally:
        procs[1].kill()
        procs[1].wait()


def test_unreadable_pointer_is_a_model_error(reg: ModelRegistry) -> None:
    reg.root.mkdir(parents=True)
    (reg.root / POINTER_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="champion pointer"):
        reg.champion_version()


def test_no_champion_message(reg: ModelRegistry) -> None:
    with pytest.raises(ModelError, match="no champion model"):
        reg.load_champion()


def test_a_new_model_replaces_an_unreadable_pointer(reg: ModelRegistry) -> None:
    """Like a champion that cannot be loaded: training is not stuck behind a broken pointer."""
    reg.root.mkdir(parents=True)
    (reg.root / POINTER_FILE).write_text("{oops")
    v = register(reg, 100.0)
    d = reg.offer(v)
    assert d.promoted and "champion pointer" in d.reason
    assert reg.champion_version() == v


DEEP = b"[" * 200_000  # nested deeper than the JSON parser goes: a RecursionError


def test_json_nested_too_deep_is_a_broken_file_not_a_crash(reg: ModelRegistry) -> None:
    # Fails if (registry.py) the pointer's, a metadata.json's or a history line's parse lets
    # its RecursionError out: every load and every offer (forced too) then died on it.
    v = register(reg, 100.0, min_age=1)
    reg.offer(v)
    (reg.root / POINTER_FILE).write_bytes(DEEP)
    with pytest.raises(ModelError, match="champion pointer"):
        reg.champion_version()
    with (reg.root / HISTORY_FILE).open("ab") as f:
        f.write(DEEP + b"\n")
    newer = register(reg, 100.0, min_age=2)
    assert reg.offer(newer).promoted and reg.champion_version() == newer  # pointer replaced
    (reg.root / v / "metadata.json").write_bytes(DEEP)
    with pytest.raises(ModelError, match="not valid JSON"):
        reg.metadata(v)


def test_a_model_directory_it_may_not_enter_is_a_model_error(
    reg: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if (registry.py) a folder this process may not search (another user's 0700 model
    # directory; as root, who may enter any, it is played by refusing every look inside it)
    # raises PermissionError where callers expect a ModelError: /admin/reload answered 500,
    # the API did not start, `clv score` crashed.
    v = register(reg, 100.0)
    reg.offer(v)
    stat, lstat = Path.stat, Path.lstat

    def refused(real):  # type: ignore[no-untyped-def]
        def look(self: Path, **kw: object):  # type: ignore[no-untyped-def]
            if self.parent == reg.root:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, **kw)

        return look

    monkeypatch.setattr(Path, "stat", refused(stat))
    monkeypatch.setattr(Path, "lstat", refused(lstat))
    for call in (reg.champion_version, reg.load_champion):
        with pytest.raises(ModelError, match=r"unreadable: .*Permission denied"):
            call()
    with pytest.raises(ModelError, match=r"unreadable: .*Permission denied"):
        reg.metadata(v)


@pytest.mark.parametrize("name", [LOCK_FILE, HISTORY_FILE])
def test_the_registry_never_writes_through_a_link_in_place_of_its_files(
    reg: ModelRegistry, tmp_path: Path, name: str
) -> None:
    reg.offer(register(reg, 1.0))
    outside = tmp_path / "outside.txt"
    outside.write_text("not the registry's")
    (reg.root / name).unlink()
    (reg.root / name).symlink_to(outside)
    with pytest.raises(ModelError, match="is a symbolic link"):
        reg.offer(register(reg, 5.0, min_age=2))
    assert outside.read_text() == "not the registry's"


@pytest.mark.parametrize("target", ["outside.json", "CHAMPION", "/dev/null", "/proc/self/fd/1"])
def test_a_symlinked_pointer_is_replaced_not_written_through(
    reg: ModelRegistry, tmp_path: Path, target: str
) -> None:
    """The pointer is the registry's own file: a link in its place is replaced by a regular
    file, and whatever the link pointed at is left alone. Fails (the last three) if the link
    is followed on the way to replacing it: a link that loops or leads to a device failed every
    run after its training, leaving a version no decision names."""
    reg.offer(register(reg, 1.0))
    outside = tmp_path / "outside.json"
    outside.write_text("not the registry's")
    (reg.root / POINTER_FILE).unlink()
    (reg.root / POINTER_FILE).symlink_to(outside if target == "outside.json" else target)
    reg.check_writable()
    v = register(reg, 5.0, min_age=2)
    assert reg.offer(v).promoted
    assert not (reg.root / POINTER_FILE).is_symlink()
    assert reg.champion_version() == v
    assert outside.read_text() == "not the registry's"


@pytest.mark.parametrize("broken", ["pointer_dir", "metadata_dir", "root_file"])
def test_directories_where_files_belong_are_model_errors(
    reg: ModelRegistry, tmp_path: Path, broken: str
) -> None:
    if broken == "root_file":
        reg.root.write_text("x")
    else:
        v = register(reg, 1.0)
        reg.offer(v)
        if broken == "pointer_dir":
            (reg.root / POINTER_FILE).unlink()
            (reg.root / POINTER_FILE).mkdir()
        else:
            (reg.root / v / METADATA_FILE).unlink()
            (reg.root / v / METADATA_FILE).mkdir()
    with pytest.raises(ModelError):
        reg.load_champion()
    if broken == "metadata_dir":  # a champion that cannot be loaded is replaced
        assert reg.offer(register(reg, 5.0, min_age=2)).promoted


def test_a_fifo_in_place_of_the_pointer_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes; the registry must not."""
    root = tmp_path / "models"
    root.mkdir()
    os.mkfifo(root / POINTER_FILE)
    code = (
        "import sys\nfrom training.registry import ModelRegistry\n"
        "from clv.errors import ModelError\n"
        f"try: ModelRegistry(__import__('pathlib').Path({str(root)!r})).load_champion()\n"
        "except ModelError as e: print(e); sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert "not a regular file" in done.stdout


#: A trainer in a process of its own: says it is ready, waits for the start signal, then
#: offers a registered version. Each decision takes a while (as loading and re-scoring the
#: champion does), so trainers without the registry's lock would all decide at once.
TRAINER = """
import sys, time
from pathlib import Path
from training.registry import ModelRegistry

root, version, start = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
reg = ModelRegistry(root)
decide = reg._decide
def slow_decide(*args, **kw):
    decision = decide(*args, **kw)
    time.sleep(0.3)
    return decision
reg._decide = slow_decide
print("ready", flush=True)
while not start.exists():
    time.sleep(0.005)
print(reg.offer(version).promoted, flush=True)
"""


def test_concurrent_trainers_decide_one_at_a_time(reg: ModelRegistry, tmp_path: Path) -> None:
    """Four trainers offer at once: each decision sees the one before it, so one of them is
    the first model, the best ends as champion whatever the order, and all are recorded."""
    start = tmp_path / "go"
    scores = [40.0, 10.0, 30.0, 20.0]
    versions = {s: register(reg, s, min_age=int(s)) for s in scores}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRAINER, str(reg.root), versions[s], str(start)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],  # this checkout's packages
        )
        for s in scores
    ]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4  # type: ignore[union-attr]
        start.touch()
        out = [p.communicate(timeout=120)[0].strip() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0, 0, 0] and len(out) == 4
    assert reg.champion_version() == versions[10.0]
    history = [json.loads(line) for line in (reg.root / HISTORY_FILE).read_text().splitlines()]
    assert sorted(h["version"] for h in history) == sorted(versions.values())
    assert sum("first model" in h["reason"] for h in history) == 1
    best_so_far = float("inf")
    for h in history:  # in the order decided: promoted exactly when better than all before
        assert h["promoted"] == (h["challenger_score"] < best_so_far), history
        best_so_far = min(best_so_far, h["challenger_score"])


def test_metadata_values_are_json_whatever_a_model_holds() -> None:
    """Model parameters of any kind go into metadata.json as JSON values (arrays as lists),
    never failing a registration that has already paid for the fit."""
    from training.registry import _clean

    class Opaque:
        def __repr__(self) -> str:
            return "Opaque()"

    class BadArray:
        def tolist(self) -> list[int]:
            raise ValueError("cannot")

        def __repr__(self) -> str:
            return "BadArray()"

    params = {
        "grid": np.array([[1, 2], [3, 4]]),
        "alpha": np.float32(0.5),
        "n": np.int64(3),
        "flag": np.bool_(True),
        "none": None,
        "estimator": Opaque(),
        "broken": BadArray(),
    }
    assert _clean(params) == {
        "grid": [[1, 2], [3, 4]],
        "alpha": 0.5,
        "n": 3,
        "flag": True,
        "none": None,
        "estimator": "Opaque()",
        "broken": "BadArray()",
    }


def _register_val(reg: ModelRegistry, val: Validation, age: int) -> str:
    return reg.register(
        HistoricalRate(age),
        data_window=WINDOW,
        validation=val,
        candidates={},
        data_fingerprint="f" * 64,
    )


def test_a_tie_on_a_higher_is_better_metric_keeps_the_champion(reg: ModelRegistry) -> None:
    """The production yardstick (the composite) is higher-is-better: a tie there keeps the
    champion too."""
    val = Validation("composite", True, 0.25, 9500, 200, data_fingerprint="d")
    reg.offer(_register_val(reg, val, 1))
    tie = reg.offer(_register_val(reg, val, 2))
    assert not tie.promoted and "not better" in tie.reason
    assert reg.offer(_register_val(reg, dataclasses.replace(val, score=0.26), 3)).promoted


def test_a_champion_without_a_score_is_replaced_by_a_scored_one_never_by_another_nan(
    reg: ModelRegistry,
) -> None:
    """NaN (nothing validated) never wins, and any finite score beats it."""
    v1 = register(reg, float("nan"), min_age=1)
    reg.offer(v1)
    assert not reg.offer(register(reg, float("nan"), min_age=2)).promoted
    assert reg.champion_version() == v1
    scored = register(reg, 1e9, min_age=3)  # however poor, a score beats none
    assert reg.offer(scored).promoted and reg.champion_version() == scored


@pytest.mark.parametrize(
    "change",
    [{"label_days": 100}, {"data_fingerprint": "another log"}, {"metric": "rmse"}],
)
def test_a_stored_score_is_compared_only_on_the_very_same_window(
    reg: ModelRegistry, change: dict[str, object]
) -> None:
    """Same train_end_day, but another label window, another event log or another metric:
    the stored scores are not comparable, so the champion is re-scored (or kept)."""
    base = dataclasses.replace(validation(100.0), data_fingerprint="d")
    v1 = _register_val(reg, base, 1)
    reg.offer(v1)
    v2 = _register_val(reg, dataclasses.replace(base, score=90.0, **change), 2)  # type: ignore[arg-type]
    kept = reg.offer(v2)
    assert not kept.promoted and "no evaluator was given" in kept.reason
    seen: list[Validation] = []

    def evaluate(champion: object, val: Validation) -> float:
        seen.append(val)
        return 80.0

    assert not reg.offer(v2, evaluate=evaluate).promoted and len(seen) == 1
    assert reg.champion_version() == v1


def test_a_version_folder_copied_under_another_name_is_refused(reg: ModelRegistry) -> None:
    v = register(reg, 1.0)
    other = "20300101T000000Z-abcdef"
    shutil.copytree(reg.root / v, reg.root / other)
    with pytest.raises(ModelError, match="metadata describes version"):
        reg.load(other)


def test_an_unknown_metadata_format_is_refused(reg: ModelRegistry) -> None:
    v = register(reg, 1.0)
    edited_metadata(reg, v, lambda meta: meta.update(format=2))  # written by a newer trainer
    with pytest.raises(ModelError, match="unknown metadata format 2"):
        reg.load(v)


def test_a_symlinked_version_folder_is_refused(reg: ModelRegistry, tmp_path: Path) -> None:
    """A version must live in the registry: a link to a folder elsewhere is not loaded."""
    v = register(reg, 1.0)
    outside = tmp_path / "elsewhere"
    shutil.move(reg.root / v, outside)
    (reg.root / v).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelError, match="is not in the registry"):
        reg.load(v)


class NotAModel:
    """Registrable (it has parameters) but no CLVModel."""

    name = "not_a_model"

    def get_params(self) -> dict[str, object]:
        return {}


def test_an_artifact_that_is_no_clv_model_is_refused(reg: ModelRegistry) -> None:
    v = reg.register(
        NotAModel(),  # type: ignore[arg-type]
        data_window=WINDOW,
        validation=validation(1.0),
        candidates={},
        data_fingerprint="x",
    )
    with pytest.raises(ModelError, match="not a CLVModel"):
        reg.load(v)


def test_a_version_folder_is_readable_as_the_umask_allows(reg: ModelRegistry) -> None:
    """The service may run as another user than the trainer (the registry must be writable by
    the trainer only, not readable by it only): a version folder gets the mode of any folder
    made under the umask, as its files and the pointer do. Fails if the staging folder's mode
    (0700, from mkdtemp) is kept: another user can read CHAMPION but no model."""
    old = os.umask(0o022)
    try:
        v = register(reg, 1.0)
    finally:
        os.umask(old)
    assert (reg.root / v).stat().st_mode & 0o777 == 0o755
    assert (reg.root / v / MODEL_FILE).stat().st_mode & 0o777 == 0o644


def test_a_model_directory_made_by_the_first_registration_is_on_disk_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLV_MODEL_DIR (default ./models) and any missing parents are made by the first
    registration. Fails if their own names are left to the page cache: a crash after `clv train`
    said "promoted to champion" could take the whole registry, pointer and all, back."""
    synced = recorded_fsyncs(monkeypatch)
    reg = ModelRegistry(tmp_path / "data" / "models")
    reg.offer(register(reg, 1.0))
    assert {str(reg.root), str(reg.root.parent), str(tmp_path)} <= set(synced)


def test_prune_keeps_the_champion_and_the_newest_versions(
    reg: ModelRegistry, minutes: list[dt.datetime]
) -> None:
    champion = register(reg, 100.0, min_age=1)
    reg.offer(champion)
    losers = [register(reg, 120.0, min_age=age) for age in range(2, 7)]
    for v in losers:
        assert not reg.offer(v).promoted
    # Fails if old versions stay (hourly retraining fills the disk), if the champion goes with
    # them because it is old, or if more than the newest go.
    assert reg.prune(2) == losers[:3]
    assert reg.versions() == [champion, *losers[3:]]
    assert reg.load_champion().version == champion
    assert [p.name for p in reg.root.iterdir() if p.name.startswith(".removing-")] == []
    assert reg.prune(2) == []  # nothing more to remove
    with pytest.raises(ValueError, match="keep at least the newest"):
        reg.prune(0)


def test_prune_leaves_a_version_not_offered_yet_for_a_day(
    reg: ModelRegistry, minutes: list[dt.datetime]
) -> None:
    first = register(reg, 100.0, min_age=1)
    reg.offer(first)
    anothers = register(reg, 90.0, min_age=2)  # another trainer's, about to be offered
    newest = register(reg, 120.0, min_age=3)
    reg.offer(newest)
    # Fails if a version that was registered but not yet offered is removed: the other
    # trainer's offer would then find no version.
    assert reg.prune(1) == []
    assert reg.offer(anothers).promoted
    old = register(reg, 130.0, min_age=4)  # never offered: a run killed before its decision
    reg.offer(register(reg, 140.0, min_age=5))
    minutes[0] += dt.timedelta(days=1)
    # A day later it is no other run's any more: removed with the old ones (not the champion).
    assert reg.prune(1) == [first, newest, old]
    assert reg.champion_version() == anothers


def test_a_version_half_removed_by_a_killed_prune_is_no_version_and_goes_next_time(
    reg: ModelRegistry, minutes: list[dt.datetime]
) -> None:
    v = register(reg, 100.0)
    reg.offer(v)
    half = reg.root / ".removing-20261129T100000Z-abcdef"  # renamed out, then killed
    (half / "deeper").mkdir(parents=True)
    (half / "deeper" / MODEL_FILE).write_bytes(b"x")
    assert reg.versions() == [v]  # out of the versions from its rename on
    # Fails if what a killed prune left is never deleted.
    assert reg.prune(5) == []
    assert not half.exists()


def test_a_version_that_cannot_be_renamed_does_not_stop_every_later_prune(
    reg: ModelRegistry, minutes: list[dt.datetime], monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = register(reg, 100.0, min_age=1)  # oldest: say, made by root in a sticky folder
    reg.offer(stuck)
    champion = register(reg, 90.0, min_age=2)
    reg.offer(champion)
    old = [register(reg, 120.0, min_age=age) for age in range(3, 6)]
    for v in old:
        reg.offer(v)
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        if Path(str(src)).name == stuck:
            raise PermissionError(1, "Operation not permitted", str(src))
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    for _ in range(3):  # every later run (clv train warns and goes on)
        try:
            reg.prune(1)
        except OSError:
            pass
    # Fails if one version that cannot be renamed ends every prune before the others go (the
    # registry grows without bound again) and before what was renamed out is deleted.
    assert reg.versions() == [stuck, champion, old[-1]]
    assert [p.name for p in reg.root.iterdir() if p.name.startswith(".removing-")] == []


def test_a_reader_that_read_the_pointer_just_before_a_promotion_loads_a_champion(
    reg: ModelRegistry, minutes: list[dt.datetime]
) -> None:
    old = register(reg, 100.0, min_age=1)
    reg.offer(old)
    reg.offer(register(reg, 120.0, min_age=2))  # a loser: the old champion is not the newest
    new = register(reg, 90.0, min_age=3)
    reader = ModelRegistry(reg.root)  # a service polling the champion, in another process
    read_pointer = reader._pointer

    def pointer_then_a_trainer_runs() -> dict[str, object] | None:
        pointer = read_pointer()
        if pointer is not None and pointer["version"] == old:
            assert reg.offer(new).promoted  # clv train: promotes, then prunes
            assert old in reg.prune(1)
        return pointer

    reader._pointer = pointer_then_a_trainer_runs  # type: ignore[method-assign]
    # Fails if a reader that read CHAMPION just before a promotion finds the version it names
    # pruned and gets an error instead of a champion (before prune it loaded the old one).
    assert reader.load_champion().version in (old, new)


def test_a_parent_the_trainer_may_pass_but_not_read_does_not_fail_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"  # say /home/alice, mode 0711, and the models the service's own
    reg = ModelRegistry(home / "models")
    reg.root.mkdir(parents=True)
    unreadable_folder(monkeypatch, home)
    reg.check_writable()
    # Fails if registering needs to open the registry's parent (it did not before the parent
    # fsync came in): every run then fails after its version is in place, with no decision.
    v = register(reg, 100.0)
    assert reg.offer(v).promoted and reg.versions() == [v]


def test_a_champion_whose_run_was_killed_before_recording_it_is_recorded_by_the_next(
    reg: ModelRegistry, minutes: list[dt.datetime]
) -> None:
    from training.registry import Decision

    first = register(reg, 100.0, min_age=1)
    reg.offer(first)
    killed = register(reg, 90.0, min_age=2)
    # A run killed outright between moving the pointer and writing its decision:
    reg._write_pointer(killed, Decision(killed, True, "mae 90 vs champion 100: better"))
    (reg.root / f".{POINTER_FILE}.0123456789abcdef.tmp").write_text("{")  # and one mid-write
    reg.offer(register(reg, 95.0, min_age=3))
    history = [json.loads(line) for line in (reg.root / HISTORY_FILE).read_text().splitlines()]
    # Fails if the history never names that champion's promotion (the audit trail would skip
    # a model that served), or names it twice.
    promoted = [d["version"] for d in history if d["promoted"]]
    assert promoted == [first, killed]
    assert "stopped before recording it" in history[1]["reason"]
    assert "mae 90 vs champion 100" in history[1]["reason"]
    reg.offer(register(reg, 99.0, min_age=4))
    assert [d["version"] for d in map(json.loads, (reg.root / HISTORY_FILE).open())].count(
        killed
    ) == 1
    # Fails if a pointer file left half-written by a killed run is never removed.
    reg.prune(10)
    assert not list(reg.root.glob(f".{POINTER_FILE}.*.tmp"))


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.pop("validation"),
        lambda m: m.update(validation=[1, 2]),
        lambda m: m["data_window"].pop("cutoff_day"),
        lambda m: m.update(data_window="1997"),
        lambda m: m.pop("model_name"),
        lambda m: m.update(candidates=None),
    ],
)
def test_metadata_without_what_the_registry_reads_is_refused_and_replaced(
    reg: ModelRegistry, edit: Callable[[dict[str, Any]], None]
) -> None:
    # Fails if metadata() checks only its hashes, format, version and feature names: a
    # champion whose metadata (hashes made to match) lacks its validation record loaded, and
    # every training run then died on a KeyError after registering (a version, no decision).
    v = register(reg, 1.0)
    reg.offer(v)
    raw = edited_metadata(reg, v, edit)
    pointer = json.loads((reg.root / POINTER_FILE).read_text())
    pointer["metadata_file_sha256"] = hashlib.sha256(raw).hexdigest()
    (reg.root / POINTER_FILE).write_text(json.dumps(pointer))
    with pytest.raises(ModelError, match=f"model {v}: metadata.json.*refusing to load"):
        load_champion(reg.root)
    challenger = register(reg, 5.0, min_age=2)
    decision = reg.offer(challenger)
    assert decision.promoted and reg.champion_version() == challenger
