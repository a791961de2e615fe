"""The numbers of a report: one streamed pass over ``weights`` plus the K samples.

Everything here is numpy; nothing is drawn. The N x T matrix is never held: the pass reads
one column block (all epochs) at a time and keeps per-(epoch, tensor) sums in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from cmdtool.method.clustering import abs_corr
from cmdtool.store import RESULT_ATTR, ParamInfo, TrajectoryStore
from cmdtool.store.results import ResultPin

EVALUATION_ATTR = "cmdtool_evaluation"
SWEEP_ATTR = "cmdtool_sweep"
COMPARE_ATTR = "cmdtool_compare"
#: Sampled members per mode drawn against their reconstruction.
MEMBERS_SHOWN = 3


@dataclass
class ReportData:
    """What the figures and ``report.json`` are made of.

    Attributes
    ----------
    summary : dict
        The content of ``report.json`` (see :data:`cmdtool.report.schema.SCHEMA`).
    epochs : ndarray, float64, shape (T,)
        Plot positions of all committed epochs: their labels minus ``epoch_offset``
        (:func:`epoch_positions`; labels are Python ints and may exceed int64).
    window_rows : ndarray, int64, shape (T',)
        Rows of the decomposition's window.
    ref_all : ndarray, float64, shape (M, T)
        Each mode's reference over all epochs.
    samples_all : ndarray, float64, shape (K, T)
        The K sampled parameters over all epochs.
    sample_modes : ndarray, int64, shape (K,)
        The mode of each sample.
    sample_a, sample_b : ndarray, float64, shape (K,)
        Affine coefficients of each sample.
    corr : ndarray, float64, shape (K, K)
        |corr| of the samples over the window.
    epoch_error, tensor_error : ndarray, float64
        Relative reconstruction error per epoch (T,) and per tensor (P,).
    tensor_shares : ndarray, float64, shape (P, M)
        Share of each mode in each tensor.
    tensor_names : list of str
    tensor_sizes : ndarray, int64, shape (P,)
    """

    summary: dict[str, Any]
    epochs: np.ndarray
    window_rows: np.ndarray
    ref_all: np.ndarray
    samples_all: np.ndarray
    sample_modes: np.ndarray
    sample_a: np.ndarray
    sample_b: np.ndarray
    corr: np.ndarray
    epoch_error: np.ndarray
    tensor_error: np.ndarray
    tensor_shares: np.ndarray
    tensor_names: list[str] = field(default_factory=list)
    tensor_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    epoch_offset: int = 0
    sample_names: list[str] = field(default_factory=list)

    @property
    def n_modes(self) -> int:
        return int(self.ref_all.shape[0])

    @property
    def evaluation(self) -> dict[str, Any] | None:
        return self.summary.get("evaluation")

    @property
    def sweep(self) -> dict[str, Any] | None:
        return self.summary.get("sweep")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """sqrt(num / den), 0 where den is 0."""
    out = np.zeros(np.shape(num), dtype=np.float64)
    np.divide(num, den, out=out, where=np.asarray(den) > 0)
    return np.sqrt(out)


#: Integers up to this size are exact in float64.
EXACT_FLOAT_INT = 2**53


def epoch_positions(labels: Sequence[int], offset: int | None = None) -> tuple[np.ndarray, int]:
    """Epoch labels as float64 plot positions, computed with Python ints.

    Parameters
    ----------
    labels : sequence of int, length T
        Epoch labels (any size: a 20-digit label does not fit int64).
    offset : int, optional
        Subtracted from every label; default 0, or the first label when a label is
        beyond 2**53, so that neighbouring labels stay distinct.

    Returns
    -------
    positions : ndarray, float64, shape (T,)
    offset : int
    """
    labs = [int(x) for x in labels]
    if offset is None:
        offset = labs[0] if labs and max(abs(x) for x in labs) > EXACT_FLOAT_INT else 0
    return np.array([float(x - offset) for x in labs], dtype=np.float64), offset


def _gather(arr: zarr.Array, cols: np.ndarray) -> np.ndarray:
    """``arr[cols]`` for unsorted, possibly repeated int64 ``cols`` (one sorted read)."""
    uniq, inv = np.unique(cols, return_inverse=True)
    return np.asarray(arr.oindex[uniq])[inv]  # type: ignore[index]


def _json_attr(group: zarr.Group, key: str) -> dict[str, Any] | None:
    value = group.attrs.asdict().get(key)
    return dict(value) if isinstance(value, dict) else None


def compute(st: TrajectoryStore, name: str = "cmd", *, pin: ResultPin | None = None) -> ReportData:
    """Compute the numbers of the report of decomposition ``name`` of ``st``.

    Every number comes from one published version: if a writer republishes ``name``
    during the pass, it starts again on the new one.

    Parameters
    ----------
    st : TrajectoryStore
        An open store (read-only is enough).
    name : str, default "cmd"
        The decomposition subgroup.
    pin : ResultPin, optional
        Compute from exactly this version (``CMD.pin_``), never another.

    Returns
    -------
    ReportData

    Raises
    ------
    DecompositionNotFoundError
        The store has no decomposition ``name``.
    ResultChangedError
        ``pin`` is given and that version was replaced.
    """
    return st.read_result(name, lambda _pin, group: _compute(st, name, group), expect=pin)


def locate(params: list[ParamInfo], column: int) -> dict[str, Any]:
    """The tensor holding ``column`` of ``weights`` and the column's index in it:
    ``{"tensor": name, "index": [i, j, ...], "name": "tensor[i, j]"}``."""
    for p in params:
        if p.offset <= column < p.offset + p.size:
            where = np.unravel_index(column - p.offset, p.shape) if p.shape else ()
            index = [int(i) for i in where]
            shown = f"{p.name}[{', '.join(map(str, index))}]"
            return {"tensor": p.name, "index": index, "name": shown}
    raise ValueError(f"column {column} is in no tensor")


def _compute(st: TrajectoryStore, name: str, group: zarr.Group) -> ReportData:
    """:func:`compute` on ``group``, the results group of one version (pinned by the caller)."""
    settings: dict[str, Any] = dict(group.attrs[RESULT_ATTR])  # type: ignore[arg-type]
    labels_arr: zarr.Array = group["labels"]  # type: ignore[assignment]
    a_arr: zarr.Array = group["a"]  # type: ignore[assignment]
    b_arr: zarr.Array = group["b"]  # type: ignore[assignment]
    ref_index = np.asarray(group["ref_index"][:], dtype=np.int64)  # type: ignore[index]
    sample_index = np.asarray(group["sample_index"][:], dtype=np.int64)  # type: ignore[index]
    m = int(ref_index.shape[0])
    n = st.n_params
    t = st.n_epochs
    all_rows = np.arange(t, dtype=np.int64)
    window_rows = np.asarray(settings["rows"], dtype=np.int64)
    in_window = np.zeros(t, dtype=bool)
    in_window[window_rows[window_rows < t]] = True

    ref_all = st.read_columns(all_rows, ref_index).T.astype(np.float64)  # (M, T)
    samples_all = st.read_columns(all_rows, sample_index).T.astype(np.float64)  # (K, T)
    sample_modes = _gather(labels_arr, sample_index).astype(np.int64)
    sample_a = _gather(a_arr, sample_index).astype(np.float64)
    sample_b = _gather(b_arr, sample_index).astype(np.float64)
    corr = abs_corr(samples_all[:, window_rows])

    params = sorted(st.params, key=lambda p: p.offset)
    n_tensors = len(params)
    bounds = np.array([p.offset for p in params] + [n], dtype=np.int64)
    err2 = np.zeros((t, n_tensors))  # sum (w - w_hat)^2 per (epoch, tensor)
    sq = np.zeros((t, n_tensors))  # sum w^2 per (epoch, tensor)
    counts = np.zeros((n_tensors, m), dtype=np.int64)
    mode_err2 = np.zeros((2, m))  # all epochs, window
    mode_sq = np.zeros((2, m))
    ref_t = ref_all.T  # (T, M)
    has_constant = "constant" in group
    n_constant = 0
    for start, stop in st.column_blocks():
        w = st.read_block(all_rows, start, stop).astype(np.float64)  # (T, B)
        lab = np.asarray(labels_arr[start:stop], dtype=np.int64)
        if has_constant:  # constant parameters are in no mode: slot m, dropped below
            const = np.asarray(group["constant"][start:stop], dtype=bool)  # type: ignore[index]
            n_constant += int(const.sum())
            lab_m = np.where(const, m, lab)
        else:
            lab_m = lab
        a = np.asarray(a_arr[start:stop], dtype=np.float64)
        b = np.asarray(b_arr[start:stop], dtype=np.float64)
        diff = w - (a * ref_t[:, lab] + b)
        e2 = diff * diff
        del diff
        w2 = w * w
        first = int(np.searchsorted(bounds, start, side="right")) - 1
        cuts = bounds[(bounds > start) & (bounds < stop)] - start
        seg = np.concatenate([[0], cuts]).astype(np.int64)
        tid = np.arange(first, first + len(seg))
        err2[:, tid] += np.add.reduceat(e2, seg, axis=1)
        sq[:, tid] += np.add.reduceat(w2, seg, axis=1)
        for j, (lo, hi) in enumerate(zip(seg, [*seg[1:], stop - start], strict=True)):
            counts[tid[j]] += np.bincount(lab_m[lo:hi], minlength=m + 1)[:m]
        for k, sel in enumerate((np.ones(t, dtype=bool), in_window)):
            mode_err2[k] += np.bincount(lab_m, weights=e2[sel].sum(axis=0), minlength=m + 1)[:m]
            mode_sq[k] += np.bincount(lab_m, weights=w2[sel].sum(axis=0), minlength=m + 1)[:m]

    sizes = np.array([p.size for p in params], dtype=np.int64)
    shares = counts / np.maximum(sizes, 1)[:, None]
    epoch_error = _ratio(err2.sum(axis=1), sq.sum(axis=1))
    tensor_error = _ratio(err2.sum(axis=0), sq.sum(axis=0))
    mode_sizes = counts.sum(axis=0)
    stored = n * t
    model = 2 * n + m * t
    summary: dict[str, Any] = {
        "report_version": 1,
        "decomposition": name,
        "settings": settings,
        "n_params": n,
        "n_epochs": t,
        "epochs": [int(x) for x in st.labels],
        "n_modes": m,
        "mode_sizes": [int(c) for c in mode_sizes],
        "mode_shares": [float(c) / max(n, 1) for c in mode_sizes],
        "tensors": [
            {
                "name": p.name,
                "shape": list(p.shape),
                "offset": p.offset,
                "size": int(sizes[i]),
                "mode_counts": [int(c) for c in counts[i]],
                "mode_shares": [float(s) for s in shares[i]],
                "relative_error": float(tensor_error[i]),
            }
            for i, p in enumerate(params)
        ],
        "relative_error": {
            "overall": float(_ratio(err2.sum(), sq.sum())),
            "window": float(_ratio(mode_err2[1].sum(), mode_sq[1].sum())),
            "per_mode": [float(e) for e in _ratio(mode_err2[0], mode_sq[0])],
            "per_mode_window": [float(e) for e in _ratio(mode_err2[1], mode_sq[1])],
            "per_epoch": [float(e) for e in epoch_error],
        },
        "compression": {
            "stored_values": stored,
            "model_values": model,
            "ratio": stored / model,
        },
        "constant": n_constant,
        "stats": str(settings.get("stats", "model")),
        "stats_tensors": list(settings.get("stats_tensors", [])),
        "references": [
            {"mode": k, "column": int(c), **locate(params, int(c))}
            for k, c in enumerate(ref_index)
        ],
        "high_error_epochs": [
            {"epoch": int(label), "relative_error": float(e)}
            for label, e in zip(st.labels, epoch_error, strict=True)
            if e > 1.0
        ],
    }
    for key, attr in (
        ("evaluation", EVALUATION_ATTR),
        ("sweep", SWEEP_ATTR),
        ("compare", COMPARE_ATTR),  # cmdtool compare (report/compare.py)
    ):
        value = _json_attr(group, attr)
        if value is not None:
            summary[key] = value
    positions, offset = epoch_positions(st.labels)
    return ReportData(
        summary=summary,
        epochs=positions,
        epoch_offset=offset,
        window_rows=window_rows,
        ref_all=ref_all,
        samples_all=samples_all,
        sample_modes=sample_modes,
        sample_a=sample_a,
        sample_b=sample_b,
        corr=corr,
        epoch_error=epoch_error,
        tensor_error=tensor_error,
        tensor_shares=shares,
        tensor_names=[p.name for p in params],
        tensor_sizes=sizes,
        sample_names=[str(locate(params, int(c))["name"]) for c in sample_index],
    )
