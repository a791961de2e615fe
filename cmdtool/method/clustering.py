"""|corr| of the sampled trajectories, complete-linkage modes and references (steps 2-4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from cmdtool.errors import UsageError
from cmdtool.method.kernels import CONST_RTOL, FLAT_RTOL


def constant_rows(x: np.ndarray) -> np.ndarray:
    """Rows constant up to float32 rounding: the rule of
    :func:`cmdtool.method.kernels.constant_columns`, on the same float32 values.

    Parameters
    ----------
    x : ndarray, shape (K, T)

    Returns
    -------
    ndarray, bool, shape (K,)
        ``max - min <= CONST_RTOL * max(|max|, |min|)`` in float64; False for rows
        holding NaN or Inf.
    """
    x32 = np.asarray(x, dtype=np.float32)
    if x32.shape[1] == 0:
        return np.ones(x32.shape[0], dtype=bool)
    with np.errstate(invalid="ignore"):
        hi = x32.max(axis=1).astype(np.float64)
        lo = x32.min(axis=1).astype(np.float64)
        scale = np.maximum(np.abs(hi), np.abs(lo))
        return np.isfinite(hi) & np.isfinite(lo) & (hi - lo <= CONST_RTOL * scale)


def centred_unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm, in float64; constant rows become zero.

    Parameters
    ----------
    x : ndarray, shape (K, T)

    Returns
    -------
    ndarray, float64, shape (K, T)
    """
    xc = np.asarray(x, dtype=np.float64)
    mean = xc.mean(axis=1, keepdims=True)
    xc = xc - mean
    norm = np.sqrt(np.einsum("ij,ij->i", xc, xc))
    # the rule of cmdtool.method.kernels.is_flat: spread at rounding level of the mean
    limit = FLAT_RTOL * np.maximum(np.abs(mean[:, 0]), 1e-30) * np.sqrt(x.shape[1])
    flat = ~np.isfinite(norm) | (norm <= limit) | constant_rows(x)
    norm[flat] = 1.0
    out = xc / norm[:, None]
    out[flat] = 0.0
    return out


def abs_corr(x: np.ndarray) -> np.ndarray:
    """|corr| between the rows of ``x`` over the epoch axis; 0 where a row is constant.

    Parameters
    ----------
    x : ndarray, shape (K, T)

    Returns
    -------
    ndarray, float64, shape (K, K), values in [0, 1], symmetric, 1 on the diagonal of
    the non-constant rows
    """
    u = centred_unit_rows(x)
    c = np.abs(u @ u.T)
    # exactly symmetric with a unit diagonal, as |corr| is: the reference rule's ties
    # (a two-member mode) are then exact ties, broken by the DESIGN rule (earlier sample)
    c += c.T
    c *= 0.5
    live = np.flatnonzero(np.einsum("ij,ij->i", u, u) > 0)
    c[live, live] = 1.0
    return np.clip(c, 0.0, 1.0, out=c)


@dataclass(frozen=True)
class Modes:
    """Result of clustering the K samples.

    Attributes
    ----------
    labels : ndarray, int64, shape (K,)
        Mode of each sample, 0 = largest mode.
    ref_rows : ndarray, int64, shape (M,)
        Row (within the samples) of each mode's reference.
    corr : ndarray, float64, shape (K, K)
        The |corr| matrix of all K samples (zero rows for constant ones); the modes
        were cut from its rows and columns of the non-constant samples.
    constant : ndarray, bool, shape (K,)
        Samples left out of the clustering: constant (:func:`constant_rows`) or holding
        NaN/Inf. Their label is -1.
    """

    labels: np.ndarray
    ref_rows: np.ndarray
    corr: np.ndarray
    constant: np.ndarray

    @property
    def n_modes(self) -> int:
        return int(self.ref_rows.shape[0])


#: Pairs whose Gram-form squared distance is below this fraction of the rows' squared
#: norms are recomputed as the norm of the row difference (no cancellation there).
NEAR_RTOL = 1e-6


def row_distances(c: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``c``, condensed as
    ``scipy.spatial.distance.pdist(c)`` gives them.

    Identical rows are folded first (``np.unique``: they are exactly 0 apart). Between
    the distinct rows, the Gram form ``|s_i|^2 + |s_j|^2 - 2 s_i . s_j`` of the rows
    taken about their mean, ``s = c - mean`` (one BLAS product: ~10x faster than pdist
    at K = 1000; about the mean, rows that all lie close together, as when every sample
    follows one trajectory, do not cancel), with the pairs where it still cancels
    (squared distance below :data:`NEAR_RTOL` of the squared norms) recomputed
    directly; elsewhere it differs from pdist by rounding only (about 1e-12 of the
    distance).

    Parameters
    ----------
    c : ndarray, float64, shape (k, k')

    Returns
    -------
    ndarray, float64, shape (k (k - 1) / 2,)
    """
    c = np.ascontiguousarray(c, dtype=np.float64)
    uniq, inverse = np.unique(c, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    s = uniq - uniq.mean(axis=0)
    norm2 = np.einsum("ij,ij->i", s, s)
    d2 = s @ s.T
    d2 *= -2.0
    d2 += norm2[:, None]
    d2 += norm2[None, :]
    near = d2 <= NEAR_RTOL * (norm2[:, None] + norm2[None, :])
    iu, ju = np.nonzero(np.triu(near, 1))
    for lo in range(0, len(iu), 4096):  # bounded scratch: 4096 pairs at a time
        i, j = iu[lo : lo + 4096], ju[lo : lo + 4096]
        diff = uniq[i] - uniq[j]
        d2[i, j] = d2[j, i] = np.einsum("ij,ij->i", diff, diff)
    np.fill_diagonal(d2, 0.0)
    if not np.array_equal(inverse, np.arange(len(c))):  # np.unique sorts the rows
        d2 = d2[np.ix_(inverse, inverse)]
    flat = squareform(d2, force="tovector", checks=False)
    return np.sqrt(np.maximum(flat, 0.0, out=flat), out=flat)


def find_modes(
    samples: np.ndarray, *, n_modes: int | None = None, threshold: float | None = None
) -> Modes:
    """Cluster sampled trajectories into modes and pick each mode's reference.

    Constant samples (:func:`constant_rows`) and samples holding NaN or Inf take no
    part: they get label -1 and are never a reference. Complete linkage on the Euclidean
    distance between rows of the |corr| matrix of the other samples, cut into at most
    ``n_modes`` clusters (at most their number) or at ``threshold`` times the largest
    pairwise distance. Modes are numbered by size, largest first (ties: the mode holding
    the earlier sample first). The reference is the member with the largest mean |corr|
    to the members of its mode (ties: the earlier sample). When every sample is
    constant, there is one mode whose (constant) reference is the first sample.

    Parameters
    ----------
    samples : ndarray, shape (K, T)
    n_modes : int, optional
    threshold : float, optional, 0 < threshold <= 1

    Returns
    -------
    Modes
    """
    k = samples.shape[0]
    if (n_modes is None) == (threshold is None):
        raise UsageError("give exactly one of n_modes and threshold")
    if n_modes is not None and not 1 <= n_modes <= k:
        raise UsageError(f"n_modes={n_modes} must be >= 1 and <= the number of samples {k}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise UsageError(f"threshold={threshold} must be > 0 and <= 1")
    c = abs_corr(samples)
    finite = np.isfinite(np.asarray(samples, dtype=np.float64)).all(axis=1)
    constant = constant_rows(samples) | ~finite
    live = np.flatnonzero(~constant)
    if live.size == 0:  # nothing moves: one mode, a constant reference
        labels = np.zeros(k, dtype=np.int64)
        return Modes(labels=labels, ref_rows=np.zeros(1, np.int64), corr=c, constant=constant)
    sub = _cut(c[np.ix_(live, live)], n_modes, threshold)
    labels = np.full(k, -1, dtype=np.int64)
    labels[live] = sub.labels
    return Modes(labels=labels, ref_rows=live[sub.ref_rows], corr=c, constant=constant)


def _cut(c: np.ndarray, n_modes: int | None, threshold: float | None) -> Modes:
    """Steps 3-4 on the |corr| matrix (k, k) of the non-constant samples."""
    k = c.shape[0]
    if n_modes is not None:
        n_modes = min(n_modes, k)
    if k == 1:
        raw = np.ones(1, dtype=np.int64)
    else:
        dist = row_distances(c)
        tree = linkage(dist, method="complete")
        if n_modes is not None:
            raw = fcluster(tree, n_modes, criterion="maxclust")
        else:
            assert threshold is not None
            cut = threshold * float(dist.max()) if dist.size else 0.0
            raw = fcluster(tree, cut, criterion="distance")
    ids, first, counts = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))  # size descending, then first member
    relabel = np.empty(ids.max() + 1, dtype=np.int64)
    relabel[ids[order]] = np.arange(len(ids))
    labels = relabel[raw]
    refs = np.empty(len(ids), dtype=np.int64)
    for m in range(len(ids)):
        members = np.flatnonzero(labels == m)
        score = c[np.ix_(members, members)].mean(axis=1)
        refs[m] = members[int(np.argmax(score))]
    return Modes(labels=labels, ref_rows=refs, corr=c, constant=np.zeros(k, dtype=bool))
