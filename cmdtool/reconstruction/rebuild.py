"""Rebuild one epoch's checkpoint from a decomposition: ``w_hat_i(t) = a_i * r_m(i)(t) + b_i``
(step 7 of ``docs/design.md``, "The method").

One checkpoint is built in memory at a time, in the source's tensor names, shapes and
dtypes; the model arrays (labels, a, b) are streamed chunk by chunk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cmdtool.checkpoints.dtypes import torch_dtype
from cmdtool.decomposition import CMD
from cmdtool.reconstruction.stats import apply_stats
from cmdtool.store import TrajectoryStore


def rebuild_state(
    model: CMD, label: int, *, stats: str | None = None
) -> dict[str, torch.Tensor]:
    """The CMD checkpoint of epoch ``label``, as its source checkpoint names it.

    Parameters
    ----------
    model : CMD
        A fitted estimator (``CMD.load(store, name)``).
    label : int
        Any ingested epoch, inside the window or not.
    stats : str, optional
        Treatment of the normalization statistics, instead of the decomposition's own
        (:data:`cmdtool.store.normstats.STATS_CHOICES`; see
        :mod:`cmdtool.reconstruction.stats`). Whatever it is, no variance is rebuilt
        negative or non-finite.

    Returns
    -------
    dict of str to Tensor
        Modeled tensors rebuilt from the model, non-modeled ones copied from the epoch.

    Raises
    ------
    ResultChangedError
        The decomposition was republished since ``model`` was loaded.
    """
    st = model.store_
    row = st.row_of(label)
    ref_now = st.read_columns(np.array([row]), model.ref_index_)[0].astype(np.float64)

    def read(group: Any) -> np.ndarray:
        labels_arr, a_arr, b_arr = group["labels"], group["a"], group["b"]
        flat = np.empty(st.n_params, dtype=np.float32)
        for start, stop in st.column_blocks():
            lab = np.asarray(labels_arr[start:stop])
            a = np.asarray(a_arr[start:stop], dtype=np.float64)
            b = np.asarray(b_arr[start:stop], dtype=np.float64)
            flat[start:stop] = a * ref_now[lab] + b
        return flat

    # every chunk from the version the model holds: a republish meanwhile raises
    # ResultChangedError (reconstruct starts again) instead of mixing two versions
    flat = model.read_pinned(read)
    # normalization statistics: the decomposition's treatment, or ``stats``
    apply_stats(model, row, flat, ref_now, stats)
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
    for alias, target in st.aliases.items():  # tied tensors: one tensor under both names
        out[epoch.renamed.get(alias, alias)] = out[epoch.renamed.get(target, target)]
    return _in_source_order(st, epoch.renamed, out)


def _in_source_order(
    st: TrajectoryStore, renamed: dict[str, str], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``tensors`` in the source file's key order (the store's ``order``); for a store
    made before it was recorded: modeled tensors, then the others, then aliases."""
    if st.order:
        known = {renamed.get(n, n): i for i, n in enumerate(st.order)}
        last = len(known)
        return dict(sorted(tensors.items(), key=lambda kv: known.get(kv[0], last)))
    order = {renamed.get(p.name, p.name): p.offset for p in st.params}
    extras = {renamed.get(e.name, e.name): st.n_params + e.offset for e in st.extras}
    order.update(extras)
    end = st.n_params + st.extras_nbytes
    order.update({renamed.get(a, a): end + i for i, a in enumerate(st.aliases)})
    return dict(sorted(tensors.items(), key=lambda kv: order[kv[0]]))
