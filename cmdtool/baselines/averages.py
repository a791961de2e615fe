"""The weight averages people already use: EMA and SWA, rebuilt at every epoch.

Both are linear in the window's epochs (``X_hat = X M``, M upper triangular: an
average only uses the epochs up to and including the one it stands for):
- EMA with decay beta: ``e_0 = w_0``, ``e_t = beta e_{t-1} + (1 - beta) w_t``;
- SWA over k epochs: ``s_t`` = the mean of the epochs ``max(0, t - k + 1) .. t`` of the
  window (fewer than k at its start).
"""

from __future__ import annotations

import numpy as np

from cmdtool.baselines.linear import LinearModel


def ema_matrix(t: int, beta: float) -> np.ndarray:
    """``M[s, u]``: weight of window epoch s in the EMA at epoch u.

    Returns
    -------
    ndarray, float64, shape (t, t)
        ``M[0, u] = beta^u``, ``M[s, u] = (1 - beta) beta^(u - s)`` for 1 <= s <= u.
    """
    s = np.arange(t)[:, None]
    u = np.arange(t)[None, :]
    lag = u - s
    m = np.where(lag >= 0, (1.0 - beta) * np.power(beta, np.maximum(lag, 0)), 0.0)
    m[0, :] = np.power(beta, np.arange(t))
    return m


def swa_matrix(t: int, k: int) -> np.ndarray:
    """``M[s, u] = 1 / min(k, u + 1)`` for ``u - k < s <= u``, else 0.

    Returns
    -------
    ndarray, float64, shape (t, t)
    """
    s = np.arange(t)[:, None]
    u = np.arange(t)[None, :]
    inside = (s <= u) & (s > u - k)
    return np.where(inside, 1.0 / np.minimum(k, u + 1), 0.0)


def ema_model(t: int, beta: float, n_params: int) -> LinearModel:
    """EMA over a window of ``t`` epochs (N values per rebuilt epoch)."""
    return LinearModel("ema", None, ema_matrix(t, beta), stored_values=n_params * t)


def swa_model(t: int, k: int, n_params: int) -> LinearModel:
    """SWA of the last ``k`` epochs over a window of ``t`` epochs (N values per epoch)."""
    return LinearModel("swa", None, swa_matrix(t, k), stored_values=n_params * t)
