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
from cmdtool.errors import CmdtoolError, MismatchError, NotFoundError, StoreError, UsageError
from cmdtool.ingestion import create_store
from cmdtool.method.normstats import gate, safe_variances
from cmdtool.method.running import (
    ParamSums,
    ReferenceSums,
)
from cmdtool.store import EpochInfo, ParamInfo, TrajectoryStore
from cmdtool.store.lock import LOCK_NAME
from cmdtool.store.normstats import DEFAULT_STATS_PATTERN, GATE, match_stats, stats_columns

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

    @classmethod
    def resumed(
        cls, source: str | os.PathLike[str] | None, workdir: Path | None, where: str, n_epochs: int
    ) -> WarmupStore:
        """A copy of the saved warm-up store ``source``, checked to hold ``n_epochs``."""
        src = None if source is None else Path(source)
        if src is None or not (src / "zarr.json").is_file():
            raise NotFoundError(
                f"{where} was saved during the warm-up but its store {src} is missing; "
                "keep the .warmup.zarr folder next to the saved state"
            )
        warm = cls.copy_of(src, workdir)
        have = warm._open().n_epochs
        if have != n_epochs:
            warm.close()
            raise StoreError(f"{src} holds {have} epochs, {where} says {n_epochs}; save again")
        return warm

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
    #: bool (N,): constant over the warm-up (in no mode, ``a = 0``; None: a save of
    #: cmdtool < 0.3, from before the rule)
    constant: torch.Tensor | None = None
    #: float64 (S,): the normalization statistics as they were at the last epoch
    stats_now: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors :meth:`OnlineCMD.save` writes (``constant`` all False for a state
        resumed from a save that predates the rule)."""
        out = {
            "labels": self.labels,
            "ref_index": self.ref_index,
            "sum_w": self.sums.sum_w,
            "sum_w2": self.sums.sum_w2,
            "sum_wr": self.sums.sum_wr,
            "ref_first": self.refs.first,
            "ref_s1": self.refs.s1,
            "ref_s2": self.refs.s2,
            "ref_now": self.ref_now,
            "a": self.a,
            "b": self.b,
            "constant": self.labels < 0 if self.constant is None else self.constant,
        }
        if self.stats_now is not None:
            out["stats_now"] = self.stats_now
        return out

    @classmethod
    def from_tensors(
        cls, meta: dict[str, Any], t: dict[str, torch.Tensor], device: torch.device
    ) -> OnlineState:
        """The state of :meth:`tensors` and the metadata's counters, on ``device``."""

        def get(key: str) -> torch.Tensor:
            if key not in t:
                raise StoreError(f"saved OnlineCMD lacks the tensor {key!r}; save again")
            return t[key].to(device)

        return cls(
            labels=get("labels"),
            ref_index=get("ref_index"),
            sums=ParamSums(get("sum_w"), get("sum_w2"), get("sum_wr")),
            refs=ReferenceSums(
                first=get("ref_first"),
                s1=get("ref_s1"),
                s2=get("ref_s2"),
                count=int(meta["ref_count"]),
            ),
            ref_now=get("ref_now"),
            a=get("a"),
            b=get("b"),
            relative_error=float(meta["relative_error"]),
            mode_errors=np.asarray(meta["mode_errors"], dtype=np.float64),
            constant=get("constant") if "constant" in t else None,  # absent: cmdtool < 0.3
            stats_now=get("stats_now") if "stats_now" in t else None,
        )


@dataclass(frozen=True)
class StatsLayout:
    """Where the normalization statistics lie among the N modelled values (the store's
    default name rule, :data:`cmdtool.store.normstats.DEFAULT_STATS_PATTERN`)."""

    cols: torch.Tensor  # int64 (S,): flat indices
    variance: np.ndarray  # bool (S,): entries of a variance
    groups: np.ndarray  # int64 (S,): tensor of each entry (0 .. G-1)


def stats_layout(infos: list[ParamInfo], device: torch.device) -> StatsLayout | None:
    """The statistics among ``infos`` (None when there are none: a module's parameters
    never hold them; (name, tensor) pairs with buffers may)."""
    tensors = match_stats(infos, DEFAULT_STATS_PATTERN)
    if not tensors:
        return None
    cols, var = stats_columns(tensors)
    groups = np.concatenate([np.full(t.size, i, dtype=np.int64) for i, t in enumerate(tensors)])
    return StatsLayout(torch.as_tensor(cols, device=device), var, groups)


def gated_stats(values: torch.Tensor, raw: torch.Tensor, layout: StatsLayout) -> torch.Tensor:
    """``values`` (float64, (N,), the CMD values) with the statistics rebuilt as post-hoc
    CMD's default ``--stats gated`` does (:func:`cmdtool.method.normstats.gate`, then
    :func:`~cmdtool.method.normstats.safe_variances`): a tensor's modelled statistics
    unless they are more than ``GATE`` (relative) from ``raw`` (float64, (S,), their
    values at that epoch), and never a negative or non-finite variance. A new tensor."""
    model = values[layout.cols].cpu().numpy()
    now = raw.cpu().numpy()
    picked = safe_variances(gate(model, now, layout.groups, GATE), now, layout.variance)
    out = values.clone()
    out[layout.cols] = torch.as_tensor(picked, dtype=out.dtype, device=out.device)
    return out


def state_meta(
    class_name: str,
    settings: dict[str, Any],
    n_epochs: int,
    infos: list[ParamInfo],
    state: OnlineState | None,
) -> dict[str, Any]:
    """The JSON metadata of ``OnlineCMD.to_state``: settings, counters, layout."""
    meta: dict[str, Any] = {
        "format_version": SAVE_FORMAT,
        "class": class_name,
        "settings": settings,
        "n_epochs": n_epochs,
        "n_params": sum(p.size for p in infos),
        "warmup_finished": state is not None,
        "params": [
            {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "offset": p.offset}
            for p in infos
        ],
    }
    if state is not None:
        meta["ref_count"] = state.refs.count
        meta["relative_error"] = state.relative_error
        meta["mode_errors"] = [float(e) for e in state.mode_errors]
    return meta


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
    check_meta(meta, str(path))
    return meta, tensors


def check_meta(meta: Any, where: str) -> None:
    """A state's metadata (``OnlineCMD.to_state``) is one this version reads."""
    if not isinstance(meta, dict):
        raise StoreError(f"{where} is not an OnlineCMD state (metadata {type(meta).__name__})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > SAVE_FORMAT:
        raise StoreError(
            f"{where} has format_version {version}, this cmdtool reads version "
            f"{SAVE_FORMAT}; upgrade cmdtool"
        )


def check_saved_layout(infos: list[ParamInfo], meta: dict[str, Any], where: str) -> None:
    """The parameters given match the saved ones (names, shapes, order)."""
    saved = [(d["name"], tuple(d["shape"])) for d in meta["params"]]
    now = [(p.name, p.shape) for p in infos]
    if saved == now:
        return
    diff = [f"{n!r} {s}" for n, s in saved if (n, s) not in now]
    new = [f"{n!r} {s}" for n, s in now if (n, s) not in saved]
    parts = []
    if diff:
        parts.append("saved but not given: " + ", ".join(diff[:5]))
    if new:
        parts.append("given but not saved: " + ", ".join(new[:5]))
    if not parts:
        parts.append("the order differs")
    raise MismatchError(
        f"{where}: the parameters differ from the saved ones ({'; '.join(parts)}); "
        "resume with the model that was saved"
    )
