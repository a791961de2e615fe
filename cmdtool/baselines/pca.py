"""PCA of the window: the trajectory subspace that P-BFGS / DLDR trains in.

``X_hat = x_bar 1^T + U_d S_d V_d^T``: the rank-d truncated SVD of the window matrix X
(N x T') centred per parameter over the window. Only the T' x T' centred Gram matrix
``X_c^T X_c = V S^2 V^T`` is needed: it gives ``V_d`` and ``S_d``, and
``U_d S_d = X_c V_d`` is never formed (``docs/design.md``, "Baselines (compare)").
"""

from __future__ import annotations

import numpy as np

from cmdtool.baselines.linear import LinearModel, top_eigen


def pca_model(centred_gram: np.ndarray, d: int, n_params: int) -> LinearModel:
    """The rank-d PCA reconstruction of the window as ``X_hat = X M``.

    With ``J = I - 1 1^T / T'`` (centring) and ``V_d`` the top-d eigenvectors of the
    centred Gram matrix, ``X_hat = X (1 1^T / T' + J V_d V_d^T)``.

    Parameters
    ----------
    centred_gram : ndarray, float64, shape (T', T')
        ``X_c^T X_c``.
    d : int
        Number of components, 1 <= d < T'.
    n_params : int
        N, for the count of stored values (``N d + d T' + N``: components, their
        coefficients per epoch, the mean).

    Returns
    -------
    LinearModel
        ``basis = [1/T', J V_d]`` and ``coef = [1, V_d]`` (T' x (d + 1)).
    """
    t = centred_gram.shape[0]
    _, vecs = top_eigen(centred_gram, d)
    ones = np.ones((t, 1))
    jv = vecs - vecs.mean(axis=0, keepdims=True)  # J V_d (V_d is orthogonal to 1 up to rounding)
    basis = np.hstack([ones / t, jv])
    coef = np.hstack([ones, vecs])
    return LinearModel(
        method="pca",
        rank=d,
        matrix=basis @ coef.T,
        basis=basis,
        coef=coef,
        stored_values=n_params * d + d * t + n_params,
        effective_rank=int(vecs.shape[1]),
    )
