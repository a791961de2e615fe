"""What every backend shares: the per-mode totals of a pass and one block's fit and write.

A backend runs the streamed pass of steps 5-6 (``docs/design.md``, "The method") over
the column blocks of a store, and maps a picklable task over items (epochs to rebuild).
It knows stores, blocks and kernels, never the estimator that calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import zarr

from cmdtool.method.kernels import BlockFit, References, fit_block
from cmdtool.store import TrajectoryStore

#: ``progress(done, total)`` of a pass, in columns.
PassProgress = Callable[[int, int], None]
#: ``progress(done, total, result)`` of a map, in items.
MapProgress = Callable[[int, int, Any], None]


@dataclass
class PassTotals:
    """Per-mode sums over all N parameters: squared residuals, squared values, counts,
    and the device kind the pass ran on (``cpu``, ``cuda``; ``auto`` when both were used).
    Each array has M + 1 slots: the M modes, then the constant parameters."""

    err2: np.ndarray
    sq: np.ndarray
    count: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    device: str = "cpu"

    @classmethod
    def zeros(cls, m: int) -> PassTotals:
        """Totals of a pass with ``m`` modes (``m + 1`` slots: the last for constants)."""
        return cls(np.zeros(m + 1), np.zeros(m + 1), np.zeros(m + 1, dtype=np.int64))

    def add(self, other: PassTotals | BlockFit) -> None:
        self.err2 += other.err2
        self.sq += other.sq
        self.count += other.count


class Backend(Protocol):
    """Where the streamed pass runs: :class:`~cmdtool.backends.local.LocalBackend` or
    :class:`~cmdtool.backends.dask.DaskBackend`. Open one with
    :func:`cmdtool.backends.open_backend`."""

    def fit_pass(
        self,
        st: TrajectoryStore,
        rows: np.ndarray,
        ref_traj: np.ndarray,
        arrays: dict[str, zarr.Array],
        progress: PassProgress | None = None,
    ) -> PassTotals:
        """Steps 5-6 over every column block: assign each column to its most correlated
        reference of ``ref_traj`` (float32, (M, T')) over the store ``rows`` (int64,
        (T',)), fit a, b, write the results into ``arrays`` (the keys of
        :data:`cmdtool.store.RESULT_COLUMNS`, shape (N,)) and return the totals, added
        in block order (bit-identical across backends on the same kind of device)."""
        ...

    def map(
        self,
        task: Callable[[Any], Any],
        items: Sequence[Any],
        what: Callable[[Any], str],
        progress: MapProgress | None = None,
    ) -> list[Any]:
        """``[task(item) for item in items]``, on this backend (in any order; results in
        the order of ``items``). ``what(item)`` names an item in error messages."""
        ...


def fit_columns(
    block: np.ndarray, refs: References, device: torch.device, *, workers: int = 1
) -> list[BlockFit]:
    """Fit one block (float32, (T', n), C-contiguous; used as scratch) on ``device``.

    The whole block goes to the kernel at once (which works through it in cache-sized
    pieces on ``workers`` threads on the CPU). On a GPU a pinned block is sent as it is,
    any other through this thread's reused pinned buffers
    (:func:`cmdtool.backends.staging.staging_for`).
    """
    x = torch.from_numpy(block)
    if device.type != "cuda":
        return [fit_block(x, refs, workers=workers)]
    if x.is_pinned():
        return [fit_block(x.to(device, non_blocking=True), refs)]
    from cmdtool.backends.staging import staging_for

    staged = staging_for(device).put(block)
    try:
        return [fit_block(staged.tensor(), refs)]
    finally:
        staged.release()


def write_block(arrays: dict[str, zarr.Array], start: int, parts: list[BlockFit]) -> None:
    """Store the per-column results (``labels``, ``a``, ``b`` and the running sums: the
    keys of ``arrays``) of consecutive pieces starting at column ``start``."""
    stop = start + sum(len(p.labels) for p in parts)
    for key in arrays:
        arrays[key][start:stop] = np.concatenate([getattr(p, key) for p in parts])
