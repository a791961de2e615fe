"""Normalization statistics of a store and the window fit of the ``positive`` and
``clamp`` treatments (``docs/design.md``, "Constant parameters and normalization
statistics").

The statistics are a few entries per normalized channel (S of them), so the window fit
reads S + M columns over the T' epochs of the window, never N.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from cmdtool.method.normstats import log_fit
from cmdtool.store import TrajectoryStore
from cmdtool.store.normstats import (
    LEGACY_STATS,
    StatsTensor,
    match_stats,
    stats_columns,
    stats_pattern_of,
)

#: Optional arrays of a results group (S,) written for ``positive`` and ``clamp``:
#: the statistics' columns, the log-space fit ``log v ≈ stats_a · r + stats_b`` of the
#: variances (0 for means) and each entry's observed range over the window.
STATS_ARRAYS = ("stats_index", "stats_a", "stats_b", "stats_lo", "stats_hi")


def store_stats(st: TrajectoryStore) -> list[StatsTensor]:
    """The tensors of ``st`` recognised as normalization statistics."""
    pattern, _ = stats_pattern_of(st.filters)
    return match_stats(st.params, pattern)


def treatment_of(attrs: dict[str, Any]) -> str:
    """A decomposition's treatment (``model`` when it predates them)."""
    return str(attrs.get("stats", LEGACY_STATS))


def stats_labels(group: zarr.Group, cols: np.ndarray) -> np.ndarray:
    """``labels[cols]`` of a results group, reading only those entries: int64 (S,)."""
    if not cols.size:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(group["labels"].oindex[cols], dtype=np.int64)  # type: ignore[union-attr]


def window_fit(
    st: TrajectoryStore, rows: np.ndarray, ref_index: np.ndarray, labels: np.ndarray
) -> dict[str, np.ndarray]:
    """The :data:`STATS_ARRAYS` over the window ``rows``.

    Parameters
    ----------
    st : TrajectoryStore
    rows : ndarray, int64, shape (T',)
    ref_index : ndarray, int64, shape (M,)
    labels : ndarray, int64, shape (S,)
        Mode of each statistics entry.

    Returns
    -------
    dict of str to ndarray, each of shape (S,)
    """
    cols, var = stats_columns(store_stats(st))
    if not cols.size:
        return {
            k: np.zeros(0, dtype=np.int64 if k == "stats_index" else np.float64)
            for k in STATS_ARRAYS
        }
    values = st.read_columns(rows, cols).astype(np.float64)  # (T', S)
    refs = st.read_columns(rows, ref_index).astype(np.float64)[:, labels]  # (T', S)
    a, b = log_fit(values, refs)
    return {
        "stats_index": cols,
        "stats_a": np.where(var, a, 0.0),
        "stats_b": np.where(var, b, 0.0),
        "stats_lo": values.min(axis=0),
        "stats_hi": values.max(axis=0),
    }
