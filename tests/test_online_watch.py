"""``cmdtool watch``: follow a folder while a (simulated) training job writes into it.

Real processes, real files: ``tests/slow_writer.py`` copies finished checkpoints into the
watched folder slowly, one of them in two halves, straight to the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from cmdtool.errors import CheckpointError, CmdtoolError, SourceNotFoundError, UsageError
from cmdtool.ingestion import ingest
from cmdtool.online.watch import WatchEvent, check_file, watch
from cmdtool.store import RESULT_ATTR, TrajectoryStore
from tests.conftest import (
    REPO,
    n_modeled,
    planted,
    run_cli,
    state_dicts,
    to_store_order,
    write_run,
)

WRITER = REPO / "tests" / "slow_writer.py"
FIT = {"n_modes": 3, "n_samples": 300}  # small fits for the 3,224-parameter planted model
FIT_ARGS = ["--modes", "3", "--samples", "300"]


def _name(label: int) -> str:
    return f"epoch_{label}.safetensors"


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """8 finished checkpoints in a staging folder; returns (staging, W float64 (N, 8))."""
    staging = tmp_path_factory.mktemp("watch") / "staging"
    w, _, _ = planted(n_modeled(), 8, 3, seed=11)
    write_run(staging, state_dicts(w))
    return staging, w


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200"}


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "cmdtool", "watch", *map(str, args)]


def _writer(staging: Path, dest: Path, labels: list[int], *opts: str) -> list[str]:
    names = [_name(k) for k in labels]
    return [sys.executable, str(WRITER), str(staging), str(dest), *names, *opts]


def _check_store(store: Path, staging: Path, w: np.ndarray, labels: list[int]) -> None:
    """The store holds exactly ``labels`` in order, each row the checkpoint's values;
    read both with plain zarr and with TrajectoryStore."""
    group = zarr.open_group(store, mode="r")
    meta = group.attrs["cmdtool"]
    assert [e["label"] for e in meta["epochs"]] == labels
    params = sorted(meta["params"], key=lambda p: p["offset"])
    weights = group["weights"]
    assert weights.shape == (len(labels), n_modeled())
    with TrajectoryStore.open(store, mode="r") as st:
        assert st.labels == labels and st.n_epochs == len(labels)
        block = st.read_block(np.arange(len(labels)), 0, st.n_params)
    for row, label in enumerate(labels):
        sd = load_file(staging / _name(label))
        expected = np.concatenate([sd[p["name"]].reshape(-1).numpy() for p in params])
        np.testing.assert_array_equal(weights[row], expected)
        np.testing.assert_array_equal(block[row], expected)
        np.testing.assert_allclose(
            expected, to_store_order(w[:, label - 1], params), rtol=1e-6, atol=1e-6
        )


def _result_attrs(store: Path, name: str = "cmd") -> dict:
    return dict(zarr.open_group(store, mode="r")[name].attrs[RESULT_ATTR])


# ------------------------------------------------------------------- end to end


def test_watch_follows_a_slow_writer(run8, tmp_path):
    staging, w = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    source.mkdir()
    # idle stop 2 s: longer than the writer's longest stall (epoch 3's halves, 2 x 0.6 s)
    cmd = _cli(source, store, "--warmup", "4", "--interval", "0.1", "--until-idle", "2")
    watcher = subprocess.Popen(
        [*cmd, *FIT_ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(watcher.stderr or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("waiting for checkpoints" in e for e in errors):  # its first look
            assert watcher.poll() is None, "".join(errors)
            assert time.monotonic() < deadline, "the watcher never looked at the folder"
            time.sleep(0.05)
        # epoch 3 in two halves, epoch 4 written in full between them
        split = ["--pause", "0.3", "--split", _name(3), "--split-pause", "0.6"]
        writer = subprocess.run(_writer(staging, source, list(range(1, 9)), *split), timeout=60)
        assert writer.returncode == 0
        stdout, _ = watcher.communicate(timeout=120)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    reader.join(timeout=10)
    assert watcher.returncode == 0, "".join(errors)

    lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert [int(line.split()[1]) for line in lines] == list(range(1, 9))  # one live line each
    assert all("warm-up" in line for line in lines[:3])
    assert "decomposed" in lines[3] and all("rel.err" in line for line in lines[3:])
    assert "watched" in stdout and "+8 epoch(s)" in stdout

    _check_store(store, staging, w, list(range(1, 9)))
    attrs = _result_attrs(store)
    assert attrs["epochs"] == list(range(1, 9)) and attrs["n_modes"] >= 1


def test_a_file_that_never_completes_is_exit_4_naming_it(run8, tmp_path):
    staging, w = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    source.mkdir()
    # the job writes epochs 1-3, then dies half-way through epoch 4
    writer = subprocess.Popen(
        _writer(staging, source, [1, 2, 3, 4], "--pause", "0.1", "--stop-at", _name(4))
    )
    args = ["--warmup", "5", "--interval", "0.1", "--until-idle", "1.5", *FIT_ARGS]
    r = run_cli("watch", source, store, *args, env=_env(), timeout=120)  # forked: no Popen needed
    assert writer.wait(timeout=60) == 0
    assert r.returncode == 4, r.stderr
    size = (source / _name(4)).stat().st_size
    full = (staging / _name(4)).stat().st_size
    message = r.stderr.strip()
    assert message.startswith("error:") and len(message.splitlines()) == 1
    assert f"{source / _name(4)} never completed: {size} bytes, the header says {full}" in message
    assert "(waited" in message
    _check_store(store, staging, w, [1, 2, 3])  # the complete epochs before it, no more


def test_source_removed_while_watching_is_exit_3_and_the_store_is_consistent(run8, tmp_path):
    staging, w = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    source.mkdir()
    for k in (1, 2):
        shutil.copy(staging / _name(k), source / _name(k))
    watcher = subprocess.Popen(
        _cli(source, store, "--warmup", "3", "--interval", "0.1", *FIT_ARGS),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert watcher.poll() is None, watcher.communicate()[1]
            assert time.monotonic() < deadline, "the watcher never ingested the two epochs"
            try:
                with TrajectoryStore.open(store, mode="r") as st:
                    if st.labels == [1, 2]:
                        break
            except CmdtoolError:  # not created yet
                pass
            time.sleep(0.05)
        shutil.rmtree(source)
        _, stderr = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 3, stderr
    assert f"source folder {source} disappeared while watching" in stderr
    assert "the store holds epochs 1..2" in stderr
    _check_store(store, staging, w, [1, 2])


def test_ctrl_c_exits_130_and_leaves_a_consistent_store(run8, tmp_path):
    staging, w = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    source.mkdir()
    for k in (1, 2, 3):
        shutil.copy(staging / _name(k), source / _name(k))
    watcher = subprocess.Popen(
        _cli(source, store, "--warmup", "3", "--interval", "0.1", "--json", *FIT_ARGS),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    guard = threading.Timer(120, watcher.kill)  # readline() below has no timeout
    guard.start()
    try:
        assert watcher.stdout is not None
        for _ in range(3):  # JSON Lines arrive live, one per epoch
            event = json.loads(watcher.stdout.readline())
        assert event == {**event, "type": "epoch", "label": 3, "phase": "decomposed"}
        watcher.send_signal(signal.SIGINT)
        _, stderr = watcher.communicate(timeout=60)
    finally:
        guard.cancel()
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 130, stderr
    assert "interrupted" in stderr
    _check_store(store, staging, w, [1, 2, 3])
    assert _result_attrs(store)["epochs"] == [1, 2, 3]
    assert not (store / ".cmdtool-lock").exists()


def test_a_hugging_face_folder_still_being_written_is_waited_for(run8, tmp_path):
    staging, _ = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    for k in (1, 2):
        (source / f"checkpoint-{k}").mkdir(parents=True)
        shutil.copy(staging / _name(k), source / f"checkpoint-{k}" / "model.safetensors")
    (source / "checkpoint-3").mkdir()  # the Trainer has made the folder, no weights yet
    (source / "checkpoint-3" / "config.json").write_text("{}")
    notices: list[str] = []
    with pytest.raises(CheckpointError, match="checkpoint-3 holds no model weights"):
        watch(source, store, warmup=3, interval=0.05, until_idle=0.4, on_notice=notices.append)
    assert len(notices) == 1 and notices[0].startswith("waiting: ")
    assert not store.exists()  # nothing ingested while the folder cannot be listed

    shutil.copy(staging / _name(3), source / "checkpoint-3" / "model.safetensors")
    s = watch(source, store, warmup=3, interval=0.05, until_idle=0.4, **FIT)
    assert s.added == [1, 2, 3] and s.decomposed


# ---------------------------------------------------------------------- settings


def test_warmup_below_3_is_exit_2_before_anything_happens(run8, tmp_path):
    staging, _ = run8
    store = tmp_path / "store.zarr"
    r = run_cli("watch", staging, store, "--warmup", "2", env=_env())
    assert r.returncode == 2, r.stderr
    assert "warmup=2 must be >= 3" in r.stderr
    assert not store.exists()


def test_bad_settings_and_missing_source_fail_before_anything_is_written(run8, tmp_path):
    staging, _ = run8
    store = tmp_path / "store.zarr"
    for bad in ({"interval": 0}, {"interval": -1.0}, {"until_idle": 0}, {"n_modes": 0}):
        with pytest.raises(UsageError) as info:
            watch(staging, store, **bad)  # type: ignore[arg-type]
        assert info.value.exit_code == 2
    with pytest.raises(SourceNotFoundError, match="checkpoint folder not found") as missing:
        watch(tmp_path / "nowhere", store, interval=0.05, until_idle=0.2)
    assert missing.value.exit_code == 3
    assert not store.exists()


def test_warmup_longer_than_the_run_is_exit_2_at_the_idle_stop(run8, tmp_path):
    staging, w = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    source.mkdir()
    for k in (1, 2, 3):
        shutil.copy(staging / _name(k), source / _name(k))
    events: list[WatchEvent] = []
    with pytest.raises(UsageError) as info:
        watch(source, store, warmup=5, interval=0.05, until_idle=0.5, on_epoch=events.append)
    assert info.value.exit_code == 2
    assert str(info.value) == (
        "warm-up 5 is longer than the run: only 3 epochs arrived; lower --warmup"
    )
    assert [(e.label, e.phase, e.n_epochs) for e in events] == [
        (1, "warmup", 1),
        (2, "warmup", 2),
        (3, "warmup", 3),
    ]
    _check_store(store, staging, w, [1, 2, 3])  # the epochs stay; nothing else was written
    assert zarr.open_group(store, mode="r").attrs["cmdtool"]["epochs"][-1]["label"] == 3
    assert "cmd" not in zarr.open_group(store, mode="r")


def test_an_empty_folder_is_waited_for(tmp_path):
    source = tmp_path / "run"
    source.mkdir()
    notices: list[str] = []
    with pytest.raises(SourceNotFoundError, match="no checkpoint arrived"):
        watch(source, tmp_path / "s.zarr", interval=0.05, until_idle=0.3, on_notice=notices.append)
    assert len(notices) == 1 and "waiting for checkpoints" in notices[0]
    assert not (tmp_path / "s.zarr").exists()


# ------------------------------------------------------------------------ resume


def test_resumed_watch_adds_each_epoch_once_and_updates_the_decomposition(run8, tmp_path):
    staging, w = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    source.mkdir()
    for k in range(1, 6):
        shutil.copy(staging / _name(k), source / _name(k))

    stop = threading.Event()
    first: list[WatchEvent] = []

    def on_epoch(event: WatchEvent) -> None:
        first.append(event)
        if event.label == 5:
            stop.set()

    s1 = watch(source, store, warmup=4, interval=0.05, on_epoch=on_epoch, stop=stop, **FIT)
    assert s1.stopped == "stop" and s1.added == [1, 2, 3, 4, 5] and s1.decomposed
    assert [e.phase for e in first] == ["warmup"] * 3 + ["decomposed", "updated"]
    assert first[3].n_modes == s1.n_modes and first[4].relative_error == s1.relative_error
    assert _result_attrs(store)["epochs"] == [1, 2, 3, 4, 5]

    for k in range(6, 9):  # the job goes on while nobody watches
        shutil.copy(staging / _name(k), source / _name(k))
    second: list[WatchEvent] = []
    s2 = watch(source, store, warmup=4, interval=0.05, until_idle=0.5, on_epoch=second.append)
    assert s2.stopped == "idle" and s2.added == [6, 7, 8] and s2.n_epochs == 8
    assert [(e.label, e.phase) for e in second] == [(6, "updated"), (7, "updated"), (8, "updated")]
    _check_store(store, staging, w, list(range(1, 9)))
    attrs = _result_attrs(store)
    assert attrs["epochs"] == list(range(1, 9)) and attrs["relative_error"] == pytest.approx(
        s2.relative_error
    )

    s3 = watch(source, store, warmup=4, interval=0.05, until_idle=0.3)  # nothing new
    assert s3.added == [] and s3.n_epochs == 8 and s3.decomposed
    _check_store(store, staging, w, list(range(1, 9)))


def test_a_store_already_past_the_warmup_is_decomposed_then_updated(run8, tmp_path):
    staging, _ = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    source.mkdir()
    for k in range(1, 7):
        shutil.copy(staging / _name(k), source / _name(k))
    ingest(source, store, readers=0)
    events: list[WatchEvent] = []
    s = watch(source, store, warmup=4, interval=0.05, until_idle=0.3, on_epoch=events.append, **FIT)
    assert s.added == [] and s.decomposed
    assert [(e.label, e.phase) for e in events] == [(6, "decomposed")]
    assert _result_attrs(store)["epochs"] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------ the checker


def _sd() -> dict[str, torch.Tensor]:
    w, _, _ = planted(n_modeled(), 1, 1, seed=2)
    return state_dicts(w)[0]


def test_check_file_safetensors_truncated_anywhere_is_incomplete(tmp_path):
    full = tmp_path / "full.safetensors"
    save_file(_sd(), str(full))
    data = full.read_bytes()
    n = int.from_bytes(data[:8], "little")
    check = check_file(full)
    assert check.complete is True and check.expected == len(data) and check.problem == ""
    part = tmp_path / "part.safetensors"
    for cut in (0, 5, 8, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, (8 + n + len(data)) // 2):
        part.write_bytes(data[:cut])
        check = check_file(part)
        assert check.complete is False, cut
        assert check.size == cut and str(cut) in check.problem
        if cut >= 8 + n:
            assert check.expected == len(data)
            assert check.problem == f"{cut} bytes, the header says {len(data)}"
    part.write_bytes(data[:-1])
    assert check_file(part).complete is False
    part.write_bytes(data + b"\0")  # longer than its header says
    assert check_file(part).complete is False
    part.write_bytes(data)
    assert check_file(part).complete is True


def test_check_file_torch_zip_truncated_is_incomplete_pickle_has_no_verdict(tmp_path):
    full = tmp_path / "full.pt"
    torch.save(_sd(), full)
    data = full.read_bytes()
    assert data[:2] == b"PK"
    assert check_file(full).complete is True
    part = tmp_path / "part.pt"
    for cut in (0, 3, 100, len(data) // 2, len(data) - 200, len(data) - 22, len(data) - 1):
        part.write_bytes(data[:cut])
        assert check_file(part).complete is False, cut
    legacy = tmp_path / "legacy.pt"
    torch.save(_sd(), legacy, _use_new_zipfile_serialization=False)
    assert check_file(legacy).complete is None  # only the settle rule can tell


# ------------------------------------------- complete files, changes after ingest (issue 11)


def _labels_in(store: Path) -> list[int]:
    """The store's committed labels, read with plain zarr ([] before it exists)."""
    try:
        return [e["label"] for e in zarr.open_group(store, mode="r").attrs["cmdtool"]["epochs"]]
    except Exception:  # not created yet
        return []


def _wait_for(what: str, ok, watcher: subprocess.Popen[str] | None, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not ok():
        assert watcher is None or watcher.poll() is None, f"the watcher exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _preallocate(staging: Path, dest: Path, label: int) -> bytes:
    """Write a safetensors file as a pre-allocating writer does: the header, then the full
    size in zeros; the data comes later (:func:`_fill`). Returns the finished bytes."""
    data = (staging / _name(label)).read_bytes()
    head = 8 + int.from_bytes(data[:8], "little")
    with (dest / _name(label)).open("wb") as fh:
        fh.write(data[:head])
        fh.truncate(len(data))
    return data


def _fill(dest: Path, label: int, data: bytes) -> None:
    head = 8 + int.from_bytes(data[:8], "little")
    with (dest / _name(label)).open("r+b") as fh:
        fh.seek(head)
        fh.write(data[head:])


def _row(store: Path, label: int) -> np.ndarray:
    group = zarr.open_group(store, mode="r")
    row = [e["label"] for e in group.attrs["cmdtool"]["epochs"]].index(label)
    return np.asarray(group["weights"][row])


def _expected_row(store: Path, path: Path) -> np.ndarray:
    meta = zarr.open_group(store, mode="r").attrs["cmdtool"]
    params = sorted(meta["params"], key=lambda p: p["offset"])
    sd = load_file(path)
    return np.concatenate([sd[p["name"]].reshape(-1).numpy() for p in params])


def _reference_fit(tmp_path: Path, files: Path, window: str) -> dict[str, np.ndarray]:
    """The decomposition of a clean copy of ``files`` (ingest, fit over ``window``, update):
    what the watch must end with."""
    from cmdtool.decomposition import CMD
    from cmdtool.decomposition.update import update

    clean = tmp_path / "reference.zarr"
    ingest(files, clean, readers=0)
    CMD(3, n_samples=300, seed=0, device="cpu", epochs=window).fit(clean)
    update(clean, "cmd")
    group = zarr.open_group(clean, mode="r")["cmd"]
    return {k: np.asarray(group[k][:]) for k in ("labels", "a", "b")}


def _assert_same_fit(store: Path, reference: dict[str, np.ndarray], epochs: list[int]) -> None:
    group = zarr.open_group(store, mode="r")["cmd"]
    assert group.attrs[RESULT_ATTR]["epochs"] == epochs
    np.testing.assert_array_equal(np.asarray(group["labels"][:]), reference["labels"])
    for key in ("a", "b"):
        np.testing.assert_allclose(np.asarray(group[key][:]), reference[key], rtol=1e-5, atol=1e-6)


def test_preallocated_files_are_ingested_complete_and_a_later_fill_is_noticed(run8, tmp_path):
    # guards: sources.Settling (--settle), Watcher._recheck + _ingest_again (roll back, redo)
    staging, _ = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    source.mkdir()
    for k in (1, 2, 3):
        shutil.copy(staging / _name(k), source / _name(k))
    # --settle 2: over 3 x the 0.6 s stall of epoch 4; the idle stop needs no more than
    # --settle (a complete file waiting out its settle time holds it off)
    args = ["--warmup", "3", "--interval", "0.1", "--settle", "2", "--until-idle", "2", "--json"]
    watcher = subprocess.Popen(
        [*_cli(source, store, *args), *FIT_ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        decomposed = lambda: _labels_in(store) == [1, 2, 3] and (store / "cmd").exists()  # noqa: E731
        _wait_for("epochs 1-3", decomposed, watcher)
        # epoch 4: header written, data not yet; the writer stalls for 6 intervals, < --settle
        data4 = _preallocate(staging, source, 4)
        time.sleep(0.6)
        assert _labels_in(store) == [1, 2, 3], "a pre-allocated file was ingested as zeros"
        _fill(source, 4, data4)
        _wait_for("epoch 4", lambda: _labels_in(store) == [1, 2, 3, 4], watcher)
        np.testing.assert_array_equal(_row(store, 4), _expected_row(store, staging / _name(4)))
        # epoch 5: the writer stalls for longer than --settle: ingested as zeros, then filled
        data5 = _preallocate(staging, source, 5)
        _wait_for("epoch 5", lambda: _labels_in(store) == [1, 2, 3, 4, 5], watcher)
        assert not _row(store, 5).any()  # what a stall longer than --settle gives at first
        _fill(source, 5, data5)
        stdout, stderr = watcher.communicate(timeout=120)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, stderr
    assert "warning: epoch_5.safetensors changed after it was ingested as epoch 5" in stderr
    assert "epoch 5 rolled back; ingesting epoch_5.safetensors again" in stderr
    events = [json.loads(line) for line in stdout.splitlines()]
    assert [e["label"] for e in events if e["type"] == "epoch"] == [1, 2, 3, 4, 5, 5]
    assert _labels_in(store) == [1, 2, 3, 4, 5]
    _check_store(store, staging, run8[1], [1, 2, 3, 4, 5])  # every row as in its file
    _assert_same_fit(store, _reference_fit(tmp_path, source, "1:4"), [1, 2, 3, 4, 5])


def test_older_renamed_and_changed_files_are_notices_and_watching_goes_on(run8, tmp_path):
    # guards: Watcher._skip (older epoch, renamed file by sha256), Watcher._recheck (warning)
    staging, w = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    source.mkdir()
    for k in (1, 2, 3, 5):
        shutil.copy(staging / _name(k), source / _name(k))
    args = ["--warmup", "3", "--interval", "0.1", "--settle", "0.3", "--until-idle", "2"]
    watcher = subprocess.Popen(
        [*_cli(source, store, *args), *FIT_ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        _wait_for("epochs 1-5", lambda: _labels_in(store) == [1, 2, 3, 5], watcher)
        shutil.copy(staging / _name(4), source / _name(4))  # late: older than epoch 5
        os.replace(source / _name(5), source / "epoch_9.safetensors")  # renamed
        shutil.copy(staging / _name(7), source / _name(2))  # epoch 2 rewritten
        shutil.copy(staging / _name(6), source / _name(6))  # and training goes on
        stdout, stderr = watcher.communicate(timeout=120)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, stderr
    assert (
        "epoch_4.safetensors: epoch 4 is older than the store's last epoch 5; cmdtool only "
        "appends, so it is not ingested" in stderr
    )
    assert (
        "epoch_9.safetensors holds the contents of epoch 5 (epoch_5.safetensors, no longer "
        "there): a renamed checkpoint, not ingested again" in stderr
    )
    assert "warning: epoch_2.safetensors changed after it was ingested as epoch 2" in stderr
    assert "the store keeps the values ingested then" in stderr
    lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert [int(line.split()[1]) for line in lines] == [1, 2, 3, 5, 6]
    group = zarr.open_group(store, mode="r")
    params = sorted(group.attrs["cmdtool"]["params"], key=lambda p: p["offset"])
    for row, label in enumerate([1, 2, 3, 5, 6]):  # epoch 2 as it was ingested
        np.testing.assert_allclose(
            group["weights"][row], to_store_order(w[:, label - 1], params), rtol=1e-6, atol=1e-6
        )
    assert group["cmd"].attrs[RESULT_ATTR]["epochs"] == [1, 2, 3, 5, 6]


def test_a_changed_epoch_inside_the_warmup_is_fitted_again(run8, tmp_path):
    # guards: Watcher._ingest_again (the decomposition is removed, then fitted again)
    staging, w = run8
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    source.mkdir()
    for k in (1, 2, 3):
        shutil.copy(staging / _name(k), source / _name(k))
    data4 = _preallocate(staging, source, 4)  # stalls past --settle: ingested as zeros
    events: list[WatchEvent] = []
    notices: list[str] = []
    stop = threading.Event()

    def on_epoch(event: WatchEvent) -> None:
        events.append(event)
        if len(events) == 5:
            stop.set()

    thread = threading.Thread(
        target=watch,
        args=(source, store),
        kwargs=dict(
            warmup=4,
            interval=0.05,
            settle=0.2,
            on_epoch=on_epoch,
            on_notice=notices.append,
            stop=stop,
            **FIT,
        ),
    )
    thread.start()
    try:
        _wait_for("epoch 4", lambda: len(events) == 4, None)
        assert events[3].label == 4 and events[3].phase == "decomposed"
        assert not _row(store, 4).any()
        _fill(source, 4, data4)
        thread.join(timeout=120)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert [(e.label, e.phase) for e in events][3:] == [(4, "decomposed"), (4, "decomposed")]
    assert any(n.startswith("warning: epoch_4.safetensors changed after it was") for n in notices)
    _check_store(store, staging, w, [1, 2, 3, 4])
    ref = _reference_fit(tmp_path, source, "1:5")
    _assert_same_fit(store, ref, [1, 2, 3, 4])


def test_settling_states(tmp_path):
    from cmdtool.checkpoints import CheckpointEntry
    from cmdtool.online.sources import Settling

    path = tmp_path / "epoch_1.pt"
    torch.save({"w": torch.ones(3)}, path)
    entry = CheckpointEntry(1, path, (path,), "torch")
    settling = Settling(1.0)
    assert settling.state(entry, now=100.0) == "settling"  # first look: complete, not settled
    assert settling.state(entry, now=100.5) == "settling"
    assert settling.state(entry, now=101.0) == "ready"
    data = path.read_bytes()
    path.write_bytes(data[:-30])  # rewritten in place, cut short
    assert settling.state(entry, now=101.1) == "incomplete"
    path.write_bytes(data)
    os.utime(path, ns=(1, 1))
    assert settling.state(entry, now=101.2) == "changing"
    assert settling.state(entry, now=102.1) == "settling"
    assert settling.state(entry, now=102.2) == "ready"
    assert Settling(0).state(CheckpointEntry(1, path, (path,), "torch"), now=5.0) == "ready"
