"""The streamed kernel (steps 5-6) against the float64 oracle of tests/cmd_reference.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmdtool.method.kernels import References, fit_block
from tests import cmd_reference as ref

CPU = torch.device("cpu")


def _window(seed: int, n: int = 3001, t: int = 23, m: int = 5):
    """Columns of m planted profiles (offsets up to 1e3, spreads 1e-3..1), constants,
    near-constants and a NaN column; returns (x float32 (t, n), references (m, t))."""
    rng = np.random.default_rng(seed)
    prof = np.cumsum(rng.normal(size=(m, t)), axis=1)
    lab = rng.integers(0, m, size=n)
    scale = 10.0 ** rng.uniform(-3, 0, size=n)
    offset = rng.choice([0.0, 1.0, -5.0, 1e3], size=n)
    w = offset[:, None] + scale[:, None] * (
        rng.normal(size=n)[:, None] * prof[lab] + 0.05 * rng.normal(size=(n, t))
    )
    w[:40] = rng.normal(size=(40, 1))  # exactly constant
    w[40:80] = 3.0 * (1 + 1e-7 * rng.integers(-2, 3, size=(40, t)))  # near-constant
    w[80:90] = 1e-39  # constant subnormals
    w[95, 4] = np.nan
    x = np.ascontiguousarray(w.T.astype(np.float32))
    return x, x[:, rng.choice(np.arange(100, n), size=m, replace=False)].T.copy()


def _oracle(x: np.ndarray, r: np.ndarray):
    """Labels, a, b, constant flags of every column, float64 on the float32 values."""
    w = x.T.astype(np.float64)
    rr = r.astype(np.float64)
    labels = np.argmax(ref.abs_corr(w, rr), axis=1)
    const = ref.constant(w)
    labels[const] = 0
    a, b = ref._affine(w, rr[labels])
    a[const] = 0.0
    b[const] = w[const].mean(axis=1)
    return labels, a, b, const


@pytest.mark.parametrize("seed, width, workers", [(0, None, 1), (1, 256, 1), (2, 300, 3)])
def test_labels_a_b_match_the_float64_oracle(seed, width, workers):
    # guards: fit_block's shifted float32 passes per sub-block, the assignment in the (M, w)
    # layout and the float64 combination of the per-column sums
    x, r = _window(seed)
    fit = fit_block(torch.from_numpy(x.copy()), References.from_trajectories(r, CPU),
                    width=width, workers=workers)
    labels, a, b, const = _oracle(x, r)
    ok = np.isfinite(x).all(axis=0)
    assert np.array_equal(fit.constant, const)
    assert np.array_equal(fit.labels[ok], labels[ok])
    scale = np.abs(x).max(axis=0)
    spread = x.max(axis=0).astype(np.float64) - x.min(axis=0)
    # a within 1e-6 of its size, or of the column's spread over the reference's; b within
    # 1e-6 of the magnitude of its terms, w and a * mean(r) (measured: 4e-7)
    rspread = (r.max(axis=1) - r.min(axis=1)).astype(np.float64)[labels]
    rmean = np.abs(r.astype(np.float64).mean(axis=1))[labels]
    assert np.all(np.abs(fit.a - a)[ok] <= 1e-6 * (np.abs(a) + spread / rspread)[ok])
    assert np.all(np.abs(fit.b - b)[ok] <= 1e-6 * (scale + np.abs(a) * rmean)[ok])
    assert np.array_equal(fit.b[:40], x[0, :40]) and np.all(fit.a[const] == 0)  # bit for bit
    assert fit.labels[95] == 0 and fit.a[95] == 0 and np.isnan(fit.b[95])
    # per-mode totals: squared residuals of the oracle's fit, constants in slot M
    w = x.T.astype(np.float64)
    resid = w - (a[:, None] * r.astype(np.float64)[labels] + b[:, None])
    err2 = np.bincount(np.where(const, len(r), labels)[ok], (resid[ok] ** 2).sum(axis=1),
                       minlength=len(r) + 1)
    assert np.allclose(fit.err2, err2, rtol=1e-4, atol=1e-9 * (w[ok] ** 2).sum())
    assert fit.count.tolist() == np.bincount(np.where(const, len(r), labels)[ok],
                                             minlength=len(r) + 1).tolist()


def test_pieces_and_threads_do_not_change_the_results():
    # guards: the sub-block and group boundaries (fixed, whatever the worker count) and
    # the per-mode totals added piece by piece in column order
    x, r = _window(7, n=5000)
    refs = References.from_trajectories(r, CPU)
    one = fit_block(torch.from_numpy(x.copy()), refs, width=128, workers=1)
    three = fit_block(torch.from_numpy(x.copy()), refs, width=128, workers=3)
    for key in ("labels", "a", "b", "constant", "err2", "sq", "count", "sum_w", "sum_wr"):
        assert np.array_equal(getattr(one, key), getattr(three, key), equal_nan=True), key


def test_ties_go_to_the_lowest_mode():
    # guards: the tie rule of the assignment (eq with the best score, then the lowest id)
    t = 9
    base = np.sin(np.arange(t, dtype=np.float64))
    other = np.cos(np.arange(t, dtype=np.float64))
    r = np.stack([other, base, -base, base]).astype(np.float32)  # modes 1, 2, 3 tie
    x = np.ascontiguousarray(np.stack([2 * base + 1, other, -3 * other, base * 0 + 7]).T)
    x = x.astype(np.float32)
    fit = fit_block(torch.from_numpy(x.copy()), References.from_trajectories(r, CPU), width=2)
    assert fit.labels.tolist() == [1, 0, 0, 0]
    assert fit.constant.tolist() == [False, False, False, True]
    assert np.allclose(fit.a[:3], [2, 1, -3], rtol=1e-6) and fit.b[3] == 7


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the oracle on the NaN/Inf columns
def test_the_middle_epoch_shift_keeps_outliers_constants_and_nan_right():
    # guards: the shift by the middle epoch's value (the product and squares see
    # x - x[T//2]), the exact-extremes read of the constant rule from the untouched x, and
    # the non-finite test of the float64 fit (a NaN or Inf at the shift row itself)
    t, rng = 24, np.random.default_rng(11)
    prof = np.cumsum(rng.normal(size=(3, t)), axis=1)
    cols = [1e3 + 1e-3 * (prof[i % 3] + 0.05 * rng.normal(size=t)) for i in range(30)]
    for i in range(10):  # the middle value is the outlier, on a large offset
        c = 1e3 + 1e-3 * (prof[i % 3] + 0.05 * rng.normal(size=t))
        c[t // 2] += 0.5
        cols.append(c)
    near = np.full(t, 3.0)
    near[t // 2] = np.nextafter(np.float32(3.0), np.float32(4.0))  # constant by the rule
    off = np.full(t, 3.0)
    off[t // 2] = 3.0 * (1 + 1e-5)  # not constant
    nan_mid, inf_end = np.full(t, 2.0), np.full(t, 2.0)
    nan_mid[t // 2], inf_end[-1] = np.nan, np.inf
    x = np.ascontiguousarray(np.stack([*cols, near, off, nan_mid, inf_end]).T.astype(np.float32))
    r = prof.astype(np.float32)
    before = x.copy()
    xt = torch.from_numpy(x)
    fit = fit_block(xt, References.from_trajectories(r, CPU), width=16, workers=2)
    assert np.array_equal(xt.numpy(), before, equal_nan=True)  # x is left as it was
    labels, a, b, const = _oracle(x, r)
    ok = np.isfinite(x).all(axis=0)
    assert np.array_equal(fit.constant, const)
    assert const[-4:].tolist() == [True, False, False, False]
    assert np.array_equal(fit.labels[ok], labels[ok])
    spread = x.max(axis=0).astype(np.float64) - x.min(axis=0)
    rspread = (r.max(axis=1) - r.min(axis=1)).astype(np.float64)[labels]
    rmean = np.abs(r.astype(np.float64).mean(axis=1))[labels]
    assert np.all(np.abs(fit.a - a)[ok] <= 1e-6 * (np.abs(a) + spread / rspread)[ok])
    assert np.all(np.abs(fit.b - b)[ok] <= 1e-6 * (np.abs(x).max(axis=0) + np.abs(a) * rmean)[ok])
    assert fit.a[-4] == 0 and fit.b[-4] == np.float32(b[-4]) and fit.a[-3] != 0
    assert fit.labels[-2:].tolist() == [0, 0] and fit.a[-2:].tolist() == [0, 0]
    assert np.isnan(fit.b[-2]) and np.isinf(fit.b[-1])
    assert fit.count.sum() == x.shape[1] - 2  # the NaN and Inf columns are left out


@pytest.mark.parametrize("t", [1, 2])
def test_windows_of_one_and_two_epochs(t):
    # guards: the shift row T//2 at its edges (row 0 for T' = 1, row 1 for T' = 2)
    x = np.array([[1.5, -2.0, 0.0, 7.25], [1.5, -3.0, 1.0, 7.25]], dtype=np.float32)[:t]
    r = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)[:, :t]
    fit = fit_block(torch.from_numpy(x.copy()), References.from_trajectories(r, CPU))
    labels, a, b, const = _oracle(x, r)
    assert fit.constant.tolist() == const.tolist() and fit.labels.tolist() == labels.tolist()
    assert np.allclose(fit.a, a, rtol=1e-6, atol=0) and np.allclose(fit.b, b, rtol=1e-6, atol=0)
    assert np.array_equal(fit.b[const], x[0, const])  # constants bit for bit
