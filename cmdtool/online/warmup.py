"""The pieces OnlineCMD and EmbeddedCMD share: the model's parameters, the warm-up store
on disk, the state kept after it, and the frozen-entry hooks."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from cmdtool.checkpoints.dtypes import dtype_name
from cmdtool.errors import CmdtoolError, NotFoundError, StoreError, UsageError
from cmdtool.ingestion import create_store
from cmdtool.method.running import (
    ParamSums,
    ReferenceSums,
)
from cmdtool.store import EpochInfo, ParamInfo, TrajectoryStore
from cmdtool.store.lock import LOCK_NAME

SAVE_FORMAT = 1
#: safetensors metadata key holding the JSON settings and counters.
META_KEY = "cmdtool_online"
#: Name of the warm-up store inside the working folder.
STORE_NAME = "warmup.zarr"
#: Suffix of the copy of the warm-up store that :meth:`OnlineCMD.save` writes.
WARMUP_SUFFIX = ".warmup.zarr"
#: Name of the decomposition written into the warm-up store.
RESULT_NAME = "cmd"

NamedParams = nn.Module | Iterable[tuple[str, torch.Tensor]]


class WarmupError(UsageError, AttributeError):
    """A learned attribute or :meth:`OnlineCMD.state_dict` was asked for before the end of
    the warm-up. Also an AttributeError, so ``hasattr(cmd, "a_")`` is False until then."""


# --------------------------------------------------------------------- parameters
def named_tensors(obj: NamedParams) -> list[tuple[str, torch.Tensor]]:
    """The floating tensors to model, in a fixed order (the order given)."""
    if isinstance(obj, nn.Module):
        pairs: list[tuple[str, torch.Tensor]] = [
            (n, p) for n, p in obj.named_parameters() if p.requires_grad
        ]
        where = f"{type(obj).__name__}.named_parameters() (those that require grad)"
    else:
        pairs = []
        for item in obj:
            if (
                not isinstance(item, tuple)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], torch.Tensor)
            ):
                raise UsageError(
                    f"expected a torch.nn.Module or (name, tensor) pairs, got an item "
                    f"{type(item).__name__}; pass model or model.named_parameters()"
                )
            pairs.append(item)
        where = "the (name, tensor) pairs"
    names = [n for n, _ in pairs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"parameter names repeat: {', '.join(map(repr, dup))}; give each once")
    floats = [(n, p) for n, p in pairs if p.is_floating_point()]
    if not floats:
        raise UsageError(
            f"no floating-point parameter to model in {where}; pass a model with trainable "
            "float parameters"
        )
    devices = sorted({str(p.device) for _, p in floats})
    if len(devices) > 1:
        raise UsageError(
            f"parameters lie on several devices ({', '.join(devices)}); OnlineCMD keeps its "
            "state on one device: move the model to one device first"
        )
    return floats


def param_layout(named: list[tuple[str, torch.Tensor]]) -> list[ParamInfo]:
    """Store layout: each tensor flattened in C order, concatenated in the given order."""
    infos: list[ParamInfo] = []
    offset = 0
    for name, p in named:
        info = ParamInfo(name, tuple(int(s) for s in p.shape), dtype_name(p.dtype), offset)
        infos.append(info)
        offset += info.size
    return infos


def mask_grad(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook of a partly frozen parameter: zero at the frozen entries."""
    return grad.masked_fill(mask, 0)


@dataclass
class Frozen:
    """The frozen entries of one parameter and the values they hold (dtype of ``param``)."""

    param: torch.Tensor
    mask: torch.Tensor  # bool, shape of param: a view of EmbeddedCMD.frozen_
    values: torch.Tensor  # shape and dtype of param; meaningful where mask


def restore_frozen(entries: list[Frozen | None], *_: Any) -> None:
    """Optimizer step post-hook: write the frozen values back."""
    with torch.no_grad():
        for e in entries:
            if e is not None:
                e.param.copy_(torch.where(e.mask, e.values, e.param))


# ------------------------------------------------------------------- warm-up store
class WarmupStore:
    """The warm-up epochs on disk: a trajectory store with a sample pool, and the folder
    that holds it (removed on close when temporary)."""

    def __init__(self, folder: Path, temporary: bool, store: TrajectoryStore) -> None:
        self.folder = folder
        self.temporary = temporary
        self.store: TrajectoryStore | None = store

    @classmethod
    def create(cls, workdir: Path | None, infos: list[ParamInfo]) -> WarmupStore:
        folder, temporary = workdir_of(workdir)
        try:
            store = create_store(folder / STORE_NAME, infos)
        except BaseException:
            if temporary:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(folder, temporary, store)

    @classmethod
    def copy_of(cls, source: Path, workdir: Path | None) -> WarmupStore:
        folder, temporary = workdir_of(workdir)
        try:
            target = folder / STORE_NAME
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise StoreError(
                    f"cannot resume the warm-up into {target}: it exists and is not empty; "
                    "pick another workdir or remove it"
                )
            if target.exists():
                target.rmdir()
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(LOCK_NAME + "*"))
            store = TrajectoryStore.open(target, mode="r+")
        except OSError as exc:
            if temporary:
                shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, CmdtoolError):
                raise
            raise StoreError(f"cannot copy the warm-up store {source}: {exc}") from exc
        except BaseException:
            if temporary:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(folder, temporary, store)

    @property
    def path(self) -> Path:
        return self.folder / STORE_NAME

    def append(self, values: np.ndarray) -> None:
        """One epoch: ``values`` float32 (N,), committed atomically."""
        st = self._open()
        label = st.n_epochs + 1
        st.append_epoch(
            [(0, values)], EpochInfo(label=label, source=f"online step {label}", kind="online")
        )

    def _open(self) -> TrajectoryStore:
        if self.store is None:
            raise UsageError("the OnlineCMD was closed; create a new one or resume a saved one")
        return self.store

    def copy_to(self, target: Path) -> None:
        """Replace ``target`` by a copy of the store (without its lock)."""
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(self.path, partial, ignore=shutil.ignore_patterns(LOCK_NAME + "*"))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.temporary:
            shutil.rmtree(self.folder, ignore_errors=True)


def workdir_of(workdir: Path | None) -> tuple[Path, bool]:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="cmdtool-online-")), True
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create workdir {workdir}: {exc.strerror or exc}") from exc
    return workdir, False


# ------------------------------------------------------------------------ state
@dataclass
class OnlineState:
    """What online CMD keeps after the warm-up: O(N + M) tensors on the device."""

    labels: torch.Tensor  # int64 (N,)
    ref_index: torch.Tensor  # int64 (M,)
    sums: ParamSums  # float64 (N,) x 3
    refs: ReferenceSums  # float64 (M,) x 3 and the epoch count
    ref_now: torch.Tensor  # float64 (M,): the references at the last epoch
    a: torch.Tensor  # float64 (N,)
    b: torch.Tensor  # float64 (N,)
    relative_error: float
    mode_errors: np.ndarray  # float64 (M,)


def read_saved(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON metadata and the tensors of a file written by ``OnlineCMD.save``."""
    if not path.is_file():
        raise NotFoundError(f"saved OnlineCMD not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise StoreError(f"cannot read saved OnlineCMD {path}: {exc}") from exc
    if raw is None:
        raise StoreError(
            f"{path} is not a file written by OnlineCMD.save (no {META_KEY!r} metadata)"
        )
    meta: dict[str, Any] = json.loads(raw)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > SAVE_FORMAT:
        raise StoreError(
            f"{path} has format_version {version}, this cmdtool reads version "
            f"{SAVE_FORMAT}; upgrade cmdtool"
        )
    return meta, tensors
