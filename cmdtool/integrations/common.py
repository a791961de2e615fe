"""Framework-free logic of the training-framework callbacks (``cmdtool.integrations``).

:class:`CMDSettings` checks the callback's options; :class:`CMDRunner` owns one
:class:`~cmdtool.online.OnlineCMD` or :class:`~cmdtool.online.EmbeddedCMD` over a model's
trainable parameters: it steps it once per epoch, reports the figures to log, swaps the
CMD weights into the model and back (bit-identical), and turns its state into a plain
dict for the framework's checkpoint (:meth:`OnlineCMD.to_state`: tensors and JSON
metadata, plus the path of a warm-up store snapshot while the warm-up lasts) and back.

Neither Lightning nor transformers is imported here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmdtool.decomposition import MIN_EPOCHS
from cmdtool.errors import UsageError
from cmdtool.online import EmbeddedCMD, OnlineCMD
from cmdtool.online.warmup import WARMUP_SUFFIX, read_saved

#: Version of the dict that :meth:`CMDRunner.state` returns.
STATE_FORMAT = 1
METHODS = ("online", "embedded")


@dataclass(frozen=True)
class CMDSettings:
    """Options shared by both callbacks.

    Parameters
    ----------
    method : {"online", "embedded"}
        Online CMD, or embedded CMD (which also freezes parameters).
    warmup : int
        F, warm-up epochs (>= 3 and <= the run's epochs).
    modes : int
        M, number of modes.
    samples : int
        K, sampled parameters clustered at the end of the warm-up.
    every : int
        L, epochs between freezing checks (embedded; >= 1).
    percent : float
        P, percent of the candidates frozen at each check (embedded; 0 < P <= 100).
    seed : int
        Seed of the sampling.
    """

    method: str = "online"
    warmup: int = 20
    modes: int = 10
    samples: int = 1000
    every: int = 5
    percent: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"method={self.method!r} must be 'online' or 'embedded'")
        if not _is_int(self.warmup) or self.warmup < MIN_EPOCHS:
            raise UsageError(
                f"warmup={self.warmup!r} is shorter than {MIN_EPOCHS} epochs: CMD needs at "
                f"least {MIN_EPOCHS} epochs to correlate; use warmup >= {MIN_EPOCHS}"
            )
        if not _is_int(self.every) or self.every < 1:
            raise UsageError(f"every={self.every!r} (L, epochs between freezes) must be >= 1")
        if not isinstance(self.percent, int | float) or not (
            math.isfinite(self.percent) and 0 < self.percent <= 100
        ):
            raise UsageError(f"percent={self.percent!r} (P) must be > 0 and <= 100")
        for name in ("modes", "samples"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise UsageError(f"{name}={value!r} must be an integer >= 1")

    def check_run(self, total_epochs: int | None) -> None:
        """The warm-up fits in a run of ``total_epochs`` epochs (None: unknown)."""
        if total_epochs is not None and self.warmup > total_epochs:
            raise UsageError(
                f"warm-up longer than the run: warmup={self.warmup} > {total_epochs} "
                f"training epochs; use warmup <= {total_epochs} or train longer"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters CMD models: floating, requiring grad (raises when there are none)."""
    named: list[tuple[str, torch.Tensor]] = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad
    ]
    if not any(p.is_floating_point() for _, p in named):
        raise UsageError(
            f"{type(model).__name__} has no trainable floating-point parameter: CMD has "
            "nothing to model; unfreeze some parameters or remove the CMD callback"
        )
    return named


class CMDRunner:
    """One online or embedded CMD over a model, driven by a callback.

    Parameters
    ----------
    settings : CMDSettings
    snapshot_dir : path
        Folder for the warm-up store snapshots that checkpoints taken during the warm-up
        refer to (``warmup-<epochs>.zarr``); created on first use.
    is_main : bool
        Whether this process writes files (rank 0); every rank keeps the same CMD state.
    """

    def __init__(self, settings: CMDSettings, snapshot_dir: Path, *, is_main: bool = True):
        self.settings = settings
        self.snapshot_dir = Path(snapshot_dir)
        self.is_main = is_main
        self.cmd: OnlineCMD | None = None
        self.pending: dict[str, Any] | None = None  # a state to resume from at start()
        self._saved: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ setup
    def start(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        total_epochs: int | None,
    ) -> None:
        """Make the CMD estimator (or continue :attr:`pending`); the model's and the
        optimizer's checkpoint must have been loaded already."""
        self.close()
        s = self.settings
        s.check_run(total_epochs)
        named = trainable(model)
        kw: dict[str, Any] = {}
        cls: type[OnlineCMD] = OnlineCMD
        inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner  # its step() runs the inner one's, and with it the post-hooks
        if s.method == "embedded":
            cls = EmbeddedCMD
            kw = {"optimizer": optimizer, "every": s.every, "fraction": s.percent / 100.0}
        common: dict[str, Any] = {
            "modes": s.modes,
            "samples": s.samples,
            "warmup": s.warmup,
            "seed": s.seed,
        }
        pending, self.pending = self.pending, None
        if pending is None:
            self.cmd = cls(named, total_epochs=total_epochs, **common, **kw)
            return
        self._check_pending(pending, cls)
        kw.pop("every", None)
        kw.pop("fraction", None)
        self.cmd = cls.from_state(
            pending["meta"],
            pending["tensors"],
            named,
            warmup_store=pending.get("warmup_store"),
            where="the CMD callback state of the checkpoint",
            **kw,
        )

    def _check_pending(self, state: dict[str, Any], cls: type[OnlineCMD]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UsageError(
                "the checkpoint's CMD callback state is not one this cmdtool reads "
                f"(format {state.get('format') if isinstance(state, dict) else None!r})"
            )
        meta = state.get("meta")
        if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict):
            raise UsageError("the checkpoint's CMD callback state is damaged: save it again")
        if meta.get("class") != cls.__name__:
            raise UsageError(
                f"the checkpoint's CMD state is {meta.get('class')}, this callback runs "
                f"{cls.__name__} (method={self.settings.method!r}); resume with the same method"
            )
        s = self.settings
        now: dict[str, Any] = {
            "modes": s.modes,
            "samples": s.samples,
            "warmup": s.warmup,
            "seed": s.seed,
        }
        if s.method == "embedded":
            now.update(every=s.every, fraction=s.percent / 100.0)
        old = meta["settings"]
        diff = [f"{k}={old.get(k)!r} (now {v!r})" for k, v in now.items() if old.get(k) != v]
        if diff:
            raise UsageError(
                "the checkpoint's CMD state was made with other settings: saved "
                + ", ".join(diff)
                + "; resume with the same CMD callback settings"
            )

    # ------------------------------------------------------------------ steps
    @property
    def started(self) -> bool:
        return self.cmd is not None

    def _require(self) -> OnlineCMD:
        if self.cmd is None:
            raise UsageError("the CMD callback has not started: it starts with training")
        return self.cmd

    @property
    def n_epochs(self) -> int:
        return self._require().n_epochs_

    def step(self) -> dict[str, float]:
        """Fold the current parameters in as the next epoch; the figures to log."""
        self._require().step()
        return self.figures()

    def figures(self) -> dict[str, float]:
        """``cmd/relative_error``, ``cmd/modes`` (after the warm-up), ``cmd/frozen_fraction``
        (embedded), ``cmd/epochs``."""
        cmd = self._require()
        out = {"cmd/epochs": float(cmd.n_epochs_)}
        if cmd.warmup_finished_:
            out["cmd/relative_error"] = float(cmd.relative_error_)
            out["cmd/modes"] = float(cmd.n_modes_)
        if isinstance(cmd, EmbeddedCMD):
            out["cmd/frozen_fraction"] = cmd.frozen_fraction_
        return out

    # ------------------------------------------------------------------ weights
    @property
    def has_weights(self) -> bool:
        """Whether CMD weights exist (the warm-up has finished)."""
        return self.cmd is not None and self.cmd.warmup_finished_

    def swap_in(self, model: nn.Module) -> None:
        """Put the CMD weights into ``model``'s parameters, keeping the training ones."""
        if self._saved is not None:
            return
        values = self._require().state_dict()
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in values}
        with torch.no_grad():
            for name, v in values.items():
                params[name].copy_(v)
        self._saved = saved

    def swap_back(self, model: nn.Module) -> None:
        """Put the training weights back, exactly as they were."""
        if self._saved is None:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, v in self._saved.items():
                params[name].copy_(v)
        self._saved = None

    @contextmanager
    def cmd_weights(self, model: nn.Module) -> Iterator[None]:
        """``with runner.cmd_weights(model):`` the model holds the CMD weights."""
        self.swap_in(model)
        try:
            yield
        finally:
            self.swap_back(model)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """A plain dict for the framework's checkpoint (tensors, str, numbers, lists).

        During the warm-up the epochs so far are copied (on the main process) to
        ``snapshot_dir / "warmup-<epochs>.zarr"`` and the dict names that folder.
        """
        if self.cmd is None:
            return dict(self.pending) if self.pending is not None else {}
        meta, tensors = self.cmd.to_state()
        out: dict[str, Any] = {
            "format": STATE_FORMAT,
            "meta": meta,
            "tensors": tensors,
            "warmup_store": None,
        }
        if not self.cmd.warmup_finished_ and self.cmd.n_epochs_ > 0:
            snap = self.snapshot_dir / f"warmup-{self.cmd.n_epochs_:06d}.zarr"
            if self.is_main:
                self.snapshot_dir.mkdir(parents=True, exist_ok=True)
                self.cmd.copy_warmup(snap)
            out["warmup_store"] = os.fspath(snap.resolve())
        return out

    def load(self, state: dict[str, Any]) -> None:
        """Keep ``state`` (from :meth:`state`) to continue from at :meth:`start`."""
        if not state:
            return
        if not isinstance(state, dict) or "meta" not in state or "tensors" not in state:
            raise UsageError("the checkpoint's CMD callback state is damaged: save it again")
        self.close()
        self.pending = state

    def load_file(self, path: Path) -> None:
        """Keep the state saved by ``OnlineCMD.save`` at ``path`` (and its warm-up copy)."""
        meta, tensors = read_saved(path)
        state = {"format": STATE_FORMAT, "meta": meta, "tensors": tensors}
        self.load({**state, "warmup_store": os.fspath(str(path) + WARMUP_SUFFIX)})

    def close(self) -> None:
        if self.cmd is not None:
            self.cmd.close()
            self.cmd = None
