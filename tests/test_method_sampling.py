from itertools import pairwise

import numpy as np
import pytest

from cmdtool.errors import UsageError
from cmdtool.method.sampling import sample_indices, tensor_budgets


def test_budgets_follow_the_design_rule():
    sizes = [10, 5000, 300, 100_000]
    k = 1000
    budget = tensor_budgets(sizes, k)
    assert budget.sum() == k
    floor = k // (2 * len(sizes))  # 125
    # every tensor gets at least min(size, K / 2L)
    assert all(b >= min(s, floor) for b, s in zip(budget, sizes, strict=True))
    assert budget[0] == 10  # capped by its size
    # the other half goes by size: the largest tensor takes the most of it
    extra = budget - np.minimum(sizes, floor)
    assert extra[3] > extra[1] > extra[2]
    assert abs(extra[3] / extra.sum() - 100_000 / sum(sizes)) < 0.02


def test_samples_unique_sorted_seeded_and_per_tensor():
    sizes = [50, 2000, 7]
    idx = sample_indices(sizes, 200, seed=4)
    assert idx.dtype == np.int64 and len(idx) == 200
    assert len(np.unique(idx)) == 200 and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, sample_indices(sizes, 200, seed=4))
    assert not np.array_equal(idx, sample_indices(sizes, 200, seed=5))
    bounds = np.cumsum([0, *sizes])
    per = [int(((idx >= lo) & (idx < hi)).sum()) for lo, hi in pairwise(bounds)]
    assert per == list(tensor_budgets(sizes, 200))
    assert per[2] == 7  # a small tensor is sampled completely


def test_uniform_when_few_samples_per_tensor():
    # guards: the K/2 <= L switch to uniform sampling in sample_indices
    sizes = [3] * 40  # K/2 = 20 <= L = 40
    idx = sample_indices(sizes, 40, seed=0)
    assert len(np.unique(idx)) == 40 and idx.max() < 120
    # one large tensor and 39 single values, K = 2L = 80: the per-tensor rule would give
    # every tensor min(size, K // 2L) = 1 sample, so all 39 singles; uniform sampling over
    # N = 1039 hits each single with probability K / N = 7.7%, about 3 of them per draw
    sizes = [1000] + [1] * 39
    n, k, draws = sum(sizes), 80, 200
    hits = np.zeros(n, dtype=np.int64)
    for seed in range(draws):
        idx = sample_indices(sizes, k, seed=seed)
        assert len(np.unique(idx)) == k and np.all(np.diff(idx) > 0) and idx.max() < n
        assert (idx >= 1000).sum() < 20, seed  # far from all 39 singles
        hits[idx] += 1
    # every column equally likely: the singles' share of all draws is 39 / N (binomial,
    # mean 600.6, sd 24: within 5 sd), and so is any block of 100 columns of the big tensor
    expected = draws * k / n
    assert abs(hits[1000:].sum() - 39 * expected) < 5 * np.sqrt(39 * expected)
    blocks = hits[:1000].reshape(10, 100).sum(axis=1)
    assert np.all(np.abs(blocks - 100 * expected) < 5 * np.sqrt(100 * expected)), blocks


def test_k_equal_n_takes_everything_and_k_over_n_is_refused():
    assert np.array_equal(sample_indices([4, 6], 10), np.arange(10))
    with pytest.raises(UsageError, match="samples=11 must be <= the number of parameters 10"):
        sample_indices([4, 6], 11)


def test_pool_draws_keep_the_budgets_and_stay_in_the_pool():
    from cmdtool.method.sampling import sample_from_pool

    sizes = [50, 20_000, 7, 300_000]
    pool = sample_indices(sizes, 4096, seed=0)
    picked = sample_from_pool(sizes, pool, 1000, seed=3)
    assert picked is not None and len(np.unique(picked)) == 1000
    assert np.isin(picked, pool).all()
    bounds = np.cumsum([0, *sizes])
    per = [int(((picked >= lo) & (picked < hi)).sum()) for lo, hi in pairwise(bounds)]
    assert per == list(tensor_budgets(sizes, 1000))
    assert np.array_equal(picked, sample_from_pool(sizes, pool, 1000, seed=3))
    assert sample_from_pool(sizes, pool, 5000, seed=0) is None  # more than the pool holds
    assert sample_from_pool(sizes, pool, 6, seed=0) is None  # K/2 <= L: uniform over N
