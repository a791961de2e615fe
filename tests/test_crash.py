"""Crash safety: killed and failing writers never leave a half epoch or a half result."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from safetensors.torch import load_file

from cmdtool.decomposition import CMD
from cmdtool.errors import StoreError
from cmdtool.ingestion import ingest
from cmdtool.store import TrajectoryStore
from cmdtool.store.lock import LOCK_NAME
from tests.conftest import REPO, n_modeled, planted, state_dicts, tree_digest, write_run

RUNNER = REPO / "tests" / "fault_runner.py"
CHUNK = 1024  # rows of 4 chunks in these small stores
EPOCHS = 5


def fresh_runner(mode: str, k: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``tests/fault_runner.py`` as a fresh interpreter (the fork server's reference)."""
    return subprocess.run(
        [sys.executable, str(RUNNER), mode, str(k), str(CHUNK), "--", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def runner(fault_server):
    """The same command line run in a child of the fork server (a real process that a
    real SIGKILL ends at its k-th write), without a new interpreter's start per kill."""

    def run(mode: str, k: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return fault_server.run(mode, k, CHUNK, *args, cwd=REPO)

    return run


@pytest.fixture(scope="module")
def source(tmp_path_factory, runner):
    """A 5-epoch run and a store holding its first 2 epochs (chunk width 1024)."""
    base = tmp_path_factory.mktemp("crash")
    w, _, _ = planted(n_modeled(), EPOCHS, 3, seed=4)
    sds = state_dicts(w)
    write_run(base / "first", sds[:2])
    write_run(base / "run", sds)
    r = runner("count", 0, "ingest", base / "first", base / "store")
    assert r.returncode == 0, r.stderr
    assert zarr.open_group(base / "store", mode="r")["weights"].chunks == (1, CHUNK)
    r = runner("count", 0, "ingest", base / "run", base / "full")
    total = int(r.stderr.strip().rsplit("writes=", 1)[1])
    # a forked child makes the very writes a fresh interpreter makes: the kill points
    # counted below are the command line's own
    r = fresh_runner("count", 0, "ingest", base / "run", base / "fresh")
    assert r.returncode == 0, r.stderr
    assert int(r.stderr.strip().rsplit("writes=", 1)[1]) == total
    assert tree_digest(base / "fresh") == tree_digest(base / "full")
    return base, sds, total


def _each_write_failing(monkeypatch, err: OSError, action):
    """Run ``action()`` with the n-th zarr write raising ``err``, for n = 1, 2, ... until
    it succeeds; after each failure (writes restored) yield n to the caller's checks."""
    original = zarr.storage.LocalStore.set
    n = 0
    while True:
        n += 1
        calls = {"n": 0}

        async def failing_set(self, key, value, calls=calls, n=n):
            calls["n"] += 1
            if calls["n"] == n:
                raise err
            await original(self, key, value)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
        try:
            action()
            failed = None
        except StoreError as exc:
            failed = exc
        finally:
            monkeypatch.setattr(zarr.storage.LocalStore, "set", original)
        if failed is None:
            return
        assert str(err.strerror) in str(failed)
        yield n


def _rows_match_sources(store: Path, sds) -> int:
    """Check every committed row equals its source checkpoint bit for bit; return T."""
    st = TrajectoryStore.open(store)
    for row, epoch in enumerate(st.epochs):
        sd = sds[epoch.label - 1]
        values = st.read_block(np.array([row]), 0, st.n_params)[0]
        for p in st.params:
            want = sd[p.name].reshape(-1).to(torch.float32).numpy()
            assert np.array_equal(values[p.offset : p.offset + p.size], want), (row, p.name)
        raw = np.frombuffer(st.read_extras(row), dtype="<i8")
        assert raw.tolist() == [int(sd["bn.num_batches_tracked"])]
    return st.n_epochs


def test_sigkill_after_every_write_then_resume(source, runner, tmp_path):
    # guards: the commit order in ingest._append / store.commit_epoch, and store._recover
    base, sds, _ = source
    shutil.copytree(base / "store", tmp_path / "probe")
    r = runner("count", 0, "ingest", base / "run", tmp_path / "probe")
    appended_writes = int(r.stderr.strip().rsplit("writes=", 1)[1])
    seen_counts = set()
    for k in range(1, appended_writes + 1):
        store = tmp_path / f"s{k}"
        shutil.copytree(base / "store", store)
        r = runner("kill", k, "ingest", base / "run", store)
        assert r.returncode == -9, (k, r.stderr)
        committed = _rows_match_sources(store, sds)  # a reader sees whole epochs only
        assert 2 <= committed <= EPOCHS
        seen_counts.add(committed)
        if committed >= 3 and k % 3 == 0:  # decompose sees exactly the committed epochs
            model = CMD(2, n_samples=200).fit(store)
            assert len(model.window_rows_) == committed
        ingest(base / "run", store)  # resume: takes over the stale lock, drops leftovers
        assert _rows_match_sources(store, sds) == EPOCHS
        assert not list(store.rglob("*.partial")), k
        assert not (store / LOCK_NAME).exists()
        assert zarr.open_group(store, mode="r")["weights"].shape[0] == EPOCHS
    assert seen_counts == {2, 3, 4, 5}  # kills landed before, inside and after every epoch


def test_io_error_on_every_write_leaves_store_as_it_was(source, tmp_path, monkeypatch):
    # guards: store.abort_epoch() in ingest._append and the OSError -> StoreError wrapping
    base, sds, _ = source
    store = tmp_path / "s"
    shutil.copytree(base / "store", store)
    # the copy was made by the runner with CHUNK=1024; appending keeps its chunking
    before = tree_digest(store)
    n = 0
    nospace = OSError(errno.ENOSPC, "No space left on device")
    for n in _each_write_failing(monkeypatch, nospace, lambda: ingest(base / "run", store)):
        # a failing call never keeps an epoch: the store is byte for byte as it was
        assert tree_digest(store) == before, n
        assert _rows_match_sources(store, sds) == 2, n
    assert n > 10
    assert _rows_match_sources(store, sds) == EPOCHS


def test_io_error_on_the_first_epoch_removes_the_new_store(source, tmp_path, monkeypatch):
    base, _, _ = source
    original = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def failing_set(self, key, value):
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(errno.EIO, "Input/output error")
        await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    with pytest.raises(StoreError, match="Input/output error"):
        ingest(base / "run", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_killed_decompose_keeps_the_previous_result(source, runner, tmp_path):
    # guards: begin_result/publish_result (hidden partial group, renamed when complete)
    base, _, _ = source
    store = tmp_path / "s"
    shutil.copytree(base / "full", store)
    first = CMD(2, n_samples=200).fit(store)
    labels = first.labels_
    r = runner("count", 0, "decompose", store, "--modes", "3", "--samples", "300")
    writes = int(r.stderr.strip().rsplit("writes=", 1)[1])
    CMD(2, n_samples=200).fit(store)  # back to the 2-mode result
    for k in range(1, writes + 1, 2):
        r = runner("kill", k, "decompose", store, "--modes", "3", "--samples", "300")
        assert r.returncode == -9, k
        model = CMD.load(store)  # always a complete result, old or new
        assert model.n_modes_ in (2, 3), k
        if model.n_modes_ == 2:
            assert np.array_equal(model.labels_, labels)
        else:
            assert len(model.labels_) == n_modeled()
    # the last kill lands after the final zarr write, before the publishing rename
    CMD(3, n_samples=300).fit(store)
    assert CMD.load(store).n_modes_ == 3
    assert not list(store.glob(".partial-*"))


def test_publish_interrupted_between_renames_is_recovered(source, tmp_path):
    # guards: the ".old" fallback in open_result and its restore in store._recover
    base, _, _ = source
    store = tmp_path / "s"
    shutil.copytree(base / "full", store)
    CMD(2, n_samples=200).fit(store)
    (store / "cmd").rename(store / ".partial-cmd.old")  # state after the first rename
    assert CMD.load(store).n_modes_ == 2  # readers still find it
    TrajectoryStore.open(store, mode="r+").close()  # a writer restores it
    assert (store / "cmd" / "zarr.json").is_file()


def test_killed_reconstruct_leaves_no_truncated_file(source, tmp_path, fault_server):
    # guards: reconstruct._atomic_write (temporary name, then rename)
    base, _, _ = source
    store = tmp_path / "s"
    shutil.copytree(base / "full", store)
    CMD(2, n_samples=200).fit(store)
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "import safetensors.torch as st\n"
        "import cmdtool.reconstruction.write as rc\n"
        "def dying(tensors, path, *a, **k):\n"
        "    with open(path, 'wb') as f:\n"
        "        f.write(b'half a file')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "rc.save_file = dying\n"
        f"rc.reconstruct({str(store)!r}, {str(out)!r}, epochs='all')\n"
    )
    # `python -c code` in a child of the fork server (the planted save_file is the child's)
    r = fault_server.run("python", 0, 0, code, cwd=REPO, timeout=120)
    assert r.returncode == -9, r.stderr
    assert not list(out.glob("epoch_*"))
    from cmdtool.reconstruction import reconstruct

    reconstruct(store, out, epochs="all")
    assert sorted(p.name for p in out.glob("epoch_*")) == [
        f"epoch_{i}.safetensors" for i in range(1, EPOCHS + 1)
    ]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert set(load_file(out / "epoch_3.safetensors")) == set(
        state_dicts(np.zeros((n_modeled(), 1)))[0]
    )


def test_io_error_on_every_result_write_keeps_the_previous_result(source, tmp_path, monkeypatch):
    # guards: the OSError -> StoreError wrapping and discard_result in CMD._fit
    base, _, _ = source
    store = tmp_path / "s"
    shutil.copytree(base / "full", store)
    first = CMD(2, n_samples=200).fit(store)
    labels = first.labels_
    n = 0
    eio = OSError(errno.EIO, "Input/output error")
    for n in _each_write_failing(monkeypatch, eio, lambda: CMD(3, n_samples=300).fit(store)):
        kept = CMD.load(store)
        assert kept.n_modes_ == 2 and np.array_equal(kept.labels_, labels), n
        # a write zarr still had in flight may land after the cleanup; readers ignore
        # it and the next writer removes it
        TrajectoryStore.open(store, mode="r+").close()
        assert not list(store.glob(".partial-*"))
    assert n > 5 and CMD.load(store).n_modes_ == 3


def test_sigkill_at_every_write_of_store_creation_then_ingest_resumes(
    source, runner, tmp_path, monkeypatch
):
    # guards: TrajectoryStore.create building the store under a hidden name and renaming
    # it into place, and cleanup.remove_abandoned_creations (issue 11)
    from cmdtool.ingestion import create_store
    from cmdtool.store.cleanup import CREATING

    base, _, _ = source
    reference = tree_digest(base / "store")  # `ingest first store`, never interrupted
    with TrajectoryStore.open(base / "store") as st:
        params, extras = st.params, st.extras
    original = zarr.storage.LocalStore.set
    writes = {"n": 0}

    async def counting_set(self, key, value):
        writes["n"] += 1
        await original(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counting_set)
    create_store(tmp_path / "count", params, extras).close()
    monkeypatch.setattr(zarr.storage.LocalStore, "set", original)
    creation = writes["n"]
    assert creation >= 5
    monkeypatch.setattr("cmdtool.store.trajectory.CHUNK", CHUNK)  # as the runner's
    for k in range(1, creation + 2):  # every write of creation, then the first after it
        target = tmp_path / f"s{k}"
        r = runner("kill", k, "ingest", base / "first", target)
        assert r.returncode == -9, (k, r.stderr)
        hidden = list(tmp_path.glob(f".s{k}{CREATING}*"))
        if k <= creation:  # killed while building: nothing at the path, one hidden folder
            assert not target.exists() and len(hidden) == 1, (k, hidden)
        else:  # killed after the rename: a complete store with no epoch yet
            assert not hidden and TrajectoryStore.open(target).n_epochs == 0
        if k in (1, creation + 1):  # the command line (the runner, without a fault)
            r = runner("count", 0, "ingest", base / "first", target)
            assert r.returncode == 0, (k, r.stderr)
        else:
            ingest(base / "first", target)
        assert tree_digest(target) == reference, k  # bit-identical to an uninterrupted run
        assert not list(tmp_path.glob(f".s{k}{CREATING}*")), k
