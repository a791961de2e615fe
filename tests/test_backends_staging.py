"""The host-to-device ring of the streamed pass, run without a GPU (``emulate=True``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from cmdtool.backends.local import LocalBackend
from cmdtool.backends.staging import Staging
from cmdtool.store import RESULT_COLUMNS, EpochInfo, ParamInfo, TrajectoryStore
from tests import cmd_reference as ref

CPU = torch.device("cpu")


def test_ring_reuses_its_buffers_and_delivers_each_block():
    # guards: Staging.put's slot rotation, buffer reuse and growth, and the copy into
    # the slot (a block must arrive whole, in its own shape)
    rng = np.random.default_rng(0)
    ring = Staging(CPU, slots=2, emulate=True)
    shapes = [(5, 100), (5, 100), (5, 100), (5, 40), (5, 120), (5, 100)]
    blocks = [rng.normal(size=s).astype(np.float32) for s in shapes]
    staged = []
    for block in blocks:
        s = ring.put(block)
        x = s.tensor()
        assert x.shape == block.shape and x.is_contiguous()
        assert np.array_equal(x.numpy(), block)
        x.mul_(0)  # the kernel overwrites its input: the host block stays as it was
        assert np.any(block != 0)
        s.release()
        staged.append((s.slot, x.data_ptr()))
    assert [slot for slot, _ in staged] == [0, 1, 0, 1, 0, 1]
    assert staged[2][1] == staged[0][1] and staged[3][1] == staged[1][1]  # reused
    assert ring.transfers == 6
    assert ring.allocations == 6  # 2 slots x (host, device), then slot 0 grew to 120 cols


def test_plain_cpu_staging_hands_over_the_block_itself():
    # guards: the CPU path: no copy, no buffer (the kernel reads the block in place)
    block = np.ones((3, 7), dtype=np.float32)
    s = Staging(CPU).put(block)
    assert s.tensor().data_ptr() == block.ctypes.data and s.slot == -1


def _store(path: Path, w: np.ndarray, chunk: int) -> TrajectoryStore:
    st = TrajectoryStore.create(path, [ParamInfo("w", (w.shape[1],), "float32", 0)], chunk=chunk)
    for t in range(w.shape[0]):
        info = EpochInfo(label=t, source=f"e{t}", kind="safetensors", size=0, mtime_ns=0,
                         sha256="")
        st.append_epoch([(0, w[t])], info)
    return st


def _pass(tmp_path: Path, st: TrajectoryStore, refs: np.ndarray, backend: LocalBackend, tag: str):
    n = st.n_params
    arrays = {
        key: zarr.create_array(str(tmp_path / f"{tag}-{key}.zarr"), shape=(n,),
                               chunks=(st.chunk,), dtype=dtype)
        for key, dtype in RESULT_COLUMNS if key != "constant"
    }
    totals = backend.fit_pass(st, np.arange(st.n_epochs), refs, arrays)
    return {k: a[:] for k, a in arrays.items()}, totals


def test_pipelined_pass_puts_each_block_before_computing_the_previous(tmp_path):
    # guards: LocalBackend.fit_pass's one-block lag when the staging overlaps (each
    # block computed from its own slot, written at its own columns, the last one too)
    rng = np.random.default_rng(1)
    t, n, m = 8, 500, 3
    prof = np.cumsum(rng.normal(size=(m, t)), axis=1)
    w = (rng.normal(size=(n, 1)) * prof[rng.integers(0, m, n)] + rng.normal(size=(n, 1))
         + 0.1 * rng.normal(size=(n, t))).astype(np.float32).T.copy()  # (t, n)
    st = _store(tmp_path / "s.zarr", w, chunk=96)  # 6 blocks, the last one short
    refs = w[:, [5, 17, 450]].T.copy()
    ring = Staging(CPU, slots=2, emulate=True)
    staged, totals = _pass(tmp_path, st, refs, LocalBackend(CPU, staging=ring), "ring")
    direct, totals2 = _pass(tmp_path, st, refs, LocalBackend(CPU, workers=2), "direct")
    assert ring.transfers == 6 and ring.allocations == 4
    labels = np.argmax(ref.abs_corr(w.T, refs), axis=1)  # the float64 oracle
    a, b = ref._affine(w.T.astype(np.float64), refs.astype(np.float64)[labels])
    for got in (staged, direct):
        assert np.array_equal(got["labels"], labels)
        assert np.allclose(got["a"], a, rtol=1e-5, atol=1e-6)
        assert np.allclose(got["b"], b, rtol=1e-5, atol=1e-5)
    assert np.array_equal(totals.count, totals2.count)
    assert np.allclose(totals.err2, totals2.err2, rtol=1e-12, atol=0)
    st.close()
