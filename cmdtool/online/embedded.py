"""Embedded CMD: online CMD that freezes, every L epochs, the share P of parameters
whose ``(a, b)`` moved least (``docs/design.md``, "Online and embedded CMD")."""

from __future__ import annotations

import functools
import math
import os
import weakref
from typing import Any

import torch

from cmdtool.errors import StoreError, UsageError
from cmdtool.online.incremental import OnlineCMD
from cmdtool.online.warmup import Frozen, NamedParams, mask_grad, restore_frozen


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
        self._entries: list[Frozen | None] = [None] * len(self._params)
        handles: list[Any] = []
        if optimizer is not None:
            handles.append(
                optimizer.register_step_post_hook(functools.partial(restore_frozen, self._entries))
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
                        self._handles.append(p.register_hook(functools.partial(mask_grad, mask)))
                piece = values[info.offset : info.offset + info.size].view(info.shape)
                v = piece.to(p.dtype, copy=True)
                p.copy_(torch.where(mask, v, p))
                self._entries[i] = Frozen(param=p, mask=mask, values=v)

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
