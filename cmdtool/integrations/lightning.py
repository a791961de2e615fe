"""CMD inside a PyTorch Lightning run: :class:`CMDCallback` (needs ``cmdtool[lightning]``).

Use::

    from cmdtool.integrations.lightning import CMDCallback

    cmd = CMDCallback("embedded", warmup=10, every=5, percent=10, validate=True)
    trainer = lightning.Trainer(max_epochs=60, callbacks=[cmd])
    trainer.fit(module, train_loader, val_loader)  # ckpt_path=... resumes CMD too
    cmd.cmd.state_dict()  # the CMD weights; also written to <root>/cmdtool/cmd_weights.ckpt

See README, "CMD inside training".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback

from cmdtool.errors import MismatchError, UsageError
from cmdtool.integrations.common import CMDRunner, CMDSettings
from cmdtool.online import OnlineCMD

T = TypeVar("T")

#: File name of the CMD weights written at the end of training (in ``dirpath``).
WEIGHTS_NAME = "cmd_weights.ckpt"


class CMDConfigError(MisconfigurationException, UsageError):
    """Bad CMD callback option or run: Lightning's and cmdtool's exception at once."""


class CMDMismatchError(MisconfigurationException, MismatchError):
    """The checkpoint's CMD state was taken on other parameters."""


@contextmanager
def _as_lightning_error() -> Iterator[None]:
    try:
        yield
    except MisconfigurationException:
        raise
    except MismatchError as exc:
        raise CMDMismatchError(str(exc)) from exc
    except UsageError as exc:
        raise CMDConfigError(str(exc)) from exc


def _call(fn: Callable[[], T]) -> T:
    with _as_lightning_error():
        return fn()


class CMDCallback(Callback):
    """Online or embedded CMD of the LightningModule's trainable parameters.

    Once per training epoch (after its last optimizer step, before the epoch's validation
    and checkpoint) the callback records the parameters; after the warm-up it logs
    ``cmd/relative_error``, ``cmd/modes`` and, for embedded CMD, ``cmd/frozen_fraction``
    (also ``cmd/epochs``) with ``pl_module.log`` (epoch level, to the trainer's loggers).

    Parameters
    ----------
    method : {"online", "embedded"}, default "online"
    warmup, modes, samples, every, percent, seed
        As in :class:`cmdtool.integrations.common.CMDSettings` (F, M, K, L, P in percent).
    validate : bool, default False
        From the end of the warm-up, run the epoch-end validation on the CMD weights
        (swapped in at ``on_validation_start``, the training weights swapped back
        bit-identical at ``on_validation_end``): the validation metrics logged then are
        the CMD model's. Mid-epoch validations (``val_check_interval`` < 1) and the
        sanity check use the training weights.
    save_weights : bool, default True
        At the end of training write the CMD weights as a Lightning checkpoint
        (``trainer.save_checkpoint(..., weights_only=True)``) to ``dirpath/cmd_weights.ckpt``.
    dirpath : path, optional
        Folder for the CMD weights and the warm-up store snapshots that checkpoints
        taken during the warm-up refer to. Default ``trainer.default_root_dir/cmdtool``.

    Attributes
    ----------
    cmd : OnlineCMD or EmbeddedCMD or None
        The estimator, once training has started (still readable after it ended).
    weights_path : Path or None
        Where the CMD weights were written.

    Notes
    -----
    Multi-device (DDP): every rank runs the same CMD on its replica of the parameters,
    which DDP keeps identical, so every rank derives the same frozen mask and masks its
    own gradients and optimizer steps (a frozen parameter stays frozen on every rank);
    only rank 0 writes files. Sharded strategies (FSDP, model parallel) are refused.
    """

    def __init__(
        self,
        method: str = "online",
        *,
        warmup: int = 20,
        modes: int = 10,
        samples: int = 1000,
        every: int = 5,
        percent: float = 10.0,
        seed: int = 0,
        validate: bool = False,
        save_weights: bool = True,
        dirpath: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = _call(
            lambda: CMDSettings(method, warmup, modes, samples, every, percent, seed)
        )
        self.validate = validate
        self.save_weights = save_weights
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.weights_path: Path | None = None
        self._runner = CMDRunner(self.settings, Path("."))
        self._stepped_epoch: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.settings.method)

    @property
    def cmd(self) -> OnlineCMD | None:
        return self._runner.cmd

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            raise CMDConfigError(
                f"CMDCallback does not support the sharded strategy "
                f"{type(trainer.strategy).__name__}: each rank holds only a shard of the "
                "parameters; use DDP or a single device"
            )
        folder = self.dirpath or Path(trainer.default_root_dir) / "cmdtool"
        self._runner.snapshot_dir = folder
        self._runner.is_main = trainer.global_rank == 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        _call(lambda: self._runner.start(pl_module, optimizer, total))
        self._stepped_epoch = None

    # ------------------------------------------------------------------ steps
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        n = trainer.num_training_batches
        if isinstance(n, int) and batch_idx + 1 >= n:
            self._epoch_step(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_step(trainer, pl_module)  # when the epoch's length was unknown

    def _epoch_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stepped_epoch == trainer.current_epoch or not self._runner.started:
            return
        figures = _call(self._runner.step)
        self._stepped_epoch = trainer.current_epoch
        pl_module.log_dict(figures, on_step=False, on_epoch=True, logger=True)

    # ------------------------------------------------------------- validation
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.validate
            and not trainer.sanity_checking
            and self._stepped_epoch == trainer.current_epoch
            and self._runner.has_weights
        ):
            self._runner.swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._runner.swap_back(pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._runner.swap_back(pl_module)

    # ------------------------------------------------------------------ end
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.save_weights and self._runner.has_weights):
            return
        path = self._runner.snapshot_dir / WEIGHTS_NAME
        with self._runner.cmd_weights(pl_module):
            trainer.save_checkpoint(path, weights_only=True)
        self.weights_path = path

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._runner.cmd is not None:
            self._runner.swap_back(pl_module)
            self._runner.cmd.close()  # the warm-up store; a finished model stays readable

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The CMD state for the Lightning checkpoint (tensors and plain values)."""
        return self._runner.state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume CMD from a checkpoint's state when training starts."""
        _call(lambda: self._runner.load(state_dict))


__all__ = ["CMDCallback", "CMDConfigError", "CMDMismatchError"]
