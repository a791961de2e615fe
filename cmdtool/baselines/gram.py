"""Pass 1 of ``compare``: the window's T' x T' Gram matrices, one column block at a time.

Each block of ``weights`` (T' x n, epochs as rows) is read once, in float64, in pieces
of at most :data:`PIECE` columns, and adds its share to

    G_c = X_c^T X_c         (centred per parameter: PCA)
    s   = X_c^T x_bar       (T',)
    q   = x_bar^T x_bar

from which the uncentred ``G = X^T X = G_c + s 1^T + 1 s^T + q 1 1^T`` (DMD) follows
exactly. Centring each block before the product keeps the small deviations of nearly
constant trajectories instead of losing them to their mean. Columns holding NaN or Inf
in the window are left out (of this pass and of every error figure).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from cmdtool.store import TrajectoryStore

#: Columns per float64 piece of a block (T' x 32768 x 8 bytes: 12.5 MiB at T' = 50).
PIECE = 32768


def pieces(block: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Float64 pieces of a block with non-finite columns zeroed.

    Parameters
    ----------
    block : ndarray, float32, shape (T', n)

    Yields
    ------
    offset : int
        First column of the piece within the block.
    centred : ndarray, float64, shape (T', w)
        The piece minus its column means (0 in non-finite columns).
    mean : ndarray, float64, shape (w,)
    finite : ndarray, bool, shape (w,)
    """
    for lo in range(0, block.shape[1], PIECE):
        x = block[:, lo : lo + PIECE].astype(np.float64)
        finite = np.asarray(np.isfinite(x).all(axis=0))
        if not finite.all():
            x[:, ~finite] = 0.0
        mean = x.mean(axis=0)
        x -= mean
        yield lo, x, mean, finite


@dataclass
class GramPart:
    """One block's (or the whole window's) share of the Gram matrices.

    Attributes
    ----------
    centred : ndarray, float64, shape (T', T')
    s : ndarray, float64, shape (T',)
    q : float
    nonfinite : int
        Columns left out.
    """

    centred: np.ndarray
    s: np.ndarray
    q: float = 0.0
    nonfinite: int = 0

    @classmethod
    def zeros(cls, t: int) -> GramPart:
        return cls(np.zeros((t, t)), np.zeros(t))

    def add(self, other: GramPart) -> None:
        self.centred += other.centred
        self.s += other.s
        self.q += other.q
        self.nonfinite += other.nonfinite

    def uncentred(self) -> np.ndarray:
        """``G = X^T X`` (T' x T', float64)."""
        return self.centred + self.s[:, None] + self.s[None, :] + self.q


@dataclass
class BlockReader:
    """Opens the store (by path) once per process: a picklable base for block tasks."""

    store: str
    rows: np.ndarray
    _st: TrajectoryStore | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_st": None}

    def open(self) -> TrajectoryStore:
        if self._st is None:
            self._st = TrajectoryStore.open(self.store)
        return self._st

    def read(self, span: tuple[int, int]) -> np.ndarray:
        """The window's rows of columns ``span`` (float32, (T', n))."""
        return self.open().read_block(self.rows, *span)


@dataclass
class GramTask(BlockReader):
    """``task((start, stop))``: that column block's :class:`GramPart`."""

    def __call__(self, span: tuple[int, int]) -> GramPart:
        block = self.read(span)
        part = GramPart.zeros(block.shape[0])
        for _, xc, mean, finite in pieces(block):
            part.centred += xc @ xc.T
            part.s += xc @ mean
            part.q += float(mean @ mean)
            part.nonfinite += int((~finite).sum())
        return part


def window_gram(
    mapper: Callable[..., list[GramPart]],
    task: GramTask,
    blocks: list[tuple[int, int]],
    progress: Callable[[int, int, object], None] | None = None,
) -> GramPart:
    """Run ``task`` over ``blocks`` with a backend's ``map`` and add the parts in block
    order (the same sum, bit for bit, on every backend).

    Returns
    -------
    GramPart
        The window's.
    """
    parts = mapper(task, blocks, lambda span: f"columns {span[0]}:{span[1]}", progress)
    total = GramPart.zeros(len(task.rows))
    for p in parts:
        total.add(p)
    return total
