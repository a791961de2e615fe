"""|corr| of the sampled trajectories, complete-linkage modes and references (steps 2-4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from cmdtool.errors import UsageError
from cmdtool.method.kernels import FLAT_RTOL


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
    flat = ~np.isfinite(norm) | (norm <= limit)
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
    ndarray, float64, shape (K, K), values in [0, 1]
    """
    u = centred_unit_rows(x)
    return np.clip(np.abs(u @ u.T), 0.0, 1.0)


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
        The |corr| matrix the modes were cut from.
    """

    labels: np.ndarray
    ref_rows: np.ndarray
    corr: np.ndarray

    @property
    def n_modes(self) -> int:
        return int(self.ref_rows.shape[0])


def find_modes(
    samples: np.ndarray, *, n_modes: int | None = None, threshold: float | None = None
) -> Modes:
    """Cluster sampled trajectories into modes and pick each mode's reference.

    Complete linkage on the Euclidean distance between rows of the |corr| matrix, cut
    into at most ``n_modes`` clusters or at ``threshold`` times the largest pairwise
    distance. Modes are numbered by size, largest first (ties: the mode holding the
    earlier sample first). The reference is the member with the largest mean |corr|
    to the members of its mode (ties: the earlier sample).

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
    if k == 1:
        raw = np.ones(1, dtype=np.int64)
    else:
        dist = pdist(c)
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
    return Modes(labels=labels, ref_rows=refs, corr=c)
