"""Sanity tests of the float64 numpy oracle in cmd_reference.py."""

from __future__ import annotations

import numpy as np
import pytest

from tests import cmd_reference as ref


def planted(n: int = 600, t: int = 40, noise: float = 1e-3, seed: int = 0):
    """Trajectories built from 3 uncorrelated profiles with random a, b and small noise."""
    rng = np.random.default_rng(seed)
    s = np.arange(t) / t
    profiles = np.stack([np.sin(2 * np.pi * s), np.cos(2 * np.pi * s), np.sin(6 * np.pi * s)])
    truth = rng.integers(0, 3, size=n)
    a = rng.uniform(0.5, 2.0, size=n) * rng.choice([-1.0, 1.0], size=n)
    b = rng.normal(size=n)
    W = a[:, None] * profiles[truth] + b[:, None] + noise * rng.normal(size=(n, t))
    return W, truth


def assert_same_partition(labels: np.ndarray, truth: np.ndarray) -> None:
    for g in np.unique(truth):
        assert np.unique(labels[truth == g]).size == 1
    assert np.unique(labels).size == np.unique(truth).size


def test_abs_corr_matches_corrcoef():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(7, 25))
    Y = rng.normal(size=(5, 25))
    expected = np.abs(np.corrcoef(X, Y)[:7, 7:])
    np.testing.assert_allclose(ref.abs_corr(X, Y), expected, rtol=1e-12, atol=1e-12)


def test_abs_corr_constant_rows_are_zero():
    X = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 4.0]])
    C = ref.abs_corr(X, X)
    assert np.isfinite(C).all()
    assert C[0].tolist() == [0.0, 0.0] and C[:, 0].tolist() == [0.0, 0.0]
    assert C[1, 1] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", [{"n_modes": 3}, {"threshold": 0.5}])
def test_planted_profiles_are_recovered(mode):
    W, truth = planted()
    rng = np.random.default_rng(2)
    sample_index = np.sort(rng.choice(len(W), size=150, replace=False))
    labels_s, ref_rows = ref.cluster(W[sample_index], **mode)
    assert_same_partition(labels_s, truth[sample_index])
    sizes = np.bincount(labels_s)
    assert (np.diff(sizes) <= 0).all()  # numbered by size, largest first
    assert (labels_s[ref_rows] == np.arange(3)).all()  # each reference is in its mode

    out = ref.fit(W, sample_index, **mode)
    assert_same_partition(out["labels"], truth)
    assert out["rel_error"] < 1e-2
    W_hat = ref.reconstruct(W, out["labels"], out["a"], out["b"], out["ref_index"])
    np.testing.assert_allclose(W_hat, W, atol=1e-2)


def test_constant_row_gets_zero_slope():
    W, _ = planted(n=200, seed=3)
    W[5] = 0.25
    sample_index = np.arange(0, 200, 2)
    out = ref.fit(W, sample_index, n_modes=3)
    assert out["a"][5] == 0.0
    assert out["b"][5] == pytest.approx(0.25)
    assert out["labels"][5] == 0  # all-zero |corr| row -> lowest mode number


def test_reconstruct_outside_window_uses_reference_values():
    W, _ = planted(n=100, t=30, seed=4)
    out = ref.fit(W[:, :20], np.arange(0, 100, 2), n_modes=3)
    W_hat = ref.reconstruct(W, out["labels"], out["a"], out["b"], out["ref_index"])
    assert W_hat.shape == W.shape
    # A reference reproduces itself exactly (a = 1, b = 0) at every epoch.
    for m, i in enumerate(out["ref_index"]):
        assert out["labels"][i] == m
        np.testing.assert_allclose(W_hat[i], W[i], atol=1e-12)
