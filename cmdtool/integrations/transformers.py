"""CMD inside a Hugging Face ``transformers.Trainer`` run: :class:`CMDCallback` (needs
``cmdtool[transformers]``).

Use::

    from cmdtool.integrations.transformers import CMDCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    trainer.add_callback(CMDCallback("embedded", warmup=10, trainer=trainer, validate=True))
    trainer.train()  # resume_from_checkpoint=... resumes CMD too

See README, "CMD inside training".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from cmdtool.errors import UsageError
from cmdtool.integrations.common import CMDRunner, CMDSettings
from cmdtool.online import OnlineCMD

#: File of the CMD state inside each checkpoint folder (an ``OnlineCMD.save`` file; during
#: the warm-up with the warm-up store beside it as ``cmdtool_cmd.safetensors.warmup.zarr``).
STATE_NAME = "cmdtool_cmd.safetensors"
#: Folder (in ``args.output_dir``) the CMD weights are written to at the end of training.
WEIGHTS_DIR = "cmd-weights"


class CMDCallback(TrainerCallback):
    """Online or embedded CMD of the Trainer's model's trainable parameters.

    At every epoch end (after its last optimizer step, before the epoch's logging,
    evaluation and checkpoint) the callback records the parameters; it logs
    ``cmd/epochs`` and, after the warm-up, ``cmd/relative_error``, ``cmd/modes`` and, for
    embedded CMD, ``cmd/frozen_fraction``: through ``trainer.log`` (so every reporting
    integration and ``state.log_history`` get them) when ``trainer`` is given, else as an
    entry of ``state.log_history``.

    Parameters
    ----------
    method : {"online", "embedded"}, default "online"
    warmup, modes, samples, every, percent, seed
        As in :class:`cmdtool.integrations.common.CMDSettings` (F, M, K, L, P in percent).
    trainer : transformers.Trainer, optional
        The Trainer this callback is added to; needed for ``validate``.
    validate : bool, default False
        After the warm-up, at each epoch end run ``trainer.evaluate`` on the CMD weights
        (metrics ``cmd_eval_*`` in ``log_history``); the training weights are swapped back
        bit-identical before the Trainer's own evaluation and checkpoint.
    save_weights : bool, default True
        At the end of training write the CMD weights to ``args.output_dir/cmd-weights``
        (``trainer.save_model``, else the model's ``save_pretrained``, else a
        ``model.safetensors`` file).
    resume_from : path, optional
        Checkpoint folder to take the CMD state from when training resumes. Default:
        ``args.output_dir/checkpoint-<global step>``, the folder the Trainer resumes from.

    Attributes
    ----------
    cmd : OnlineCMD or EmbeddedCMD or None
        The estimator, once training has started.
    weights_path : Path or None
        Where the CMD weights were written.

    Notes
    -----
    The CMD state goes into every checkpoint folder as ``cmdtool_cmd.safetensors``.
    Multi-device (DDP): every process runs the same CMD on its identical replica, so the
    frozen masks agree and every process masks its own gradients and optimizer steps; the
    main process alone writes files. FSDP and DeepSpeed are refused.
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
        trainer: Any = None,
        validate: bool = False,
        save_weights: bool = True,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = CMDSettings(method, warmup, modes, samples, every, percent, seed)
        if validate and trainer is None:
            raise UsageError(
                "validate=True needs the Trainer: CMDCallback(..., trainer=trainer, "
                "validate=True) and trainer.add_callback(...)"
            )
        self.trainer = trainer
        self.validate = validate
        self.save_weights = save_weights
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.weights_path: Path | None = None
        self._runner = CMDRunner(self.settings, Path("."))

    @property
    def cmd(self) -> OnlineCMD | None:
        return self._runner.cmd

    # ------------------------------------------------------------------ setup
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if args.fsdp or args.deepspeed:
            raise UsageError(
                "CMDCallback does not support FSDP or DeepSpeed: each process holds only a "
                "shard of the parameters; use DDP or a single device"
            )
        if model is None:
            raise UsageError("the Trainer passed no model to CMDCallback")
        self._runner.is_main = state.is_world_process_zero
        if state.global_step > 0:  # resumed from a checkpoint
            folder = self.resume_from or _output_dir(args) / f"checkpoint-{state.global_step}"
            path = folder / STATE_NAME
            if not path.is_file():
                raise UsageError(
                    f"training resumed at step {state.global_step} but {path} holds no CMD "
                    "state; pass CMDCallback(resume_from=<the checkpoint folder>)"
                )
            self._runner.load_file(path)
        total = int(state.num_train_epochs) if state.num_train_epochs else None
        self._runner.start(model, optimizer, total)

    # ------------------------------------------------------------------ steps
    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._runner.started:
            return
        figures = self._runner.step()
        # trainer.log and trainer.evaluate clear the flags the Trainer's own epoch-end
        # logging, evaluation and saving are about to read: keep them
        flags = (control.should_log, control.should_evaluate, control.should_save)
        try:
            if self.trainer is not None:
                self.trainer.log(dict(figures))
            else:
                entry: dict[str, float] = {**figures, "step": state.global_step}
                if state.epoch is not None:
                    entry["epoch"] = state.epoch
                state.log_history.append(entry)
            if self.validate and self._runner.has_weights and model is not None:
                with self._runner.cmd_weights(model):
                    self.trainer.evaluate(metric_key_prefix="cmd_eval")
        finally:
            control.should_log, control.should_evaluate, control.should_save = flags

    # ------------------------------------------------------------------ state
    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        cmd = self._runner.cmd
        if cmd is None or not state.is_world_process_zero:
            return
        folder = _output_dir(args) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        cmd.save(folder / STATE_NAME)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self.save_weights and self._runner.has_weights and model is not None:
            out = _output_dir(args) / WEIGHTS_DIR
            with self._runner.cmd_weights(model):
                if self.trainer is not None:
                    self.trainer.save_model(str(out))
                elif state.is_world_process_zero:
                    _save_model(model, out)
            self.weights_path = out
        if self._runner.cmd is not None:
            self._runner.cmd.close()  # the warm-up store; a finished model stays readable


def _output_dir(args: TrainingArguments) -> Path:
    return Path(args.output_dir or "trainer_output")  # the Trainer's own default


def _save_model(model: nn.Module, out: Path) -> None:
    """``save_pretrained`` when the model has it, else a ``model.safetensors`` file."""
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(str(out))
        return
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"))


__all__ = ["CMDCallback"]
