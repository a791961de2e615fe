"""Online and embedded CMD inside a training loop (DESIGN.md, "Online CMD").

:class:`OnlineCMD` watches a model's parameters once per epoch. During a warm-up of F
epochs every snapshot is appended to a real trajectory store on disk (the library never
holds an N x T history in memory); after the F-th epoch the store is decomposed once with
:class:`cmdtool.decompose.CMD`, and from then on the modes and references stay fixed and
each epoch is folded into the running sums of :mod:`cmdtool.running`: O(N) work and
memory per epoch, no history, nothing written to disk.

:class:`EmbeddedCMD` also freezes, every L epochs, the share P of the not-yet-frozen
parameters whose ``(a, b)`` moved least to their CMD value ``a·r(t) + b``: they stop being
trained and follow their mode's reference from then on (references are never frozen).

Both keep every piece of state on the parameters' device (CPU or CUDA) and persist it as
a safetensors file with JSON metadata (:meth:`OnlineCMD.save`, :meth:`OnlineCMD.resume`);
nothing is pickled.

Typical use::

    cmd = OnlineCMD(model, modes=10, warmup=20)
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)
        cmd.step()
    model.load_state_dict(cmd.state_dict(), strict=False)  # the CMD weights
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cmdtool.decompose import CMD, MIN_EPOCHS
from cmdtool.errors import CmdtoolError, MismatchError, NotFoundError, StoreError, UsageError
from cmdtool.ingest import dtype_name
from cmdtool.lock import LOCK_NAME
from cmdtool.running import (
    ParamSums,
    ReferenceSums,
    coefficients,
    mode_totals,
    relative_errors,
)
from cmdtool.sampling import sample_indices
from cmdtool.store import POOL_SIZE, EpochInfo, ParamInfo, TrajectoryStore

__all__ = ["EmbeddedCMD", "OnlineCMD", "WarmupError"]

#: Version of the layout of :meth:`OnlineCMD.save` files.
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
def _named_tensors(obj: NamedParams) -> list[tuple[str, torch.Tensor]]:
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


def _layout(named: list[tuple[str, torch.Tensor]]) -> list[ParamInfo]:
    """Store layout: each tensor flattened in C order, concatenated in the given order."""
    infos: list[ParamInfo] = []
    offset = 0
    for name, p in named:
        info = ParamInfo(name, tuple(int(s) for s in p.shape), dtype_name(p.dtype), offset)
        infos.append(info)
        offset += info.size
    return infos


def _mask_grad(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook of a partly frozen parameter: zero at the frozen entries."""
    return grad.masked_fill(mask, 0)


@dataclass
class _Frozen:
    """The frozen entries of one parameter and the values they hold (dtype of ``param``)."""

    param: torch.Tensor
    mask: torch.Tensor  # bool, shape of param: a view of EmbeddedCMD.frozen_
    values: torch.Tensor  # shape and dtype of param; meaningful where mask


def _restore_frozen(entries: list[_Frozen | None], *_: Any) -> None:
    """Optimizer step post-hook: write the frozen values back."""
    with torch.no_grad():
        for e in entries:
            if e is not None:
                e.param.copy_(torch.where(e.mask, e.values, e.param))


# ------------------------------------------------------------------- warm-up store
class _WarmupStore:
    """The warm-up epochs on disk: a trajectory store with a sample pool, and the folder
    that holds it (removed on close when temporary)."""

    def __init__(self, folder: Path, temporary: bool, store: TrajectoryStore) -> None:
        self.folder = folder
        self.temporary = temporary
        self.store: TrajectoryStore | None = store
        pool = store.pool_index
        self.pool_index = pool if pool is not None else np.zeros(0, dtype=np.int64)

    @classmethod
    def create(cls, workdir: Path | None, infos: list[ParamInfo]) -> _WarmupStore:
        folder, temporary = _workdir(workdir)
        try:
            sizes = [p.size for p in infos]
            n = sum(sizes)
            store = TrajectoryStore.create(
                folder / STORE_NAME,
                infos,
                pool_index=sample_indices(sizes, min(POOL_SIZE, n), seed=0),
            )
        except BaseException:
            if temporary:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(folder, temporary, store)

    @classmethod
    def copy_of(cls, source: Path, workdir: Path | None) -> _WarmupStore:
        folder, temporary = _workdir(workdir)
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
        row = st.begin_epoch()
        try:
            st.write_row_block(row, 0, values)
            st.write_pool_row(row, values[self.pool_index])
            label = st.n_epochs + 1
            st.commit_epoch(EpochInfo(label=label, source=f"online step {label}", kind="online"))
        except BaseException:
            st.abort_epoch()
            raise

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


def _workdir(workdir: Path | None) -> tuple[Path, bool]:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="cmdtool-online-")), True
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create workdir {workdir}: {exc.strerror or exc}") from exc
    return workdir, False


# ------------------------------------------------------------------------ state
@dataclass
class _State:
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


class OnlineCMD:
    """Online CMD: correlation modes of a model's parameters, updated once per epoch.

    Parameters
    ----------
    model_or_named_params : torch.nn.Module or iterable of (str, Tensor)
        A module (its ``named_parameters()`` that require grad) or (name, tensor) pairs.
        Floating tensors are modelled, flattened in C order and concatenated in this
        order (N values in all); they must lie on one device, where all state is kept.
    modes : int, default 10
        Number of modes M to cut the linkage tree into (fewer when the samples do not
        separate).
    samples : int, default 1000
        Sampled parameters K that are clustered (``min(samples, N)`` is used).
    warmup : int, default 20
        Warm-up epochs F (>= 3) recorded to disk before the one decomposition.
    seed : int, default 0
        Seed of the sampling.
    workdir : path, optional
        Folder for the warm-up store (``workdir/warmup.zarr``), kept afterwards: a normal
        cmdtool store holding the warm-up epochs and their decomposition ``cmd``.
        Default: a temporary folder, removed when the warm-up ends or the object is
        closed or garbage-collected.
    total_epochs : int, optional
        Length of the run, only to check that the warm-up fits in it.

    Attributes
    ----------
    n_params_ : int
        N.
    n_epochs_ : int
        Epochs seen (calls to :meth:`step`).
    workdir_ : Path or None
        The working folder, once the first epoch was recorded.
    labels_ : Tensor, int64, shape (N,)
        Mode of every parameter.
    ref_index_ : Tensor, int64, shape (M,)
        Flat index of each mode's reference parameter.
    a_, b_ : Tensor, float64, shape (N,)
        Least-squares ``w_i(t) ≈ a_i r_m(i)(t) + b_i`` over all epochs seen.
    n_modes_ : int
    relative_error_ : float
        ``‖W - Ŵ‖_F / ‖W‖_F`` of that fit over all epochs seen (from the running sums).
    mode_errors_ : ndarray, float64, shape (M,)
        The same ratio per mode.

    The learned attributes (``labels_`` to ``mode_errors_``) exist once the warm-up has
    finished; before, reading one raises :class:`WarmupError`. Tensors are on the
    parameters' device.

    Notes
    -----
    The parameters may change values in place between steps (optimizers, load_state_dict,
    ``param.data = ...`` of the same shape) but not shape, device or identity: CMD models
    a fixed set of parameters. Parameters holding NaN or Inf get ``a = 0``.
    """

    def __init__(
        self,
        model_or_named_params: NamedParams,
        *,
        modes: int = 10,
        samples: int = 1000,
        warmup: int = 20,
        seed: int = 0,
        workdir: str | os.PathLike[str] | None = None,
        total_epochs: int | None = None,
    ) -> None:
        self.modes = modes
        self.samples = samples
        self.warmup = warmup
        self.seed = seed
        self.workdir = workdir
        self.total_epochs = total_epochs
        self._module = (
            model_or_named_params if isinstance(model_or_named_params, nn.Module) else None
        )
        self._params = _named_tensors(model_or_named_params)
        self._infos = _layout(self._params)
        self._device = self._params[0][1].device
        self.n_params_ = sum(p.size for p in self._infos)
        self.n_epochs_ = 0
        self.workdir_: Path | None = None
        self._check_settings()
        self._warm: _WarmupStore | None = None
        self._warm_finalizer: weakref.finalize[Any, Any] | None = None
        self._state: _State | None = None
        self._closed = False

    # ---------------------------------------------------------------- checking
    def _check_settings(self) -> None:
        if self.warmup < MIN_EPOCHS:
            raise UsageError(
                f"warm-up {self.warmup} is shorter than {MIN_EPOCHS} epochs: CMD needs at "
                f"least {MIN_EPOCHS} epochs to correlate; use warmup >= {MIN_EPOCHS}"
            )
        if self.total_epochs is not None and self.warmup > self.total_epochs:
            raise UsageError(
                f"warm-up longer than the run: warmup={self.warmup} > "
                f"total_epochs={self.total_epochs}; use warmup <= {self.total_epochs}"
            )
        if self.samples < 1:
            raise UsageError(f"samples={self.samples} must be >= 1")
        k = min(self.samples, self.n_params_)
        if not 1 <= self.modes <= k:
            raise UsageError(
                f"modes={self.modes} must be >= 1 and <= the number of sampled parameters {k}"
            )

    def _check_params(self) -> None:
        """Same tensors, shapes and device as when the object was made."""
        current = dict(self._module.named_parameters()) if self._module is not None else None
        for (name, p), info in zip(self._params, self._infos, strict=True):
            if current is not None:
                now = current.get(name)
                if now is None:
                    raise MismatchError(
                        f"parameter {name!r} is no longer in the model; CMD models a fixed set "
                        "of parameters: start a new OnlineCMD"
                    )
                if now is not p:
                    raise MismatchError(
                        f"parameter {name!r} was replaced by another tensor since OnlineCMD "
                        "started; update it in place (load_state_dict, param.data.copy_) or "
                        "start a new OnlineCMD"
                    )
            if tuple(p.shape) != info.shape:
                raise MismatchError(
                    f"parameter {name!r} has shape {tuple(p.shape)}, it had {info.shape} when "
                    "OnlineCMD started; CMD models fixed shapes: start a new OnlineCMD"
                )
            if p.device != self._device:
                raise MismatchError(
                    f"parameter {name!r} moved from {self._device} to {p.device}; keep the "
                    "model on one device during online CMD"
                )
            if not p.is_floating_point():
                raise MismatchError(
                    f"parameter {name!r} is {dtype_name(p.dtype)}, it was {info.dtype}; CMD "
                    "models floating-point parameters: start a new OnlineCMD"
                )

    def _flat(self) -> torch.Tensor:
        """The current parameters, float32 (N,), on the device."""
        return torch.cat([p.detach().reshape(-1).to(torch.float32) for _, p in self._params])

    def _require_state(self) -> _State:
        if self._state is None:
            raise WarmupError(
                f"OnlineCMD has seen {self.n_epochs_} of {self.warmup} warm-up epochs; the "
                f"CMD model exists once the warm-up has finished: call step() "
                f"{self.warmup - self.n_epochs_} more time(s)"
            )
        return self._state

    # -------------------------------------------------------------------- steps
    def step(self) -> Self:
        """Record the parameters' current values as the next epoch.

        Call it once per epoch, after the optimizer steps. During the warm-up it appends
        one row (N float32 values) to the warm-up store; the F-th call decomposes the
        store. Afterwards it updates ``a_``, ``b_`` from the running sums in O(N).

        Returns
        -------
        self
        """
        if self._closed:
            raise UsageError("this OnlineCMD was closed; create a new one or resume a saved one")
        self._check_params()
        w = self._flat()
        if self._state is None:
            self._record(w)
        else:
            self._fold(w)
        return self

    def partial_fit(self) -> Self:
        """Same as :meth:`step` (the scikit-learn name)."""
        return self.step()

    def _record(self, w: torch.Tensor) -> None:
        if self._warm is None:
            self._warm = _WarmupStore.create(
                None if self.workdir is None else Path(self.workdir), self._infos
            )
            self._adopt_warm()
        assert self._warm is not None
        self._warm.append(w.cpu().numpy())
        self.n_epochs_ += 1
        if self.n_epochs_ >= self.warmup:
            self._finish_warmup(w)

    def _adopt_warm(self) -> None:
        assert self._warm is not None
        self.workdir_ = self._warm.folder
        self._warm_finalizer = weakref.finalize(self, self._warm.close)

    def _finish_warmup(self, w: torch.Tensor) -> None:
        """Decompose the warm-up store; load the O(N) state onto the device."""
        assert self._warm is not None
        store = self._warm._open()
        CMD(
            self.modes,
            n_samples=min(self.samples, self.n_params_),
            seed=self.seed,
            device=str(self._device),
        ).fit(store, name=RESULT_NAME)
        group = store.open_result(RESULT_NAME)
        dev = self._device

        def load(key: str, dtype: Any) -> torch.Tensor:
            arr = np.asarray(group[key][:], dtype=dtype)  # type: ignore[index]
            return torch.as_tensor(arr, device=dev)

        labels = load("labels", np.int64)
        ref_index = load("ref_index", np.int64)
        sums = ParamSums(
            load("sum_w", np.float64), load("sum_w2", np.float64), load("sum_wr", np.float64)
        )
        ref_traj = np.asarray(group["ref_traj"][:], dtype=np.float32)  # type: ignore[index]
        refs = ReferenceSums.from_trajectories(ref_traj, device=dev)
        ref_now = w[ref_index].to(torch.float64)
        self._state = _State(
            labels=labels,
            ref_index=ref_index,
            sums=sums,
            refs=refs,
            ref_now=ref_now,
            a=torch.zeros(0),
            b=torch.zeros(0),
            relative_error=0.0,
            mode_errors=np.zeros(0),
        )
        self._update_coefficients()
        self._release_warm()
        self._warmup_finished()

    def _release_warm(self) -> None:
        if self._warm_finalizer is not None:
            self._warm_finalizer()  # closes the store; removes a temporary folder
            self._warm_finalizer = None
        self._warm = None

    def _fold(self, w: torch.Tensor) -> None:
        st = self._require_state()
        r = w[st.ref_index]
        w = self._before_fold(w, r.to(torch.float64))
        st.sums.fold(w, r, st.refs, st.labels)
        st.refs.fold(r)
        st.ref_now = r.to(torch.float64)
        self.n_epochs_ += 1
        self._update_coefficients()
        self._after_fold()

    def _update_coefficients(self) -> None:
        st = self._require_state()
        coef = coefficients(st.sums, st.refs, st.labels)
        st.a, st.b = self._merge_coefficients(coef.a, coef.b)
        err2, sq, _ = mode_totals(st.labels, coef, int(st.ref_index.shape[0]))
        st.relative_error, st.mode_errors = relative_errors(err2, sq)

    # hooks of EmbeddedCMD
    def _warmup_finished(self) -> None:
        pass

    def _before_fold(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return w

    def _merge_coefficients(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return a, b

    def _after_fold(self) -> None:
        pass

    # ------------------------------------------------------------------ results
    def _cmd_values(self) -> torch.Tensor:
        """``a·r_m(t) + b`` at the last epoch, float64 (N,)."""
        st = self._require_state()
        return st.a * st.ref_now[st.labels] + st.b

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The CMD weights ``a·r_m(t) + b`` at the last epoch t.

        Returns
        -------
        dict of str to Tensor
            One tensor per modelled parameter: its name, shape, dtype and device.

        Raises
        ------
        WarmupError
            Before the warm-up has finished (a :class:`~cmdtool.errors.UsageError`).
        """
        values = self._cmd_values()
        out: dict[str, torch.Tensor] = {}
        for (name, p), info in zip(self._params, self._infos, strict=True):
            piece = values[info.offset : info.offset + info.size]
            out[name] = piece.to(p.dtype, copy=True).reshape(info.shape)
        return out

    @property
    def warmup_finished_(self) -> bool:
        """Whether the decomposition exists (the warm-up has finished)."""
        return self._state is not None

    @property
    def labels_(self) -> torch.Tensor:
        return self._require_state().labels

    @property
    def ref_index_(self) -> torch.Tensor:
        return self._require_state().ref_index

    @property
    def a_(self) -> torch.Tensor:
        return self._require_state().a

    @property
    def b_(self) -> torch.Tensor:
        return self._require_state().b

    @property
    def n_modes_(self) -> int:
        return int(self._require_state().ref_index.shape[0])

    @property
    def relative_error_(self) -> float:
        return self._require_state().relative_error

    @property
    def mode_errors_(self) -> np.ndarray:
        return self._require_state().mode_errors

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Release the warm-up store (a temporary folder is removed). The object then
        refuses :meth:`step`; a finished model stays readable and savable."""
        self._release_warm()
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- persisting
    def _settings(self) -> dict[str, Any]:
        return {
            "modes": self.modes,
            "samples": self.samples,
            "warmup": self.warmup,
            "seed": self.seed,
            "total_epochs": self.total_epochs,
        }

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        st = self._state
        if st is None:
            return {}
        return {
            "labels": st.labels,
            "ref_index": st.ref_index,
            "sum_w": st.sums.sum_w,
            "sum_w2": st.sums.sum_w2,
            "sum_wr": st.sums.sum_wr,
            "ref_first": st.refs.first,
            "ref_s1": st.refs.s1,
            "ref_s2": st.refs.s2,
            "ref_now": st.ref_now,
            "a": st.a,
            "b": st.b,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to the safetensors file ``path`` (no pickle).

        After the warm-up the file holds the O(N) state (labels, references, running sums,
        ``a``, ``b``) and JSON metadata with the settings and counters. During the warm-up
        it holds the metadata only, and the warm-up store is copied to
        ``path + ".warmup.zarr"`` so that :meth:`resume` continues the warm-up. Both are
        written under temporary names and renamed, so an interrupted save leaves the
        previous one intact.
        """
        if self._state is None and self.n_epochs_ > 0 and self._warm is None:
            raise UsageError(
                "this OnlineCMD was closed during the warm-up and its warm-up epochs are "
                "gone; save before close()"
            )
        target = Path(path)
        warm_copy = Path(str(target) + WARMUP_SUFFIX)
        meta = {
            "format_version": SAVE_FORMAT,
            "class": type(self).__name__,
            "settings": self._settings(),
            "n_epochs": self.n_epochs_,
            "n_params": self.n_params_,
            "warmup_finished": self._state is not None,
            "params": [
                {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "offset": p.offset}
                for p in self._infos
            ],
        }
        if self._state is not None:
            meta["ref_count"] = self._state.refs.count
            meta["relative_error"] = self._state.relative_error
            meta["mode_errors"] = [float(e) for e in self._state.mode_errors]
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._state_tensors().items()}
        partial = target.with_name(target.name + ".partial")
        try:
            if self._state is None and self._warm is not None:
                self._warm.copy_to(warm_copy)
            save_file(tensors, str(partial), metadata={META_KEY: json.dumps(meta)})
            os.replace(partial, target)
            if self._state is not None:
                shutil.rmtree(warm_copy, ignore_errors=True)  # a stale warm-up copy
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise StoreError(f"cannot save OnlineCMD to {target}: {exc.strerror or exc}") from exc

    @staticmethod
    def _read_saved(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike[str],
        model_or_named_params: NamedParams,
        *,
        workdir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> Self:
        """Continue a run saved by :meth:`save` with these parameters.

        Load the model's (and optimizer's) own checkpoint first; the parameters must have
        the saved names, shapes and order. The result is exactly that of a run that was
        never interrupted.

        Parameters
        ----------
        path : path
            The file written by :meth:`save`.
        model_or_named_params : torch.nn.Module or iterable of (str, Tensor)
        workdir : path, optional
            Working folder for the rest of the warm-up (as in the constructor).
        **kwargs
            Extra arguments of the subclass (``optimizer=`` of :class:`EmbeddedCMD`).
        """
        p = Path(path)
        meta, tensors = cls._read_saved(p)
        if meta.get("class") != cls.__name__:
            raise UsageError(
                f"{p} was saved by {meta.get('class')}, not {cls.__name__}; resume it with "
                f"{meta.get('class')}.resume"
            )
        est = cls(model_or_named_params, workdir=workdir, **kwargs, **meta["settings"])
        try:
            est._check_saved_layout(p, meta)
            est.n_epochs_ = int(meta["n_epochs"])
            if meta["warmup_finished"]:
                est._load_state(meta, tensors)
            elif est.n_epochs_ > 0:
                source = Path(str(p) + WARMUP_SUFFIX)
                if not (source / "zarr.json").is_file():
                    raise NotFoundError(
                        f"{p} was saved during the warm-up but its store {source} is missing; "
                        "keep the .warmup.zarr folder next to the saved file"
                    )
                est._warm = _WarmupStore.copy_of(source, None if workdir is None else Path(workdir))
                est._adopt_warm()
                have = est._warm._open().n_epochs
                if have != est.n_epochs_:
                    raise StoreError(
                        f"{source} holds {have} epochs, {p} says {est.n_epochs_}; save again"
                    )
        except BaseException:
            est.close()
            raise
        return est

    def _check_saved_layout(self, path: Path, meta: dict[str, Any]) -> None:
        saved = [(d["name"], tuple(d["shape"])) for d in meta["params"]]
        now = [(p.name, p.shape) for p in self._infos]
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
            f"{path}: the parameters differ from the saved ones ({'; '.join(parts)}); "
            "resume with the model that was saved"
        )

    def _load_state(self, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        dev = self._device

        def get(key: str) -> torch.Tensor:
            if key not in t:
                raise StoreError(f"saved OnlineCMD lacks the tensor {key!r}; save again")
            return t[key].to(dev)

        self._state = _State(
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
        )
        self._load_extra(t)

    def _load_extra(self, t: dict[str, torch.Tensor]) -> None:
        pass


class EmbeddedCMD(OnlineCMD):
    """Embedded CMD: online CMD that gradually freezes parameters to their CMD values.

    Every ``every`` epochs after the warm-up, among the parameters that are neither frozen
    nor a reference, the share ``fraction`` whose ``(a, b)`` moved least since the last
    check (the end of the warm-up for the first) is frozen: from then on parameter i holds
    ``a_i · r_m(i)(t) + b_i`` with its ``(a_i, b_i)`` fixed at freezing time, set anew
    at each :meth:`step` from the references' new values. References are never frozen and
    keep training.

    Movement of parameter i between two checks, in weight units (so ``a`` and ``b`` are
    comparable): the RMS change of its modelled trajectory over the epochs seen,

        ``sqrt(E[(Δa·r + Δb)²]) = sqrt(Δa² E[r²] + 2 Δa Δb E[r] + Δb²)``,

    with ``Δa, Δb`` the change since the last check and E the mean over all epochs folded
    so far of its mode's reference (from the per-mode running sums; computed as
    ``(Δa E[r] + Δb)² + Δa² Var[r]``, which cannot go negative by rounding).
    The number frozen at a check is ``max(1, round(fraction · candidates))`` (half up),
    the candidates being the finite, not frozen, non-reference parameters; ties go to the
    lower flat index.

    Between steps frozen entries do not learn: a gradient hook on each parameter zeroes
    their gradients (nothing is learned for them; in federated learning they need not be
    sent), and with
    ``optimizer`` an optimizer step post-hook writes their values back after every
    optimizer step (momentum and weight decay would otherwise still move them). Without
    ``optimizer`` only the gradients are masked: momentum and weight decay may move frozen
    entries until the next :meth:`step` resets them.

    Parameters
    ----------
    model_or_named_params : torch.nn.Module or iterable of (str, Tensor)
    optimizer : torch.optim.Optimizer, optional
        The optimizer that trains them.
    every : int, default 5
        L, epochs between freezing checks.
    fraction : float, default 0.1
        P, share of the candidates frozen at each check (0 < P <= 1).
    modes, samples, warmup, seed, workdir, total_epochs
        As in :class:`OnlineCMD`.

    Attributes
    ----------
    frozen_ : Tensor, bool, shape (N,)
        Frozen parameters (flat index), on the parameters' device.
    frozen_fraction_ : float
        Share of all N parameters that is frozen.
    (and those of :class:`OnlineCMD`; ``a_``, ``b_`` of a frozen parameter stay at their
    values at freezing time)

    Notes
    -----
    The running sums keep folding frozen parameters (now exactly on their CMD
    trajectory), so ``relative_error_`` is that of the least-squares fit over all epochs;
    a frozen parameter's own ``a_``, ``b_`` no longer follow it. Call :meth:`close` to
    remove the hooks (they are also removed when the object is garbage-collected).
    """

    def __init__(
        self,
        model_or_named_params: NamedParams,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        every: int = 5,
        fraction: float = 0.1,
        modes: int = 10,
        samples: int = 1000,
        warmup: int = 20,
        seed: int = 0,
        workdir: str | os.PathLike[str] | None = None,
        total_epochs: int | None = None,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise UsageError(f"every={every} must be an integer >= 1")
        if not 0.0 < fraction <= 1.0:
            raise UsageError(f"fraction={fraction} must be > 0 and <= 1")
        super().__init__(
            model_or_named_params,
            modes=modes,
            samples=samples,
            warmup=warmup,
            seed=seed,
            workdir=workdir,
            total_epochs=total_epochs,
        )
        self.optimizer = optimizer
        self.every = every
        self.fraction = fraction
        self.frozen_ = torch.zeros(self.n_params_, dtype=torch.bool, device=self._device)
        self._prev_a: torch.Tensor | None = None
        self._prev_b: torch.Tensor | None = None
        # per parameter: its frozen entries and their values (None: nothing frozen)
        self._entries: list[_Frozen | None] = [None] * len(self._params)
        handles: list[Any] = []
        if optimizer is not None:
            handles.append(
                optimizer.register_step_post_hook(functools.partial(_restore_frozen, self._entries))
            )
        self._handles = handles
        self._hook_finalizer = weakref.finalize(self, _remove_hooks, handles)

    @property
    def frozen_fraction_(self) -> float:
        return float(self.frozen_.sum()) / self.n_params_

    def close(self) -> None:
        """Also remove the gradient and optimizer hooks."""
        super().close()
        self._hook_finalizer()

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "every": self.every, "fraction": self.fraction}

    # ------------------------------------------------------------------- steps
    def _warmup_finished(self) -> None:
        st = self._require_state()
        self._prev_a = st.a.clone()
        self._prev_b = st.b.clone()

    def _before_fold(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if not any(e is not None for e in self._entries):
            return w
        st = self._require_state()
        st.ref_now = r  # the frozen entries follow the references' new values
        self._write_frozen(self._cmd_values())
        return self._flat()

    def _merge_coefficients(
        self, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        st = self._state
        if st is None or self._prev_a is None:  # the end of the warm-up: nothing frozen
            return a, b
        return torch.where(self.frozen_, st.a, a), torch.where(self.frozen_, st.b, b)

    def _after_fold(self) -> None:
        since = self.n_epochs_ - self.warmup
        if since > 0 and since % self.every == 0:
            self._freeze()

    def movement(self) -> torch.Tensor:
        """Movement of every parameter since the last check (see the class docstring).

        Returns
        -------
        Tensor, float64, shape (N,)
        """
        st = self._require_state()
        assert self._prev_a is not None and self._prev_b is not None
        n = st.refs.count
        mean = st.refs.mean[st.labels]
        var = (st.refs.centred_norm2 / n)[st.labels]
        da = st.a - self._prev_a
        db = st.b - self._prev_b
        return torch.sqrt((da * mean + db) ** 2 + da * da * var)

    def _freeze(self) -> None:
        st = self._require_state()
        assert self._prev_a is not None and self._prev_b is not None
        move = self.movement()
        cand = ~self.frozen_ & torch.isfinite(move)
        cand[st.ref_index] = False
        idx = torch.nonzero(cand).squeeze(1)
        n_cand = int(idx.shape[0])
        if n_cand:
            k = max(1, math.floor(self.fraction * n_cand + 0.5))
            order = torch.argsort(move[idx], stable=True)[:k]
            self.frozen_[idx[order]] = True
            self._write_frozen(self._cmd_values())
        self._prev_a.copy_(st.a)
        self._prev_b.copy_(st.b)

    def _write_frozen(self, values: torch.Tensor) -> None:
        """Set the frozen entries of every parameter to ``values`` (float64 (N,))."""
        with torch.no_grad():
            for i, ((_, p), info) in enumerate(zip(self._params, self._infos, strict=True)):
                mask = self.frozen_[info.offset : info.offset + info.size].view(info.shape)
                entry = self._entries[i]
                if entry is None:
                    if not bool(mask.any()):
                        continue
                    if p.requires_grad:
                        self._handles.append(p.register_hook(functools.partial(_mask_grad, mask)))
                piece = values[info.offset : info.offset + info.size].view(info.shape)
                v = piece.to(p.dtype, copy=True)
                p.copy_(torch.where(mask, v, p))
                self._entries[i] = _Frozen(param=p, mask=mask, values=v)

    # --------------------------------------------------------------- persisting
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out = super()._state_tensors()
        if out:
            assert self._prev_a is not None and self._prev_b is not None
            out.update(frozen=self.frozen_, prev_a=self._prev_a, prev_b=self._prev_b)
        return out

    def _load_extra(self, t: dict[str, torch.Tensor]) -> None:
        for key in ("frozen", "prev_a", "prev_b"):
            if key not in t:
                raise StoreError(f"saved EmbeddedCMD lacks the tensor {key!r}; save again")
        self.frozen_.copy_(t["frozen"].to(self._device))  # in place: hooks hold views
        self._prev_a = t["prev_a"].to(self._device)
        self._prev_b = t["prev_b"].to(self._device)
        if bool(self.frozen_.any()):
            self._write_frozen(self._cmd_values())


def _remove_hooks(handles: list[Any]) -> None:
    for h in handles:
        h.remove()
    handles.clear()
