"""Choose the K sampled parameters (DESIGN.md step 1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmdtool.errors import UsageError


def tensor_budgets(sizes: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """How many of the K samples each tensor gets.

    Each of the L tensors gets ``min(size, K // (2 L))``; the rest of K is spread over
    the tensors in proportion to their sizes (largest remainder, capped by what each
    tensor has left). When ``K / 2 <= L`` the caller samples uniformly instead.

    Parameters
    ----------
    sizes : sequence of int, length L
        Number of parameters in each modeled tensor.
    k : int
        Total number of samples, ``k <= sum(sizes)``.

    Returns
    -------
    ndarray, int64, shape (L,)
        Budgets summing to ``k``.
    """
    sz = np.asarray(sizes, dtype=np.int64)
    base = np.minimum(sz, k // (2 * len(sz)))
    budget = base.copy()
    left = k - int(budget.sum())
    while left > 0:
        room = sz - budget
        open_ = room > 0
        share = sz * open_ / max(int((sz * open_).sum()), 1) * left
        add = np.minimum(np.floor(share).astype(np.int64), room)
        rest = left - int(add.sum())
        if rest > 0:
            # largest fractional parts first, ties to the earlier tensor
            frac = np.where(open_ & (room > add), share - np.floor(share), -1.0)
            order = np.argsort(-frac, kind="stable")[:rest]
            add[order[frac[order] >= 0]] += 1
        budget += add
        left = k - int(budget.sum())
    return budget


def sample_indices(sizes: Sequence[int] | np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The K sampled columns of ``weights``, without replacement.

    Parameters
    ----------
    sizes : sequence of int, length L
        Number of parameters in each modeled tensor, in store order.
    k : int
        Number of samples.
    seed : int
        Seed of the random generator; the same inputs always give the same samples.

    Returns
    -------
    ndarray, int64, shape (k,)
        Sorted global column indices.
    """
    sz = np.asarray(sizes, dtype=np.int64)
    n = int(sz.sum())
    if k < 1:
        raise UsageError(f"samples={k} must be >= 1")
    if k > n:
        raise UsageError(f"samples={k} must be <= the number of parameters {n}")
    rng = np.random.default_rng(seed)
    if k / 2 <= len(sz):
        return np.sort(rng.choice(n, size=k, replace=False).astype(np.int64))
    offsets = np.concatenate([[0], np.cumsum(sz)[:-1]])
    picks = [
        off + rng.choice(size, size=int(b), replace=False).astype(np.int64)
        for off, size, b in zip(offsets, sz, tensor_budgets(sz, k), strict=True)
        if b > 0
    ]
    return np.sort(np.concatenate(picks))


def sample_from_pool(
    sizes: Sequence[int] | np.ndarray, pool_index: np.ndarray, k: int, seed: int = 0
) -> np.ndarray | None:
    """The K samples drawn from an ingest-time pool with the per-tensor budgets of
    :func:`tensor_budgets`, or None when the pool cannot serve them.

    The pool itself was drawn with the same rule, so each tensor's share of it is at
    least its share of K whenever K <= pool size; the uniform case (``K / 2 <= L``) and a
    pool too small for some tensor's budget return None (the caller then samples the
    whole store).

    Parameters
    ----------
    sizes : sequence of int, length L
    pool_index : ndarray, int64, shape (P,), sorted
    k : int
    seed : int

    Returns
    -------
    ndarray, int64, shape (k,), sorted global columns, or None
    """
    sz = np.asarray(sizes, dtype=np.int64)
    n = int(sz.sum())
    if k < 1 or k > n:
        sample_indices(sizes, k, seed)  # raises the documented error
    if k > len(pool_index) or k / 2 <= len(sz):
        return None
    bounds = np.concatenate([[0], np.cumsum(sz)])
    cuts = np.searchsorted(pool_index, bounds)
    budget = tensor_budgets(sz, k)
    if np.any(np.diff(cuts) < budget):
        return None
    rng = np.random.default_rng(seed)
    picks = [
        pool_index[lo:hi][rng.choice(hi - lo, size=int(b), replace=False)]
        for lo, hi, b in zip(cuts[:-1], cuts[1:], budget, strict=True)
        if b > 0
    ]
    return np.sort(np.concatenate(picks).astype(np.int64))
