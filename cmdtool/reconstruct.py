"""Rebuild checkpoints from a decomposition: ``w_hat_i(t) = a_i * r_m(i)(t) + b_i``.

One checkpoint is built in memory at a time, in the source's tensor names, shapes and
dtypes; the model arrays (labels, a, b) are streamed chunk by chunk.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from cmdtool.decompose import CMD
from cmdtool.epochs import select_epochs
from cmdtool.errors import StoreError, UsageError
from cmdtool.ingest import torch_dtype
from cmdtool.store import TrajectoryStore

FORMATS = ("safetensors", "pt")


def rebuild_state(model: CMD, label: int) -> dict[str, torch.Tensor]:
    """The CMD checkpoint of epoch ``label``, as its source checkpoint names it.

    Parameters
    ----------
    model : CMD
        A fitted estimator (``CMD.load(store, name)``).
    label : int
        Any ingested epoch, inside the window or not.

    Returns
    -------
    dict of str to Tensor
        Modeled tensors rebuilt from the model, non-modeled ones copied from the epoch.
    """
    st = model.store_
    row = st.row_of(label)
    ref_now = st.read_columns(np.array([row]), model.ref_index_)[0].astype(np.float64)
    group = st.open_result(model.name_)
    labels_arr, a_arr, b_arr = group["labels"], group["a"], group["b"]
    flat = np.empty(st.n_params, dtype=np.float32)
    for start, stop in st.column_blocks():
        lab = np.asarray(labels_arr[start:stop])  # type: ignore[index]
        a = np.asarray(a_arr[start:stop], dtype=np.float64)  # type: ignore[index]
        b = np.asarray(b_arr[start:stop], dtype=np.float64)  # type: ignore[index]
        flat[start:stop] = a * ref_now[lab] + b
    return _assemble(st, row, flat)


def raw_state(store: TrajectoryStore, label: int) -> dict[str, torch.Tensor]:
    """Epoch ``label`` exactly as stored (no model): the identity reconstruction.

    Floating tensors come back in their source dtype from the stored float32 values, so
    fp16, bf16 and fp32 sources are reproduced bit for bit; fp64 to float32 precision.
    """
    row = store.row_of(label)
    flat = np.empty(store.n_params, dtype=np.float32)
    for start, stop in store.column_blocks():
        flat[start:stop] = store.read_block(np.array([row]), start, stop)[0]
    return _assemble(store, row, flat)


def _assemble(st: TrajectoryStore, row: int, flat: np.ndarray) -> dict[str, torch.Tensor]:
    """A checkpoint from one row of modeled values (float32, (N,)) and the row's extras."""
    epoch = st.epochs[row]
    out: dict[str, torch.Tensor] = {}
    values = torch.from_numpy(flat)
    for p in st.params:
        dt = torch_dtype(epoch.dtypes.get(p.name, p.dtype))
        t = values[p.offset : p.offset + p.size].reshape(p.shape).to(dt)
        out[epoch.renamed.get(p.name, p.name)] = t.clone() if dt == torch.float32 else t
    raw = st.read_extras(row)
    for e in st.extras:
        dt = torch_dtype(e.dtype)
        buf = bytearray(raw[e.offset : e.offset + e.nbytes])
        t = torch.frombuffer(buf, dtype=dt) if e.nbytes else torch.empty(0, dtype=dt)
        out[epoch.renamed.get(e.name, e.name)] = t.reshape(e.shape).clone()
    return _in_source_order(st, epoch.renamed, out)


def _in_source_order(
    st: TrajectoryStore, renamed: dict[str, str], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    order = {renamed.get(p.name, p.name): p.offset for p in st.params}
    extras = {renamed.get(e.name, e.name): st.n_params + e.offset for e in st.extras}
    order.update(extras)
    return dict(sorted(tensors.items(), key=lambda kv: order[kv[0]]))


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same folder, then rename over ``path``."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class ReconstructSummary:
    files: list[str]
    epochs: list[int]


def reconstruct(
    store: TrajectoryStore | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epochs: str = "last",
    name: str = "cmd",
    fmt: str = "safetensors",
    raw: bool = False,
    cluster: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> ReconstructSummary:
    """Write ``OUT/epoch_<label>.safetensors`` (or ``.pt``) for the chosen epochs.

    Parameters
    ----------
    store : TrajectoryStore or path
    out : path
        Output folder, created if missing.
    epochs : str
        ``last``, ``all``, ``A:B`` (labels, half-open) or ``3,7,10``.
    name : str
        The decomposition to use.
    fmt : {"safetensors", "pt"}
    raw : bool
        Write the stored epochs themselves instead of the model's (no decomposition
        needed): an export of the store.
    cluster : str, optional
        Write one file per Dask task on this ``dask.distributed`` scheduler address, or
        ``"local"`` (see :mod:`cmdtool.distributed`); the workers must see the store and
        ``out`` at the same paths. The files are the same as without it.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if cluster is not None:
        from cmdtool.distributed import check_store_path

        check_store_path(store)
    st = store if isinstance(store, TrajectoryStore) else TrajectoryStore.open(store)
    model = None if raw else CMD.load(st, name)
    rows = select_epochs(st.labels, epochs)
    out_dir = Path(out)
    where = out_dir.resolve()
    if where == st.path.resolve() or st.path.resolve() in where.parents:
        raise UsageError(f"output folder {out_dir} is inside the store {st.path}; pick another")
    if str(where) in st.source_roots:
        raise UsageError(
            f"output folder {out_dir} holds the source checkpoints of this store; "
            "writing there could overwrite them, pick another"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from exc
    for leftover in out_dir.glob(".epoch_*.tmp"):  # from a reconstruct that was killed
        leftover.unlink(missing_ok=True)
    labels = [st.labels[int(r)] for r in rows]
    if cluster is not None:
        from cmdtool.distributed import connect, dask_reconstruct

        with connect(cluster) as client:
            dask_reconstruct(client, st, out_dir, labels, model=model, fmt=fmt, progress=progress)
        return ReconstructSummary(
            files=[str(_target(out_dir, label, fmt)) for label in labels], epochs=labels
        )
    files = []
    for i, label in enumerate(labels):
        files.append(write_epoch(st, model, label, out_dir, fmt))
        if progress is not None:
            progress(i + 1, len(labels), Path(files[-1]).name)
    return ReconstructSummary(files=files, epochs=labels)


def _target(out_dir: Path, label: int, fmt: str) -> Path:
    return out_dir / f"epoch_{label}.{'safetensors' if fmt == 'safetensors' else 'pt'}"


def write_epoch(st: TrajectoryStore, model: CMD | None, label: int, out_dir: Path, fmt: str) -> str:
    """Write epoch ``label`` rebuilt from ``model`` (None: as stored) into ``out_dir``.

    The file is written under a temporary name and renamed; returns its path.
    """
    state = raw_state(st, label) if model is None else rebuild_state(model, label)
    target = _target(out_dir, label, fmt)
    if fmt == "safetensors":
        _atomic_write(target, lambda p, s=state: save_file(s, p))  # type: ignore[misc]
    else:
        _atomic_write(target, lambda p, s=state: torch.save(s, p))  # type: ignore[misc]
    return str(target)
