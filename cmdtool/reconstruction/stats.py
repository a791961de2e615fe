"""Normalization statistics in a rebuilt checkpoint: the ``--stats`` treatments
(``docs/design.md``, "Constant parameters and normalization statistics").

The statistics are a few entries per normalized channel, so everything here reads and
computes them whole (S values per epoch, S x T' over the window), never N.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from cmdtool.decomposition.normstats import (
    STATS_ARRAYS,
    stats_labels,
    store_stats,
    treatment_of,
    window_fit,
)
from cmdtool.method.normstats import gate, safe_variances
from cmdtool.store.normstats import GATE, check_stats_choice, stats_columns

if TYPE_CHECKING:
    from cmdtool.decomposition import CMD

def apply_stats(
    model: CMD, row: int, flat: np.ndarray, ref_now: np.ndarray, stats: str | None = None
) -> None:
    """Replace the statistics entries of the rebuilt row ``flat`` (float32, (N,), in
    place) by the treatment ``stats`` (default: the decomposition's own).

    Parameters
    ----------
    model : CMD
    row : int
        Store row of the epoch rebuilt.
    flat : ndarray, float32, shape (N,)
        The rebuilt row, ``a · r + b`` for every parameter.
    ref_now : ndarray, float64, shape (M,)
        The references at that epoch.
    stats : str, optional
        One of :data:`cmdtool.store.normstats.STATS_CHOICES`.
    """
    st = model.store_
    tensors = store_stats(st)
    if not tensors:
        return
    treatment = check_stats_choice(stats or treatment_of(model.summary_))
    cols, var = stats_columns(tensors)
    raw = st.read_columns(np.array([row]), cols)[0].astype(np.float64)
    modelled = flat[cols].astype(np.float64)
    if treatment == "raw":
        values = raw
    elif treatment == "model":
        values = modelled
    elif treatment == "gated":
        groups = np.concatenate([np.full(t.size, i) for i, t in enumerate(tensors)])
        values = gate(modelled, raw, groups, GATE)
    else:
        fit = _window_arrays(model, cols)
        if treatment == "clamp":
            values = np.clip(modelled, fit["stats_lo"], fit["stats_hi"])
        else:  # positive: variances in log space, means affine
            # from the version the model holds (issue 11: readers see one decomposition)
            lab = model.read_pinned(lambda group: stats_labels(group, cols))
            logv = fit["stats_a"] * ref_now[lab] + fit["stats_b"]
            values = np.where(var, np.exp(np.minimum(logv, 88.0)), modelled)
    flat[cols] = safe_variances(values, raw, var).astype(np.float32)


def _window_arrays(model: CMD, cols: np.ndarray) -> dict[str, np.ndarray]:
    """The decomposition's stored ``stats_*`` arrays, or (made with another treatment)
    computed now over its window and kept on the model object."""
    cached = getattr(model, "_stats_fit", None)
    if cached is not None:
        return cached

    def read(group: Any) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        fit = {k: np.asarray(group[k][:]) for k in STATS_ARRAYS if k in group}
        if len(fit) < len(STATS_ARRAYS) or not np.array_equal(fit["stats_index"], cols):
            return fit, stats_labels(group, cols)
        return fit, None

    # from the version the model holds (issue 11: readers see one decomposition)
    fit, labels = model.read_pinned(read)
    if labels is not None:
        fit = window_fit(model.store_, model.window_rows_, model.ref_index_, labels)
    model._stats_fit = fit  # type: ignore[attr-defined]
    return fit
