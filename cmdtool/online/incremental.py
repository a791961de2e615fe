"""Online and embedded CMD inside a training loop (``docs/design.md``, "Online and embedded CMD").

:class:`OnlineCMD` watches a model's parameters once per epoch. During a warm-up of F
epochs every snapshot is appended to a real trajectory store on disk (the library never
holds an N x T history in memory); after the F-th epoch the store is decomposed once with
:class:`cmdtool.decomposition.CMD`, and from then on the modes and references stay fixed and
each epoch is folded into the running sums of :mod:`cmdtool.method.running`: O(N) work and
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

import json
import os
import shutil
import weakref
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from cmdtool.checkpoints.dtypes import dtype_name
from cmdtool.decomposition import CMD, MIN_EPOCHS
from cmdtool.errors import MismatchError, StoreError, UsageError
from cmdtool.method.running import (
    ParamSums,
    ReferenceSums,
    coefficients,
    mode_totals,
    relative_errors,
)
from cmdtool.online.warmup import (
    META_KEY,
    RESULT_NAME,
    WARMUP_SUFFIX,
    NamedParams,
    OnlineState,
    WarmupError,
    WarmupStore,
    check_meta,
    check_saved_layout,
    gated_stats,
    named_tensors,
    param_layout,
    read_saved,
    state_meta,
    stats_layout,
)


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
        self._params = named_tensors(model_or_named_params)
        self._infos = param_layout(self._params)
        self._device = self._params[0][1].device
        self._stats = stats_layout(self._infos, self._device)
        self.n_params_ = sum(p.size for p in self._infos)
        self.n_epochs_ = 0
        self.workdir_: Path | None = None
        self._check_settings()
        self._warm: WarmupStore | None = None
        self._warm_finalizer: weakref.finalize[Any, Any] | None = None
        self._state: OnlineState | None = None
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

    def _require_state(self) -> OnlineState:
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
            self._warm = WarmupStore.create(
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
        constant = load("constant", bool) if "constant" in group else labels < 0
        self._state = OnlineState(
            labels=labels,
            ref_index=ref_index,
            sums=sums,
            refs=refs,
            ref_now=ref_now,
            a=torch.zeros(0),
            b=torch.zeros(0),
            relative_error=0.0,
            mode_errors=np.zeros(0),
            constant=constant,
            stats_now=None if self._stats is None else w[self._stats.cols].to(torch.float64),
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
        if self._stats is not None:
            st.stats_now = w[self._stats.cols].to(torch.float64)
        self.n_epochs_ += 1
        self._update_coefficients()
        self._after_fold()

    def _update_coefficients(self) -> None:
        st = self._require_state()
        # the parameters constant over the warm-up stay in no mode: a = 0, b their mean
        # (their value while they do not move: float64 sums of float32 values)
        coef = coefficients(st.sums, st.refs, st.labels, st.constant)
        st.a, st.b = self._merge_coefficients(coef.a, coef.b)
        m = int(st.ref_index.shape[0])
        err2, sq, _ = mode_totals(st.labels, coef, m, st.constant)
        st.relative_error, per_mode = relative_errors(err2, sq)
        st.mode_errors = per_mode[:m]  # slot m: the constant parameters

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
        """The CMD weights ``a·r_m(t) + b`` at the last epoch t (normalization statistics
        given as (name, tensor) pairs, e.g. ``running_var``, rebuilt as post-hoc CMD's
        default ``--stats gated``; constant parameters exactly).

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
        st = self._require_state()
        if self._stats is not None and st.stats_now is not None:  # as post-hoc's default
            values = gated_stats(values, st.stats_now, self._stats)
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
    def constant_(self) -> torch.Tensor:
        """bool (N,): parameters constant over the warm-up, in no mode (``a_`` = 0)."""
        st = self._require_state()
        return st.labels < 0 if st.constant is None else st.constant

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
        return {} if self._state is None else self._state.tensors()

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The state that :meth:`save` writes, in memory: JSON metadata and tensors.

        Returns
        -------
        meta : dict
            JSON-compatible settings, counters and parameter layout.
        tensors : dict of str to Tensor
            CPU copies of the O(N) state (EmbeddedCMD adds its mask); empty during the
            warm-up, whose epochs live in the warm-up store (:meth:`copy_warmup`).
        """
        meta = state_meta(
            type(self).__name__, self._settings(), self.n_epochs_, self._infos, self._state
        )
        state = self._state_tensors().items()
        return meta, {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state}

    def copy_warmup(self, target: str | os.PathLike[str]) -> None:
        """Replace the folder ``target`` by a copy of the warm-up store (for :meth:`from_state`)."""
        if self._warm is None:
            raise UsageError("no warm-up store to copy: the warm-up has not started or is over")
        self._warm.copy_to(Path(target))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_state` to the safetensors file ``path`` (no pickle; the metadata
        as JSON); during the warm-up the warm-up store is copied to ``path + ".warmup.zarr"``.
        Both are written under temporary names and renamed: an interrupted save leaves the
        previous one intact."""
        if self._state is None and self.n_epochs_ > 0 and self._warm is None:
            raise UsageError(
                "this OnlineCMD was closed during the warm-up and its warm-up epochs are "
                "gone; save before close()"
            )
        target = Path(path)
        warm_copy = Path(str(target) + WARMUP_SUFFIX)
        meta, tensors = self.to_state()
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
        meta, tensors = read_saved(p)
        return cls.from_state(
            meta,
            tensors,
            model_or_named_params,
            warmup_store=Path(str(p) + WARMUP_SUFFIX),
            workdir=workdir,
            where=str(p),
            **kwargs,
        )

    @classmethod
    def from_state(
        cls,
        meta: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        model_or_named_params: NamedParams,
        *,
        warmup_store: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        where: str = "the saved state",
        **kwargs: Any,
    ) -> Self:
        """Continue from the output of :meth:`to_state` (what :meth:`resume` reads), with
        ``warmup_store`` a copy of the warm-up store (:meth:`copy_warmup`; needed for a state
        taken during the warm-up, copied, not changed). ``where`` names the state in error
        messages; the other arguments are those of :meth:`resume`."""
        check_meta(meta, where)
        if meta.get("class") != cls.__name__:
            raise UsageError(
                f"{where} was saved by {meta.get('class')}, not {cls.__name__}; resume it "
                f"with {meta.get('class')}"
            )
        est = cls(model_or_named_params, workdir=workdir, **kwargs, **meta["settings"])
        try:
            check_saved_layout(est._infos, meta, where)
            est.n_epochs_ = int(meta["n_epochs"])
            if meta["warmup_finished"]:
                est._load_state(meta, tensors)
            elif est.n_epochs_ > 0:
                wd = None if workdir is None else Path(workdir)
                est._warm = WarmupStore.resumed(warmup_store, wd, where, est.n_epochs_)
                est._adopt_warm()
        except BaseException:
            est.close()
            raise
        return est

    def _load_state(self, meta: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        self._state = OnlineState.from_tensors(meta, t, self._device)
        self._load_extra(t)

    def _load_extra(self, t: dict[str, torch.Tensor]) -> None:
        pass


