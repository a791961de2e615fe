"""Rebuilt checkpoints of the baselines, one epoch at a time (for ``--eval`` and
``--write``), in the source's tensor names, shapes and dtypes.

- PCA and DMD: one streamed pass writes the model's k vectors ``X @ basis`` (k x N,
  float64) into a scratch array inside the store (``.scratch-<hex>``, removed after;
  a killed run's is removed by the next writer); epoch t is then ``sum_j coef[t, j] v_j``,
  streamed chunk by chunk. These k vectors are the model's stored values.
- EMA and SWA: their recursions over the window's rows, one row read per epoch
  (SWA: two), the running state in float64 (O(N)).
- CMD: :func:`cmdtool.reconstruction.rebuild_state`.

The checkpoint is assembled from the flat row by the reconstruction stage's
``_assemble`` (non-modelled tensors copied from the epoch).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import zarr

from cmdtool.baselines.linear import LinearModel
from cmdtool.baselines.passes import BasisTask
from cmdtool.decomposition import CMD
from cmdtool.reconstruction import rebuild_state
from cmdtool.reconstruction.rebuild import _assemble
from cmdtool.store import TrajectoryStore, scratch_result_name

State = dict[str, torch.Tensor]
Mapper = Callable[..., list[object]]


def _row(st: TrajectoryStore, row: int) -> np.ndarray:
    """One stored row (float32, (N,)), read chunk by chunk."""
    flat = np.empty(st.n_params, dtype=np.float32)
    for start, stop in st.column_blocks():
        flat[start:stop] = st.read_block(np.array([row]), start, stop)[0]
    return flat


def _finish(st: TrajectoryStore, row: int, values: np.ndarray) -> State:
    """Cast to float32; where the model has no value (a non-finite column), keep the
    stored one."""
    flat = values.astype(np.float32)
    bad = ~np.isfinite(flat)
    if bad.any():
        flat[bad] = _row(st, row)[bad]
    return _assemble(st, row, flat)


def _low_rank_rows(
    st: TrajectoryStore,
    rows: np.ndarray,
    model: LinearModel,
    mapper: Mapper,
    store_path: str,
) -> Iterator[tuple[int, State]]:
    assert model.basis is not None and model.coef is not None
    k = model.basis.shape[1]
    from cmdtool.store.objects import is_url

    if is_url(str(st.path)):  # no folder in an object store: a local temporary one
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="cmdtool-basis-")) / scratch_result_name()
    else:
        scratch = st.path / scratch_result_name()
    try:
        scratch.mkdir()
        target = str(scratch / "basis")
        zarr.create_array(
            target,
            shape=(k, st.n_params),
            chunks=(max(k, 1), min(st.chunk, st.n_params)),
            dtype="float64",
            compressors=None,
            fill_value=np.nan,
        )
        task = BasisTask(store_path, rows, basis=model.basis, out=target, _st=st)
        mapper(task, list(st.column_blocks()), lambda s: f"columns {s[0]}:{s[1]}", None)
        arr = zarr.open_array(target, mode="r")
        for t, row in enumerate(rows):
            flat = np.empty(st.n_params)
            for start, stop in st.column_blocks():
                flat[start:stop] = model.coef[t] @ np.asarray(arr[:, start:stop])
            yield int(row), _finish(st, int(row), flat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if is_url(str(st.path)):
            shutil.rmtree(scratch.parent, ignore_errors=True)


def _ema_rows(
    st: TrajectoryStore, rows: np.ndarray, beta: float
) -> Iterator[tuple[int, State]]:
    e = _row(st, int(rows[0])).astype(np.float64)
    yield int(rows[0]), _finish(st, int(rows[0]), e)
    for row in rows[1:]:
        e *= beta
        e += (1.0 - beta) * _row(st, int(row))
        yield int(row), _finish(st, int(row), e)


def _swa_rows(st: TrajectoryStore, rows: np.ndarray, k: int) -> Iterator[tuple[int, State]]:
    total = np.zeros(st.n_params)
    for t, row in enumerate(rows):
        total += _row(st, int(row))
        if t >= k:
            total -= _row(st, int(rows[t - k]))
        yield int(row), _finish(st, int(row), total / min(k, t + 1))


def rebuilt_states(
    st: TrajectoryStore,
    rows: np.ndarray,
    model: LinearModel | CMD,
    mapper: Mapper,
    store_path: str,
) -> Iterator[tuple[int, State]]:
    """``(row, state dict)`` of each window epoch rebuilt by ``model``, in window order.

    Parameters
    ----------
    st : TrajectoryStore
        Open for writing (the PCA/DMD scratch array goes inside it).
    rows : ndarray, int64, shape (T',)
    model : LinearModel or CMD
    mapper : callable
        A backend's ``map`` (the PCA/DMD basis pass).
    store_path : str
        The store's absolute path, for tasks run elsewhere.
    """
    if isinstance(model, CMD):
        for row in rows:
            yield int(row), rebuild_state(model, st.labels[int(row)])
    elif model.method == "ema":
        yield from _ema_rows(st, rows, float(model.extra["beta"]))  # type: ignore[arg-type]
    elif model.method == "swa":
        yield from _swa_rows(st, rows, int(model.extra["k"]))  # type: ignore[call-overload]
    else:
        yield from _low_rank_rows(st, rows, model, mapper, store_path)


def save(state: State, target: Path) -> None:
    """Write one checkpoint as reconstruct does (temporary file, then rename)."""
    from safetensors.torch import save_file

    from cmdtool.reconstruction.write import _atomic_write

    _atomic_write(target, lambda p, s=state: save_file(s, p))  # type: ignore[misc]
