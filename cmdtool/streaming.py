"""The streamed pass of steps 5-6 on one machine: column blocks of ``weights`` through
:func:`cmdtool.kernels.fit_block`, the next block read while the device works."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import zarr

from cmdtool.kernels import BlockFit, References, fit_block
from cmdtool.store import TrajectoryStore


@dataclass
class PassTotals:
    """Per-mode sums over all N parameters: squared residuals, squared values, counts."""

    err2: np.ndarray
    sq: np.ndarray
    count: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def zeros(cls, m: int) -> PassTotals:
        return cls(np.zeros(m), np.zeros(m), np.zeros(m, dtype=np.int64))

    def add(self, other: PassTotals | BlockFit) -> None:
        self.err2 += other.err2
        self.sq += other.sq
        self.count += other.count


def fit_columns(block: np.ndarray, refs: References, device: torch.device) -> list[BlockFit]:
    """Fit one block (float32, (T', n), C-contiguous; used as scratch) on ``device``.

    The whole block goes to the kernel at once: it works in place on contiguous rows,
    and column slices of it would be strided (about 3x slower on the CPU).
    """
    x = torch.from_numpy(block)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    return [fit_block(x, refs)]


def write_block(arrays: dict[str, zarr.Array], start: int, parts: list[BlockFit]) -> None:
    """Store the per-column results (``labels``, ``a``, ``b`` and the running sums: the
    keys of ``arrays``) of consecutive pieces starting at column ``start``."""
    stop = start + sum(len(p.labels) for p in parts)
    for key in arrays:
        arrays[key][start:stop] = np.concatenate([getattr(p, key) for p in parts])


def local_pass(
    st: TrajectoryStore,
    rows: np.ndarray,
    ref_traj: np.ndarray,
    arrays: dict[str, zarr.Array],
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> PassTotals:
    """Steps 5-6 over every column block, reading each chunk of the window once.

    On the CPU, torch gets one core fewer than the machine has while the pass runs: the
    read-ahead thread needs one, and torch's threads spin-wait on each other when one of
    them is descheduled (measured on 2 cores under load: 1 thread 136 ms, 2 threads
    651 ms per 50 x 262144 block).
    """
    refs = References.from_trajectories(ref_traj, device)
    totals = PassTotals.zeros(refs.n_modes)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        for start, stop, block in _prefetched(st, rows):
            parts = fit_columns(block, refs, device)
            write_block(arrays, start, parts)
            for p in parts:
                totals.add(p)
            if progress is not None:
                progress(stop, st.n_params)
    finally:
        torch.set_num_threads(threads)
    return totals


def _prefetched(st: TrajectoryStore, rows: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """Column blocks of the window, the next one read while the caller works on this one."""
    blocks = list(st.column_blocks())
    if not blocks:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmdtool-read") as pool:
        pending = pool.submit(st.read_block, rows, *blocks[0])
        for i, (start, stop) in enumerate(blocks):
            block = pending.result()
            if i + 1 < len(blocks):
                pending = pool.submit(st.read_block, rows, *blocks[i + 1])
            yield start, stop, block
