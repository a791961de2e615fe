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

from cmdtool.backends.base import MapProgress, PassProgress, PassTotals, write_block
from cmdtool.backends.staging import Staged, Staging
from cmdtool.method.kernels import BlockFit, References, fit_block
from cmdtool.store import TrajectoryStore


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


class LocalBackend:
    """Run passes and tasks in this process, the pass on one torch ``device``.

    Parameters
    ----------
    device : torch.device
    workers : int, optional
        Kernel threads on the CPU; default: the cores this process may use.
    staging : Staging, optional
        The host-to-device buffers (default: a fresh :class:`Staging` per pass).
    """

    def __init__(
        self, device: torch.device, *, workers: int | None = None, staging: Staging | None = None
    ) -> None:
        self.device = device
        self.workers = workers
        self.staging = staging

    def fit_pass(
        self,
        st: TrajectoryStore,
        rows: np.ndarray,
        ref_traj: np.ndarray,
        arrays: dict[str, zarr.Array],
        progress: PassProgress | None = None,
    ) -> PassTotals:
        """Steps 5-6 over every column block, reading each chunk of the window once.

        On the CPU the kernel runs on ``workers`` threads of its own, each torch
        operation on one thread (torch's intra-op threads are set to 1 for the pass):
        they block, never spin, when the read-ahead thread needs a core (torch's own
        threads spin-wait on each other when one of them is descheduled: measured on 2
        cores under load, 1 thread 136 ms, 2 threads 651 ms per 50 x 262144 block).
        On a GPU the transfer of block i + 1 is queued before block i is computed
        (:class:`~cmdtool.backends.staging.Staging`).
        """
        device = self.device
        refs = References.from_trajectories(ref_traj, device)
        totals = PassTotals.zeros(refs.n_modes)
        totals.device = str(device)
        staging = self.staging or Staging(device)
        workers = self.workers or (cpu_cores() if device.type == "cpu" else 1)
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)

        def finish(start: int, stop: int, staged: Staged) -> None:
            try:
                parts: list[BlockFit] = [fit_block(staged.tensor(), refs, workers=workers)]
            finally:
                staged.release()
            write_block(arrays, start, parts)
            for p in parts:
                totals.add(p)
            if progress is not None:
                progress(stop, st.n_params)

        try:
            pending: tuple[int, int, Staged] | None = None
            for start, stop, block in _prefetched(st, rows):
                staged = staging.put(block)
                if not staging.overlaps:
                    finish(start, stop, staged)
                    continue
                if pending is not None:  # block i computes while block i + 1 copies
                    finish(*pending)
                pending = (start, stop, staged)
            if pending is not None:
                finish(*pending)
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
