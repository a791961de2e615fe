"""Independent in-memory float64 numpy CMD, used only as a test oracle.

A plain transcription of docs/design.md "The method", steps 2-7, with the constant rule
of "Constant parameters and normalization statistics", and the whole trajectory matrix
in memory. It is deliberately simple: no streaming, no torch, no store.
"""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist


def abs_corr(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """|corr| over the T axis between rows of X (n, T) and rows of Y (m, T) -> (n, m).

    0 where either side is constant (zero norm after centring), never NaN.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    Xc = X - X.mean(axis=1, keepdims=True)
    Yc = Y - Y.mean(axis=1, keepdims=True)
    nx = np.linalg.norm(Xc, axis=1)
    ny = np.linalg.norm(Yc, axis=1)
    denom = np.outer(nx, ny)
    num = Xc @ Yc.T
    out = np.zeros_like(num)
    ok = denom > 0
    out[ok] = np.abs(num[ok]) / denom[ok]
    return out


EPS32 = 2.0**-23


def constant(X: np.ndarray) -> np.ndarray:
    """Rows constant up to float32 rounding: max - min <= 4 eps32 max(|max|, |min|) (N,).

    The rule of DESIGN "Constant parameters and normalization statistics"; rows holding
    NaN or Inf are not constant.
    """
    X = np.asarray(X, dtype=np.float64)
    hi, lo = X.max(axis=1), X.min(axis=1)
    scale = np.maximum(np.abs(hi), np.abs(lo))
    with np.errstate(invalid="ignore"):
        return np.isfinite(hi) & np.isfinite(lo) & (hi - lo <= 4 * EPS32 * scale)


def cluster(
    traj_samples: np.ndarray,
    *,
    n_modes: int | None = None,
    threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2-4 on the sampled trajectories (K, T).

    Returns (sample_labels (K,), ref_rows (M,)): the mode of each sample (0 = largest
    mode, -1 = constant, left out) and the row of each mode's reference within the
    samples. Only the non-constant samples are clustered, into at most their number.
    """
    if (n_modes is None) == (threshold is None):
        raise ValueError("give exactly one of n_modes and threshold")
    S_all = np.asarray(traj_samples, dtype=np.float64)
    live = np.flatnonzero(~constant(S_all))
    sub_labels, sub_refs = _cluster_live(S_all[live], n_modes, threshold)
    labels = np.full(len(S_all), -1, dtype=np.int64)
    labels[live] = sub_labels
    return labels, live[sub_refs]


def _cluster_live(
    S: np.ndarray, n_modes: int | None, threshold: float | None
) -> tuple[np.ndarray, np.ndarray]:
    if n_modes is not None:
        n_modes = min(n_modes, len(S))
    if len(S) == 1:
        return np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    C = abs_corr(S, S)
    D = pdist(C)
    Z = linkage(D, "complete")
    if n_modes is not None:
        raw = fcluster(Z, n_modes, "maxclust")
    else:
        raw = fcluster(Z, threshold * D.max(), "distance")

    # Number modes by size, largest first; tie -> smallest first sample row first.
    clusters = np.unique(raw)
    sizes = np.array([(raw == c).sum() for c in clusters])
    first_rows = np.array([np.flatnonzero(raw == c)[0] for c in clusters])
    order = sorted(range(len(clusters)), key=lambda j: (-sizes[j], first_rows[j]))
    labels = np.empty(len(S), dtype=np.int64)
    for mode, j in enumerate(order):
        labels[raw == clusters[j]] = mode

    # Reference: member with the largest mean |corr| to its mode (ties -> lowest row).
    ref_rows = np.empty(len(order), dtype=np.int64)
    for mode in range(len(order)):
        members = np.flatnonzero(labels == mode)
        score = C[np.ix_(members, members)].mean(axis=1)
        ref_rows[mode] = members[np.argmax(score)]  # argmax returns the first max
    return labels, ref_rows


def _affine(W: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares a, b of w ≈ a r + b, row by row (W, R both (N, T))."""
    wbar = W.mean(axis=1)
    rbar = R.mean(axis=1)
    Rc = R - rbar[:, None]
    num = ((W - wbar[:, None]) * Rc).sum(axis=1)
    den = (Rc * Rc).sum(axis=1)
    a = np.zeros_like(wbar)
    ok = den > 0
    a[ok] = num[ok] / den[ok]
    b = wbar - a * rbar
    return a, b


def fit(
    W: np.ndarray,
    sample_index: np.ndarray,
    *,
    n_modes: int | None = None,
    threshold: float | None = None,
) -> dict:
    """Steps 2-6 over the window W (N, T); sample_index are rows of W (the K samples)."""
    W = np.asarray(W, dtype=np.float64)
    sample_index = np.asarray(sample_index, dtype=np.int64)
    _, ref_rows = cluster(W[sample_index], n_modes=n_modes, threshold=threshold)
    ref_index = sample_index[ref_rows]
    refs = W[ref_index]  # (M, T)

    # Step 5: argmax picks the first maximum, so ties and all-zero rows -> mode 0 / lowest.
    labels = np.argmax(abs_corr(W, refs), axis=1).astype(np.int64)
    const = constant(W)
    labels[const] = 0

    # Step 6; a constant row is modelled exactly: a = 0, b = its mean.
    a, b = _affine(W, refs[labels])
    a[const] = 0.0
    b[const] = W[const].mean(axis=1)

    W_hat = a[:, None] * refs[labels] + b[:, None]
    norm = np.linalg.norm(W)
    rel_error = float(np.linalg.norm(W - W_hat) / norm) if norm > 0 else 0.0
    return {
        "labels": labels,
        "a": a,
        "b": b,
        "ref_index": ref_index,
        "rel_error": rel_error,
        "constant": const,
        "mode_sizes": np.bincount(labels[~const], minlength=len(ref_index)),
    }


def reconstruct(
    W_full_T: np.ndarray,
    labels: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    ref_index: np.ndarray,
) -> np.ndarray:
    """Step 7 at any epochs: ŵ_i(t) = a_i r_{m(i)}(t) + b_i, with r read from W_full_T."""
    W_full_T = np.asarray(W_full_T, dtype=np.float64)
    refs = W_full_T[np.asarray(ref_index)]  # (M, T)
    return np.asarray(a)[:, None] * refs[np.asarray(labels)] + np.asarray(b)[:, None]
