"""The streamed pass on this machine: column blocks of ``weights`` through
:func:`cmdtool.method.kernels.fit_block`, the next block read while the device works."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import zarr

from cmdtool.backends.base import MapProgress, PassProgress, PassTotals, fit_columns, write_block
from cmdtool.method.kernels import References
from cmdtool.store import TrajectoryStore


class LocalBackend:
    """Run passes and tasks in this process, the pass on one torch ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def fit_pass(
        self,
        st: TrajectoryStore,
        rows: np.ndarray,
        ref_traj: np.ndarray,
        arrays: dict[str, zarr.Array],
        progress: PassProgress | None = None,
    ) -> PassTotals:
        """Steps 5-6 over every column block, reading each chunk of the window once.

        On the CPU, torch gets one core fewer than the machine has while the pass runs:
        the read-ahead thread needs one, and torch's threads spin-wait on each other
        when one of them is descheduled (measured on 2 cores under load: 1 thread
        136 ms, 2 threads 651 ms per 50 x 262144 block).
        """
        device = self.device
        refs = References.from_trajectories(ref_traj, device)
        totals = PassTotals.zeros(refs.n_modes)
        totals.device = str(device)
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

    def map(
        self,
        task: Callable[[Any], Any],
        items: Sequence[Any],
        what: Callable[[Any], str],
        progress: MapProgress | None = None,
    ) -> list[Any]:
        results = []
        for i, item in enumerate(items):
            results.append(task(item))
            if progress is not None:
                progress(i + 1, len(items), results[-1])
        return results


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
