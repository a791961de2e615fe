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
    sizes = [3] * 40  # K/2 = 20 <= L = 40
    idx = sample_indices(sizes, 40, seed=0)
    assert len(np.unique(idx)) == 40 and idx.max() < 120


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
