"""Rebuilt epochs written the way their trainer wrote them (``reconstruct --layout source``).

Each epoch goes to ``OUT/<its source path>`` in the layout of its source (the ``kind``
recorded at ingest):

* ``hf``: a ``checkpoint-<step>/`` folder with the source's weight files (one
  ``model.safetensors``, or the same shards and a ``model.safetensors.index.json`` with
  the same ``weight_map``; ``pytorch_model.bin`` likewise), the safetensors header
  metadata of the source, and a copy of every other file of the source folder
  (``config.json``, ``generation_config.json``, tokenizer files, ``trainer_state.json``,
  ``training_args.bin``) except training state (``optimizer*``, ``scheduler*``,
  ``scaler*``, ``rng_state*``), which describes the raw run and is dropped;
* ``lightning`` (and torch files whose weights sat under a key): the source's top-level
  entries (``epoch``, ``global_step``, ``hyper_parameters``, ``loops``, ``callbacks``
  ...) with the rebuilt weights as ``state_dict`` (or the key they came from); the
  optimizer and scheduler states (``optimizer_states``, ``lr_schedulers``, ...) are
  dropped, and so are ``current_model_state`` and ``averaging_state`` (weight
  averaging of the raw run); callback states are copied as they are. The rebuilt
  checkpoint loads with
  ``load_from_checkpoint`` / ``load_state_dict``; Lightning refuses to resume training
  from it (``fit(ckpt_path=...)`` needs the optimizer states), as from a weights-only one;
* ``dcp``: a folder written by ``torch.distributed.checkpoint.save`` (the model's tensors
  under the group they came from, e.g. ``model``; no optimizer or training state);
* ``safetensors`` / flat ``torch`` files: the same file name, safetensors keeping their
  header metadata.

Tied tensors (store ``aliases``) are written under both names; ``.pt``/``.bin``/``.ckpt``
outputs share one storage again, safetensors (which cannot) get a copy. Files and folders
are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file

from cmdtool.checkpoints.dcp import save_dcp
from cmdtool.checkpoints.discover import read_index
from cmdtool.checkpoints.torchfile import _torch_load
from cmdtool.errors import CheckpointError, SourceNotFoundError, StoreError, UsageError
from cmdtool.store import EpochInfo, TrajectoryStore

LAYOUTS = ("flat", "source")
#: Top-level entries of a torch / Lightning checkpoint dropped from a rebuilt one.
DROPPED_KEYS = frozenset(
    {
        "optimizer_states",
        "lr_schedulers",
        "optimizer",
        "optimizer_state_dict",
        "scheduler",
        "lr_scheduler",
        "scheduler_state_dict",
        "scaler",
        "current_model_state",
        "averaging_state",
    }
)
#: Files of a Hugging Face checkpoint folder that are training state, not copied.
_TRAINING_STATE_PREFIXES = ("optimizer", "scheduler", "scaler", "rng_state")
_HF_WEIGHT_FILES = (
    ("model.safetensors", False),
    ("model.safetensors.index.json", True),
    ("pytorch_model.bin", False),
    ("pytorch_model.bin.index.json", True),
)
TMP_PREFIX = ".cmdtool-"


def header_metadata(epoch: EpochInfo) -> dict[str, str]:
    """The safetensors header metadata to write for an epoch: its source's, else
    ``{"format": "pt"}`` (what transformers' ``from_pretrained`` checks)."""
    return dict(epoch.header_metadata or {"format": "pt"})


def unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every tensor that shares memory with an earlier one copied
    (safetensors refuses shared tensors)."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        if tensor.numel() and key in seen:
            tensor = tensor.clone()
        seen.add(key)
        out[name] = tensor.contiguous()
    return out


def _relative_target(epoch: EpochInfo) -> PurePosixPath:
    rel = PurePosixPath(epoch.source)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise UsageError(
            f"--layout source: epoch {epoch.label}'s source {epoch.source!r} is not a path "
            "inside its checkpoint folder; leave --layout out"
        )
    return rel


def target_path(out_dir: Path, epoch: EpochInfo) -> Path:
    """Where ``--layout source`` writes an epoch: ``OUT/<source path>``."""
    return out_dir.joinpath(*_relative_target(epoch).parts)


def _source_path(st: TrajectoryStore, epoch: EpochInfo) -> Path | None:
    for root in st.source_roots:
        candidate = Path(root).joinpath(*_relative_target(epoch).parts)
        if candidate.exists():
            return candidate
    return None


def _needs_source(epoch: EpochInfo) -> bool:
    return epoch.kind == "hf" or (epoch.kind in ("torch", "lightning") and bool(epoch.state_key))


def check_sources(st: TrajectoryStore, labels: list[int]) -> None:
    """Before anything is written: every chosen epoch whose layout needs its source
    (Hugging Face folders, torch/Lightning files with more than weights) still has it.

    Raises
    ------
    SourceNotFoundError
        A source folder or file is gone; nothing has been written.
    UsageError
        Two chosen epochs came from the same path (cannot share one output).
    """
    seen: dict[str, int] = {}
    for label in labels:
        epoch = st.epochs[st.row_of(label)]
        rel = str(_relative_target(epoch))
        if rel in seen:
            raise UsageError(
                f"--layout source: epochs {seen[rel]} and {label} both came from {rel}; "
                "pick one with --epochs"
            )
        seen[rel] = label
        if _needs_source(epoch) and _source_path(st, epoch) is None:
            what = (
                "its config, generation config and tokenizer files cannot be copied"
                if epoch.kind == "hf"
                else "its other entries (epoch, hyper-parameters, loops) cannot be copied"
            )
            roots = ", ".join(st.source_roots) or "no recorded folder"
            raise SourceNotFoundError(
                f"--layout source: {epoch.source} (epoch {label}) is gone from {roots}; {what}."
                " Restore it, or leave --layout out to write the weights alone"
            )


# ----------------------------------------------------------------- atomic writes


def _tmp_sibling(target: Path) -> Path:
    return target.parent / f"{TMP_PREFIX}{target.name}.{uuid.uuid4().hex[:8]}.tmp"


def _replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` onto ``target`` (a folder replaced whole)."""
    if target.is_dir() and not target.is_symlink():
        old = _tmp_sibling(target)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _write_to(target: Path, fill: Callable[[Path], None], *, folder: bool) -> None:
    """Write ``target`` (a file, or with ``folder`` a folder) under a temporary name, then
    rename it into place; a failure leaves no trace."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {target.parent}: {exc.strerror or exc}") from exc
    tmp = _tmp_sibling(target)
    try:
        if folder:
            tmp.mkdir()
        fill(tmp)
        _replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def remove_leftovers(out_dir: Path) -> None:
    """Delete the temporaries a killed ``--layout source`` run left in ``out_dir``."""
    for left in out_dir.rglob(f"{TMP_PREFIX}*.tmp"):
        shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink(missing_ok=True)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)


# ---------------------------------------------------------------------- layouts


def _hf_weights(folder: Path) -> tuple[str, dict[str, str] | None]:
    """The weight file name of a Hugging Face folder and, if sharded, its weight map."""
    for name, is_index in _HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return name, (read_index(folder / name) if is_index else None)
    raise CheckpointError(f"--layout source: {folder} holds no model weights any more")


def _write_hf(
    st: TrajectoryStore, epoch: EpochInfo, state: dict[str, torch.Tensor], target: Path
) -> None:
    source = _source_path(st, epoch)
    if source is None:
        check_sources(st, [epoch.label])  # raises, naming it
        return
    weights, weight_map = _hf_weights(source)
    safetensors = ".safetensors" in weights
    meta = header_metadata(epoch)
    if weight_map is not None and set(weight_map) != set(state):
        raise CheckpointError(
            f"--layout source: {source / weights} lists other tensors than epoch "
            f"{epoch.label} of the store (the folder changed since it was ingested?)"
        )
    skip = {weights, *(weight_map or {}).values()}

    def fill(tmp: Path) -> None:
        if weight_map is None:
            if safetensors:
                save_file(unshare(state), str(tmp / weights), meta)
            else:
                _torch_save(state, tmp / weights)
        else:
            for shard in dict.fromkeys(weight_map.values()):
                part = {n: t for n, t in state.items() if weight_map[n] == shard}
                if safetensors:
                    save_file(unshare(part), str(tmp / shard), meta)
                else:
                    _torch_save(part, tmp / shard)
            index = json.loads((source / weights).read_text(encoding="utf-8"))
            total = sum(t.numel() * t.element_size() for t in unshare(state).values())
            index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
            (tmp / weights).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for f in sorted(source.iterdir()):
            name = f.name
            lower = name.lower()
            if name in skip or name.startswith(".") or not f.is_file():
                continue
            if lower.startswith(_TRAINING_STATE_PREFIXES):
                continue
            shutil.copyfile(f, tmp / name)

    _write_to(target, fill, folder=True)


def _write_wrapped(
    st: TrajectoryStore, epoch: EpochInfo, state: dict[str, torch.Tensor], target: Path
) -> None:
    """A torch / Lightning dict: the source's entries, rebuilt weights, no optimizer."""
    source = _source_path(st, epoch)
    if source is None:
        check_sources(st, [epoch.label])
        return
    try:
        loaded = _torch_load(source)
    except CheckpointError as exc:
        raise CheckpointError(
            f"--layout source: cannot copy the entries of {source}: {exc}; leave --layout "
            "out to write the weights alone"
        ) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"--layout source: {source} no longer holds a dict")
    key = "state_dict" if epoch.state_key == "current_model_state" else epoch.state_key
    assert key is not None
    obj = {k: v for k, v in loaded.items() if k not in DROPPED_KEYS and k != key}
    obj[key] = state
    ordered = {k: obj[k] for k in loaded if k in obj}  # the source's key order
    ordered.update({k: v for k, v in obj.items() if k not in ordered})
    _write_to(target, lambda tmp: _torch_save(ordered, tmp), folder=False)


def _write_dcp(epoch: EpochInfo, state: dict[str, torch.Tensor], target: Path) -> None:
    group = epoch.state_key
    if group and all(n.startswith(group + ".") for n in state):
        nested: dict[str, Any] = {group: {n[len(group) + 1 :]: t for n, t in state.items()}}
    else:
        nested = dict(state)
    _write_to(target, lambda tmp: save_dcp(nested, tmp), folder=True)


def write_source_layout(
    st: TrajectoryStore, label: int, state: dict[str, torch.Tensor], out_dir: Path
) -> str:
    """Write one rebuilt epoch at ``OUT/<source path>`` in its source's layout.

    Parameters
    ----------
    st : TrajectoryStore
    label : int
        The epoch.
    state : dict of str to Tensor
        Its rebuilt (or stored) tensors under the source's names, aliases included.
    out_dir : pathlib.Path

    Returns
    -------
    str
        The file or folder written.
    """
    epoch = st.epochs[st.row_of(label)]
    target = target_path(out_dir, epoch)
    if epoch.kind == "hf":
        _write_hf(st, epoch, state, target)
    elif epoch.kind == "dcp":
        _write_dcp(epoch, state, target)
    elif epoch.kind in ("torch", "lightning") and epoch.state_key:
        _write_wrapped(st, epoch, state, target)
    elif epoch.kind in ("torch", "lightning"):
        _write_to(target, lambda tmp: _torch_save(state, tmp), folder=False)
    else:
        meta = header_metadata(epoch)
        _write_to(target, lambda tmp: save_file(unshare(state), str(tmp), meta), folder=False)
    return str(target)
