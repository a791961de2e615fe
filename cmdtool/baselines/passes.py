"""Pass 2 of ``compare`` (every method's per-epoch error) and the basis pass of the
rebuilt checkpoints, both one task per column block (``Backend.map``).

The error of a linear baseline (``X_hat = X M``) on a block B (T' x n) is ``R B`` with
``R = (I - M)^T`` (:meth:`LinearModel.residual_operator`); CMD's is
``B - (a * r_labels(t) + b)`` from the decomposition's stored (float32) a, b, labels.
Squared residuals and squared values are summed per epoch in float64 and added on the
client in block order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from cmdtool.baselines.gram import BlockReader, pieces
from cmdtool.decomposition import CMD


@dataclass
class ErrorPart:
    """Per-epoch sums of one block (or of the window).

    Attributes
    ----------
    err2 : ndarray, float64, shape (R, T')
        Squared residuals of each method, per epoch.
    sq : ndarray, float64, shape (T',)
        Squared stored values per epoch (finite columns).
    seconds : ndarray, float64, shape (R,)
        Time each method's residuals took (reading excluded).
    nonfinite : int
        Columns left out (NaN or Inf in the window).
    """

    err2: np.ndarray
    sq: np.ndarray
    seconds: np.ndarray
    nonfinite: int = 0

    def add(self, other: ErrorPart) -> None:
        self.err2 += other.err2
        self.sq += other.sq
        self.seconds += other.seconds
        self.nonfinite += other.nonfinite


@dataclass
class ErrorTask(BlockReader):
    """``task((start, stop))``: the :class:`ErrorPart` of that block.

    Parameters
    ----------
    operators : list of (ndarray (T', T'), ndarray (T',)) or None
        Per method, ``(R, R @ 1)`` of a linear baseline, or None for CMD.
    ref_values : ndarray, float64, shape (T', M), optional
        CMD's references at the window's rows (needed when a method is CMD).
    name, generation : str, optional
        The decomposition (and the version the client loaded) a worker opens.
    """

    operators: list[tuple[np.ndarray, np.ndarray] | None] = field(default_factory=list)
    ref_values: np.ndarray | None = None
    name: str | None = None
    generation: str | None = None
    _model: CMD | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_st": None, "_model": None}

    def _cmd_arrays(self, start: int, stop: int) -> tuple[np.ndarray, ...]:
        if self._model is None:
            assert self.name is not None
            self._model = CMD.load(self.open(), self.name)
        model = self._model
        if model.pin_.generation != self.generation:
            raise model.pin_.changed("since compare started")

        def read(group: Any) -> tuple[np.ndarray, ...]:
            return (
                np.asarray(group["labels"][start:stop], dtype=np.int64),
                np.asarray(group["a"][start:stop], dtype=np.float64),
                np.asarray(group["b"][start:stop], dtype=np.float64),
            )

        return model.read_pinned(read)  # type: ignore[no-any-return]

    def __call__(self, span: tuple[int, int]) -> ErrorPart:
        block = self.read(span)
        t = block.shape[0]
        n_methods = len(self.operators)
        part = ErrorPart(np.zeros((n_methods, t)), np.zeros(t), np.zeros(n_methods))
        cmd = None
        if any(op is None for op in self.operators):
            cmd = self._cmd_arrays(*span)
        for lo, xc, mean, finite in pieces(block):
            part.sq += ((xc + mean) ** 2).sum(axis=1)
            part.nonfinite += int((~finite).sum())
            for i, op in enumerate(self.operators):
                t0 = time.perf_counter()
                if op is None:
                    assert cmd is not None and self.ref_values is not None
                    w = xc.shape[1]
                    lab, a, b = (arr[lo : lo + w] for arr in cmd)
                    res = (xc + mean) - (a * self.ref_values[:, lab] + b)
                    res[:, ~finite] = 0.0
                    res[~np.isfinite(res)] = 0.0  # NaN b: left out, as in decompose
                else:
                    res = op[0] @ xc + np.outer(op[1], mean)
                part.err2[i] += (res**2).sum(axis=1)
                part.seconds[i] += time.perf_counter() - t0
        return part


@dataclass
class BasisTask(BlockReader):
    """``task((start, stop))`` writes ``(X @ basis)^T`` of that block into its chunks of
    the scratch array ``out`` (k x N, float64, chunked like ``weights``) and returns
    the block's width. No two blocks share a chunk, so a recomputed task writes the
    same bytes again."""

    basis: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    out: str = ""

    def __call__(self, span: tuple[int, int]) -> int:
        block = self.read(span)
        arr = zarr.open_array(self.out, mode="r+")
        vals = np.empty((self.basis.shape[1], span[1] - span[0]))
        for lo, xc, mean, finite in pieces(block):
            w = xc.shape[1]
            v = self.basis.T @ xc + np.outer(self.basis.sum(axis=0), mean)
            v[:, ~finite] = np.nan  # rebuilt from nothing: left as the stored values
            vals[:, lo : lo + w] = v
        arr[:, span[0] : span[1]] = vals
        return span[1] - span[0]
