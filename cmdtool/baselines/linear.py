"""What every baseline of ``compare`` is: a T' x T' matrix acting on the window.

PCA, exact DMD, EMA and SWA all rebuild the window as a linear map of its own epochs,
``X_hat = X M`` with X the N x T' window matrix (rows parameters, columns epochs) and M a
small T' x T' float64 matrix (``docs/design.md``, "Baselines (compare)"). The streamed
passes therefore only ever need M: the error of every method is one small matrix
product per column block, and a rebuilt epoch is a weighted sum of the window's epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LinearModel:
    """One baseline fitted on a window of T' epochs.

    Attributes
    ----------
    method : str
        ``pca``, ``dmd``, ``ema`` or ``swa``.
    rank : int or None
        d (PCA) or r (DMD) as asked for; None for the averages.
    matrix : ndarray, float64, shape (T', T')
        M with ``X_hat = X M``: column t holds the weight of each window epoch in the
        rebuilt epoch t.
    basis : ndarray, float64, shape (T', k), optional
        A low-rank factor of M (``M = basis @ coef.T``): the model's N x k stored
        vectors are ``X @ basis`` (PCA: the mean and the d scaled components; DMD: the r
        columns of ``X2 V S^-1``). None for the averages (k would be T').
    coef : ndarray, float64, shape (T', k), optional
        Row t: the coefficients of those vectors at epoch t.
    stored_values : int
        Values the model needs to rebuild every epoch of the window (README table).
    effective_rank : int or None
        Components actually kept: fewer than ``rank`` when the window's matrix has
        fewer non-negligible singular values.
    seconds : float
        Time spent on this model (added to by the passes).
    """

    method: str
    rank: int | None
    matrix: np.ndarray
    basis: np.ndarray | None = None
    coef: np.ndarray | None = None
    stored_values: int = 0
    effective_rank: int | None = None
    seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``pca-2``, ``dmd-5``, ``ema``, ``swa``: the name of its output folder."""
        return self.method if self.rank is None else f"{self.method}-{self.rank}"

    def residual_operator(self) -> tuple[np.ndarray, np.ndarray]:
        """``(R, R @ 1)`` with ``R = (I - M)^T``, so that a block B (T' x n, epochs as
        rows) has residual ``B - M^T B = R B``. Applied to the block centred per column,
        ``R B = R B_c + (R 1) mean^T``: the second term vanishes for the methods that
        keep constants (PCA, EMA, SWA), which keeps their residuals exact to rounding.

        Returns
        -------
        R : ndarray, float64, shape (T', T')
        r1 : ndarray, float64, shape (T',)
        """
        t = self.matrix.shape[0]
        r = np.ascontiguousarray((np.eye(t) - self.matrix).T)
        return r, r.sum(axis=1)


def top_eigen(gram: np.ndarray, k: int, rtol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenpairs of a symmetric positive semi-definite Gram matrix,
    largest first, without those at or below ``rtol`` times the largest (numerically
    zero: their singular vectors would be noise).

    Parameters
    ----------
    gram : ndarray, float64, shape (n, n)
    k : int

    Returns
    -------
    values : ndarray, float64, shape (k',)
        k' <= k eigenvalues (squared singular values), descending.
    vectors : ndarray, float64, shape (n, k')
    """
    vals, vecs = np.linalg.eigh((gram + gram.T) / 2)
    order = np.argsort(vals)[::-1][:k]
    vals, vecs = vals[order], vecs[:, order]
    top = float(vals[0]) if vals.size else 0.0
    keep = vals > max(top, 0.0) * rtol
    if top <= 0:
        keep[:] = False
    return vals[keep], vecs[:, keep]
