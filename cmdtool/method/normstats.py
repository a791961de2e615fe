"""Rebuilding normalization statistics: the pure mathematics of the ``--stats`` treatments.

Everything works on the S statistics entries of one epoch (or S x T' over a window), a
small set next to N (two numbers per normalized channel), in float64.
"""

from __future__ import annotations

import numpy as np

#: Smallest variance a log-space fit takes the logarithm of.
TINY = 1e-30


def log_fit(values: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``log v ≈ a · r + b`` column by column (the ``positive`` treatment).

    Parameters
    ----------
    values : ndarray, shape (T', S)
        Variances over the window (values <= 0 are taken as :data:`TINY`).
    refs : ndarray, shape (T', S)
        Each entry's reference over the same epochs.

    Returns
    -------
    a, b : ndarray, float64, shape (S,)
        ``exp(a · r(t) + b)`` is the rebuilt variance, positive at every epoch;
        a constant reference gives ``a = 0``, ``b`` = the mean of ``log v``.
    """
    lv = np.log(np.maximum(np.asarray(values, dtype=np.float64), TINY))
    r = np.asarray(refs, dtype=np.float64)
    rc = r - r.mean(axis=0)
    den = np.einsum("ts,ts->s", rc, rc)
    num = np.einsum("ts,ts->s", rc, lv - lv.mean(axis=0))
    a = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    b = lv.mean(axis=0) - a * r.mean(axis=0)
    return a, b


def gate(model: np.ndarray, raw: np.ndarray, groups: np.ndarray, limit: float) -> np.ndarray:
    """The ``gated`` treatment: per group (tensor), the model's values unless they are
    more than ``limit`` away from the stored ones, relative (``‖v̂ - v‖ / ‖v‖``).

    Parameters
    ----------
    model, raw : ndarray, shape (S,)
        Modelled and stored values at one epoch.
    groups : ndarray, int64, shape (S,)
        Tensor of each entry (0 .. G-1).
    limit : float

    Returns
    -------
    ndarray, float64, shape (S,)
    """
    m = np.asarray(model, dtype=np.float64)
    v = np.asarray(raw, dtype=np.float64)
    g = np.asarray(groups, dtype=np.int64)
    n = int(g.max()) + 1 if g.size else 0
    err2 = np.bincount(g, weights=(m - v) ** 2, minlength=n)
    sq = np.bincount(g, weights=v * v, minlength=n)
    bad = ~np.isfinite(err2) | (err2 > limit * limit * sq)
    return np.where(bad[g], v, m)


def safe_variances(values: np.ndarray, raw: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Whatever the treatment, a variance is never negative nor non-finite: where it
    would be, the stored value at that epoch is used (0 if that is not usable either).

    Parameters
    ----------
    values, raw : ndarray, shape (S,)
    variance : ndarray, bool, shape (S,)

    Returns
    -------
    ndarray, float64, shape (S,)
    """
    out = np.asarray(values, dtype=np.float64).copy()
    v = np.asarray(raw, dtype=np.float64)
    bad = variance & ~(np.isfinite(out) & (out >= 0))
    fallback = np.where(np.isfinite(v) & (v >= 0), v, 0.0)
    out[bad] = fallback[bad]
    return out
