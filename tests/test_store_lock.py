"""One writer at a time; readers never wait and see a consistent prefix."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import cmdtool.store.trajectory
from cmdtool.errors import StoreError
from cmdtool.ingestion import ingest
from cmdtool.store import TrajectoryStore
from cmdtool.store.lock import LOCK_NAME
from tests.conftest import REPO, n_modeled, planted, run_cli, state_dicts, write_run

HOLD = (
    "import sys, time\n"
    "from cmdtool.store import TrajectoryStore\n"
    "s = TrajectoryStore.open(sys.argv[1], mode='r+')\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def small_store(tmp_path):
    w, _, _ = planted(n_modeled(), 4, 2, seed=1)
    write_run(tmp_path / "run", state_dicts(w))
    ingest(tmp_path / "run", tmp_path / "s.zarr")
    return tmp_path / "run", tmp_path / "s.zarr"


def test_second_writer_refused_then_stale_lock_taken_over(small_store):
    # guards: StoreLock.acquire (O_EXCL create, live-pid check, stale takeover)
    run, store = small_store
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(store)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(
            StoreError, match=rf"being written by another cmdtool process \(pid {holder.pid}"
        ):
            ingest(run, store)
        r = run_cli("decompose", store, cwd=REPO, env=dict(os.environ), timeout=120)
        assert r.returncode == 6 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and str(holder.pid) in r.stderr
        assert TrajectoryStore.open(store).n_epochs == 4  # readers don't need the lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (store / LOCK_NAME).exists()  # left behind by the killed holder
    w, _, _ = planted(n_modeled(), 6, 2, seed=1)
    write_run(run, state_dicts(w)[4:], labels=[5, 6])
    assert ingest(run, store).added == [5, 6]  # stale lock taken over
    assert not (store / LOCK_NAME).exists()


def test_lock_of_a_live_foreign_process_is_respected(small_store):
    _, store = small_store
    owner = {"pid": 1, "host": socket.gethostname(), "since": "then", "command": "ingest"}
    (store / LOCK_NAME).write_text(json.dumps(owner))
    with pytest.raises(StoreError, match="pid 1"):
        TrajectoryStore.open(store, mode="r+")


def test_readers_see_a_consistent_prefix_while_ingest_appends(tmp_path, monkeypatch):
    # guards: the commit order in TrajectoryStore.append_epoch (a row's data first, the
    # epochs list last) and readers counting committed epochs from the group attribute
    n, t = 3000, 12  # rows of 3 chunks (CHUNK 1024)
    rng = np.random.default_rng(0)
    base = rng.normal(size=n).astype(np.float32)
    sds = [{"w": torch.from_numpy(base + i)} for i in range(t)]
    write_run(tmp_path / "run", sds)
    store = tmp_path / "s.zarr"
    monkeypatch.setattr(cmdtool.store.trajectory, "CHUNK", 1024)
    ingest(tmp_path / "run", store, pattern="epoch_1.safetensors")
    # a slow disk: 40 ms after each zarr write, so the reader sees every step of each append
    writer = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fault_runner.py"), "slow", "40", "0", "--",
         "ingest", str(tmp_path / "run"), str(store)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    seen = []
    deadline = time.monotonic() + 120
    try:
        while True:
            finished = writer.poll() is not None  # then this read sees the final store
            st = TrajectoryStore.open(store)
            block = st.read_block(np.arange(st.n_epochs), 0, st.n_params)
            assert block.shape == (st.n_epochs, n) and len(st.labels) == st.n_epochs
            # row of label L holds exactly what epoch L's file holds: base + (L - 1)
            for row, label in enumerate(st.labels):
                assert np.array_equal(block[row], base + np.float32(label - 1)), (label, seen)
            seen.append(st.n_epochs)
            if finished:
                break
            assert time.monotonic() < deadline, f"the writer is still running; saw {seen}"
            time.sleep(0.005)
    finally:
        if writer.poll() is None:
            writer.kill()
        _, err = writer.communicate()
    assert writer.returncode == 0, err
    assert seen == sorted(seen) and seen[-1] == t
    # the reader ran throughout the append: it saw most of the intermediate prefixes
    assert len(set(seen) & set(range(2, t))) >= (t - 2) // 2, seen


def test_reused_pid_is_stale(small_store):
    # guards: the start-time comparison in lock._alive (a pid reused by another process)
    _, store = small_store
    owner = {"pid": os.getppid(), "started": 1, "host": socket.gethostname(), "since": "then"}
    (store / LOCK_NAME).write_text(json.dumps(owner))  # a live pid, but not the same process
    with TrajectoryStore.open(store, mode="r+"):
        assert json.loads((store / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (store / LOCK_NAME).exists()
