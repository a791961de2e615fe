"""Fold epochs ingested after a decomposition's window into it (online CMD on a store).

The decomposition keeps its modes, references and labels; only ``a``, ``b``, the running
sums (:mod:`cmdtool.method.running`), ``ref_traj`` and the summary figures change, to exactly what
a batch fit over the longer window with the same references would give (up to float
rounding). Only the new rows of ``weights`` are read, plus the decomposition's own O(N)
arrays, so the cost grows with the number of new epochs, not with the run's length.

The updated results group is written as a new hidden group and published by the same
rename as ``decompose``: a crash leaves the previous decomposition in place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr

from cmdtool.errors import MismatchError, UsageError
from cmdtool.method.running import (
    ParamSums,
    ReferenceSums,
    coefficients,
    mode_totals,
    relative_errors,
)
from cmdtool.store import RESULT_ATTR, RESULT_COLUMNS, TrajectoryStore, as_store, check_result_name
from cmdtool.store.integrity import create_array
from cmdtool.store.layout import OPTIONAL_RESULT_COLUMNS

if TYPE_CHECKING:
    from cmdtool.ingestion import IngestSummary

Progress = Callable[[int, int], None]
SUMS = ("sum_w", "sum_w2", "sum_wr")


@dataclass
class UpdateSummary:
    """What an update did.

    ``added`` are the epoch labels folded in (empty when the decomposition was already up
    to date), ``rows_read`` the rows of ``weights`` read, ``n_epochs`` the epochs the
    decomposition now covers.
    """

    store: str
    name: str
    added: list[int] = field(default_factory=list)
    rows_read: int = 0
    n_epochs: int = 0
    n_modes: int = 0
    relative_error: float = 0.0
    mode_errors: list[float] = field(default_factory=list)
    seconds: float = 0.0


def new_rows(st: TrajectoryStore, attrs: dict[str, Any]) -> np.ndarray:
    """Rows after the window, continuing its stride: int64, (k,)."""
    rows = attrs["rows"]
    stride = int(attrs.get("stride", 1))
    return np.arange(int(rows[-1]) + stride, st.n_epochs, stride, dtype=np.int64)


def update(
    store: TrajectoryStore | str | os.PathLike[str],
    name: str = "cmd",
    *,
    progress: Progress | None = None,
) -> UpdateSummary:
    """Fold the epochs ingested after decomposition ``name``'s window into it.

    Parameters
    ----------
    store : TrajectoryStore or path
        Opened for writing here when a path (the write lock is held meanwhile).
    name : str
        The decomposition (results group) to update.
    progress : callable(done, total), optional
        Columns done of N.

    Returns
    -------
    UpdateSummary

    Raises
    ------
    DecompositionNotFoundError
        No decomposition ``name``.
    UsageError
        The decomposition has no running sums (made by an older cmdtool).
    MismatchError
        Its arrays do not match the store's parameters.
    """
    t0 = time.perf_counter()
    check_result_name(name)
    st = as_store(store, "r+")
    try:
        old = st.open_result(name)
        attrs: dict[str, Any] = dict(old.attrs[RESULT_ATTR])  # type: ignore[arg-type]
        _check(st, old, name)
        rows = new_rows(st, attrs)
        if rows.size:
            with st.writing_result(name) as group:
                _fold(st, old, group, attrs, rows, progress, t0)
                st.publish_result(name)
    finally:
        if st is not store:
            st.close()
    return UpdateSummary(
        store=str(st.path),
        name=name,
        added=[st.labels[int(r)] for r in rows],
        rows_read=int(rows.size),
        n_epochs=len(attrs["rows"]),
        n_modes=int(attrs["n_modes"]),
        relative_error=float(attrs["relative_error"]),
        mode_errors=list(attrs["mode_errors"]),
        seconds=time.perf_counter() - t0,
    )


def _check(st: TrajectoryStore, group: zarr.Group, name: str) -> None:
    missing = [k for k in SUMS if k not in group]
    if missing:
        raise UsageError(
            f"decomposition {name!r} in {st.path} has no running sums ({', '.join(missing)}): "
            "it was made by an older cmdtool; run 'cmdtool decompose' again to update it later"
        )
    for key, _ in RESULT_COLUMNS:
        if key in OPTIONAL_RESULT_COLUMNS and key not in group:
            continue
        shape = group[key].shape  # type: ignore[union-attr]
        if shape != (st.n_params,):
            raise MismatchError(
                f"decomposition {name!r} in {st.path}: array {key!r} has shape {shape}, "
                f"the store has {st.n_params} parameters; decompose it again"
            )


def _fold(
    st: TrajectoryStore,
    old: zarr.Group,
    group: zarr.Group,
    attrs: dict[str, Any],
    rows: np.ndarray,
    progress: Progress | None,
    t0: float,
) -> None:
    """Write the updated decomposition into the partial ``group``; ``attrs`` is updated
    in place."""
    ref_index = np.asarray(old["ref_index"][:], dtype=np.int64)  # type: ignore[index]
    ref_traj = np.asarray(old["ref_traj"][:], dtype=np.float32)  # type: ignore[index]
    ref_new = st.read_columns(rows, ref_index)  # (k, M), from the pool when it holds them
    refs = ReferenceSums.from_trajectories(ref_traj)
    refs.fold(ref_new)
    m = ref_index.shape[0]

    n, chunk = st.n_params, st.chunk
    arrays = {
        key: create_array(group, key, shape=(n,), chunks=(min(chunk, n),), dtype=dt)
        for key, dt in RESULT_COLUMNS
    }
    # slots 0..m-1: the modes; slot m: the parameters constant over the first window
    err2, sq, count = np.zeros(m + 1), np.zeros(m + 1), np.zeros(m + 1, dtype=np.int64)
    has_constant = "constant" in old
    for start, stop in st.column_blocks():
        labels = torch.from_numpy(np.asarray(old["labels"][start:stop])).to(torch.int64)  # type: ignore[index]
        constant = torch.from_numpy(
            np.asarray(old["constant"][start:stop], dtype=bool)  # type: ignore[index]
            if has_constant
            else np.zeros(stop - start, dtype=bool)
        )
        sums = ParamSums(
            *(torch.from_numpy(np.asarray(old[k][start:stop], dtype=np.float64)) for k in SUMS)  # type: ignore[index]
        )
        block = st.read_block(rows, start, stop)
        sums.fold(block, ref_new, refs, labels)
        coef = coefficients(sums, refs, labels, constant)
        b = coef.b.to(torch.float32).numpy()
        # a constant that has not moved keeps its value bit for bit
        old_b = np.asarray(old["b"][start:stop], dtype=np.float32)  # type: ignore[index]
        still = constant.numpy() & np.all(block == old_b, axis=0)
        b[still] = old_b[still]
        arrays["labels"][start:stop] = labels.to(torch.int32).numpy()
        arrays["a"][start:stop] = coef.a.to(torch.float32).numpy()
        arrays["b"][start:stop] = b
        arrays["constant"][start:stop] = constant.numpy()
        for key in SUMS:
            arrays[key][start:stop] = getattr(sums, key).numpy()
        e, s, c = mode_totals(labels, coef, m, constant)
        err2 += e
        sq += s
        count += c
        if progress is not None:
            progress(stop, n)

    create_array(group, "ref_index", data=ref_index)
    create_array(group, "ref_traj", data=np.concatenate([ref_traj, ref_new.T], axis=1))
    create_array(group, "sample_index", data=np.asarray(old["sample_index"][:], dtype=np.int64))  # type: ignore[index]
    rel, per_mode = relative_errors(err2, sq)
    per_mode, n_constant, count = per_mode[:m], int(count[m]), count[:m]
    all_rows = [*attrs["rows"], *(int(r) for r in rows)]
    first = st.labels[all_rows[0]]
    attrs.update(
        {
            "window": ":" if all_rows[0] == 0 else f"{first}:",
            "epochs": [st.labels[r] for r in all_rows],
            "rows": all_rows,
            "mode_sizes": [int(c) for c in count],
            "relative_error": rel,
            "mode_errors": [float(e) for e in per_mode],
            "constant": n_constant,
            "updates": int(attrs.get("updates", 0)) + 1,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            "update_seconds": time.perf_counter() - t0,
        }
    )
    group.attrs.put({RESULT_ATTR: attrs})


def ingest_and_update(
    source: str | os.PathLike[str],
    store: str | os.PathLike[str],
    name: str = "cmd",
    **ingest_options: Any,
) -> tuple[IngestSummary, UpdateSummary]:
    """``cmdtool ingest --update``: append the new checkpoints of ``source``, then fold
    them into decomposition ``name``.

    The decomposition must exist before anything is ingested. A bad checkpoint leaves the
    store as it was (ingest rolls its epochs back) and nothing is updated.
    ``ingest_options`` go to :func:`cmdtool.ingestion.ingest.ingest`.
    """
    from cmdtool.ingestion import ingest

    check_result_name(name)
    with TrajectoryStore.open(store, mode="r") as st:
        st.open_result(name)  # DecompositionNotFoundError before any write
    added = ingest(source, store, **ingest_options)
    return added, update(store, name)
