"""Exact DMD (Tu et al. 2014) of the window, from its T' x T' Gram matrix only.

With X = [x_0 .. x_{T'-1}] (N x T'), ``X1 = X[:, :-1]``, ``X2 = X[:, 1:]`` and the rank-r
SVD ``X1 ~ U S V^T``:

    A~  = U^T X2 V S^-1 = S^-1 V^T (X1^T X2) V S^-1        (r x r)
    A~ W = W Lambda                                        (eigenpairs)
    Phi = X2 V S^-1 W                                      (exact modes, N x r)
    b   = argmin ||Phi b - x_0||                           (amplitudes)
    x_hat_t = Phi Lambda^t b

``X1^T X1``, ``X1^T X2``, ``X2^T X2`` and ``X2^T x_0`` are blocks of ``G = X^T X``, so one
streamed pass gives everything; the N x r matrix ``Q = X2 V S^-1`` (real) is only formed
when checkpoints are rebuilt. This is what PyDMD's ``DMD(svd_rank=r, exact=True)``
computes (its default ``exact=False`` uses the projected modes ``U W`` instead).
"""

from __future__ import annotations

import numpy as np

from cmdtool.baselines.linear import LinearModel, top_eigen


def dmd_model(gram: np.ndarray, r: int, n_params: int) -> LinearModel:
    """The rank-r exact-DMD reconstruction of the window as ``X_hat = X M``.

    Parameters
    ----------
    gram : ndarray, float64, shape (T', T')
        ``X^T X`` (not centred).
    r : int
        SVD rank of X1, 1 <= r < T'.
    n_params : int
        N, for the count of stored values (``N r + 2 r``: modes, eigenvalues,
        amplitudes).

    Returns
    -------
    LinearModel
        ``basis`` (T' x r'): ``X @ basis = Q = X2 V S^-1``; ``coef`` (T' x r'): row t is
        ``Re(W Lambda^t b)``, so that ``x_hat_t = Q coef[t]`` (Q is real; the imaginary
        parts of conjugate modes cancel). ``extra['eigenvalues']``: Lambda.
    """
    t = gram.shape[0]
    g11 = gram[:-1, :-1]
    g12 = gram[:-1, 1:]
    g22 = gram[1:, 1:]
    g20 = gram[1:, 0]
    s2, v = top_eigen(g11, r)
    k = v.shape[1]
    if k == 0:  # X1 is zero: nothing to model, every rebuilt epoch is 0
        z = np.zeros((t, 0))
        return LinearModel("dmd", r, np.zeros((t, t)), z, z, n_params * r + 2 * r, 0)
    sinv = 1.0 / np.sqrt(s2)
    atilde = (sinv[:, None] * (v.T @ g12 @ v)) * sinv[None, :]
    lam, w = np.linalg.eig(atilde)
    # amplitudes: least squares of Phi b = x_0 with Phi = Q W. With Q^T Q = H = E D E^T,
    # Q = U_q D^1/2 E^T (U_q orthonormal), so it is the r x r problem
    # (D^1/2 E^T W) b = D^-1/2 E^T (Q^T x_0) with Q^T x_0 = S^-1 V^T (X2^T x_0).
    h = (sinv[:, None] * (v.T @ g22 @ v)) * sinv[None, :]
    d, e = np.linalg.eigh((h + h.T) / 2)
    good = d > d.max() * 1e-13
    d, e = d[good], e[:, good]
    qx0 = sinv * (v.T @ g20)
    lhs = np.sqrt(d)[:, None] * (e.T @ w)
    rhs = (e.T @ qx0) / np.sqrt(d)
    b = np.linalg.lstsq(lhs.astype(np.complex128), rhs.astype(np.complex128), rcond=None)[0]
    powers = np.power(lam[None, :], np.arange(t)[:, None])  # (T', r): Lambda^t
    coef = np.real((powers * b[None, :]) @ w.T)  # row t: Re(W Lambda^t b)
    basis = np.zeros((t, k))
    basis[1:, :] = v * sinv[None, :]  # X @ basis = X2 V S^-1
    return LinearModel(
        method="dmd",
        rank=r,
        matrix=basis @ coef.T,
        basis=basis,
        coef=coef,
        stored_values=n_params * r + 2 * r,
        effective_rank=k,
        extra={"eigenvalues": lam},
    )
