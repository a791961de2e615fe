"""Checkpoint folders laid out exactly as the trainers write them, without the trainers.

File names, keys and metadata follow what transformers 5 (``Trainer`` with
``save_strategy="epoch"`` then ``trainer.save_model()``), Lightning 2.6
(``ModelCheckpoint(save_top_k=-1, save_last=True)``, optionally ``WeightAveraging``) and
``torch.distributed.checkpoint.save`` produce; ``scripts/check_frameworks.py`` runs the
real frameworks.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

#: What transformers writes beside the weights of a checkpoint-<step>/ folder.
HF_CONFIG = {"architectures": ["TinyModel"], "model_type": "tiny", "hidden_size": 8}
HF_GENERATION = {"_from_model_config": True, "transformers_version": "5.24.0"}
HF_TOKENIZER = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}"}


def trainer_state(epoch: float, step: int) -> dict[str, object]:
    return {
        "best_global_step": None,
        "best_metric": None,
        "epoch": epoch,
        "global_step": step,
        "log_history": [{"epoch": epoch, "loss": 1.0, "step": step}],
        "max_steps": 99,
        "num_train_epochs": 3,
    }


def write_hf_checkpoint(
    folder: Path,
    sd: dict[str, torch.Tensor],
    *,
    epoch: float,
    step: int,
    shards: Sequence[Sequence[str]] | None = None,
    bin_format: bool = False,
) -> None:
    """One ``checkpoint-<step>/`` folder: weights (one file or shards + index), config,
    generation config, tokenizer files, trainer state and the training by-products."""
    folder.mkdir(parents=True)
    meta = {"format": "pt"}
    if bin_format:
        torch.save(sd, folder / "pytorch_model.bin")
    elif shards is None:
        save_file(
            {k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"), meta
        )
    else:
        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            part = {n: sd[n].contiguous() for n in names}
            save_file(part, str(folder / shard), meta)
            weight_map.update(dict.fromkeys(names, shard))
            total += sum(t.numel() * t.element_size() for t in part.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    (folder / "generation_config.json").write_text(json.dumps(HF_GENERATION))
    for name, text in HF_TOKENIZER.items():
        (folder / name).write_text(text)
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state(epoch, step)))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"junk": torch.zeros(2)}, folder / name)


def write_hf_run(
    root: Path,
    sds: Sequence[dict[str, torch.Tensor]],
    *,
    steps_per_epoch: int = 5,
    final: bool = True,
    shards: Sequence[Sequence[str]] | None = None,
    bin_format: bool = False,
) -> list[int]:
    """A Trainer output folder: one checkpoint per epoch and (``final``) the top-level
    model of ``trainer.save_model()``. Returns the steps (the default labels)."""
    steps = []
    for e, sd in enumerate(sds, start=1):
        step = e * steps_per_epoch
        write_hf_checkpoint(
            root / f"checkpoint-{step}",
            sd,
            epoch=float(e),
            step=step,
            shards=shards,
            bin_format=bin_format,
        )
        steps.append(step)
    if final:
        last = sds[-1]
        if shards is None:
            save_file(
                {k: v.contiguous() for k, v in last.items()},
                str(root / "model.safetensors"),
                {"format": "pt"},
            )
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(
                    {n: last[n].contiguous() for n in names}, str(root / shard), {"format": "pt"}
                )
                weight_map.update(dict.fromkeys(names, shard))
            (root / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
            )
        (root / "config.json").write_text(json.dumps(HF_CONFIG))
        torch.save({"junk": torch.zeros(2)}, root / "training_args.bin")
    return steps


def lightning_checkpoint(
    epoch: int,
    step: int,
    sd: dict[str, torch.Tensor],
    averaged: dict[str, torch.Tensor] | None = None,
) -> dict[str, object]:
    """The dict Lightning's ``Trainer.save_checkpoint`` writes (with ``WeightAveraging``:
    the averaged weights in ``state_dict``, the raw ones in ``current_model_state``)."""
    ckpt: dict[str, object] = {
        "epoch": epoch,
        "global_step": step,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": sd if averaged is None else averaged,
        "loops": {
            "fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": epoch}}}
        },
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": ""}},
        "optimizer_states": [
            {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}
        ],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "width": 8},
    }
    if averaged is not None:
        ckpt["current_model_state"] = sd
        ckpt["averaging_state"] = {"n_averaged": torch.tensor(epoch + 1)}
        ckpt["callbacks"]["WeightAveraging"] = {"latest_update_step": step}  # type: ignore[index]
    return ckpt


def write_lightning_run(
    folder: Path,
    sds: Sequence[dict[str, torch.Tensor]],
    *,
    steps_per_epoch: int = 4,
    save_last: bool = True,
    averaged: Sequence[dict[str, torch.Tensor]] | None = None,
) -> list[Path]:
    """``ModelCheckpoint(save_top_k=-1, save_last=True)``: ``epoch=E-step=S.ckpt`` per
    epoch (E from 0) and ``last.ckpt``, a copy of the latest one."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for e, sd in enumerate(sds):
        step = (e + 1) * steps_per_epoch
        ckpt = lightning_checkpoint(e, step, sd, None if averaged is None else averaged[e])
        path = folder / f"epoch={e}-step={step}.ckpt"
        torch.save(ckpt, path)
        paths.append(path)
    if save_last:
        (folder / "last.ckpt").write_bytes(paths[-1].read_bytes())
    return paths


def write_dcp_run(
    root: Path, sds: Sequence[dict[str, torch.Tensor]], *, nested: bool = True
) -> list[Path]:
    """One ``step-<n>/`` DCP folder per epoch, written by ``torch.distributed.checkpoint.save``
    in this process: ``{"model": sd, "optimizer": ..., "train_state": ...}`` (torchtitan's
    shape) when ``nested``, else the flat state dict."""
    import torch.distributed.checkpoint as dcp

    out = []
    for e, sd in enumerate(sds, start=1):
        state: dict[str, object] = dict(sd)
        if nested:
            state = {
                "model": dict(sd),
                "optimizer": {"state": {"w": {"exp_avg": torch.full((3,), float(e))}}},
                "train_state": {"step": e},
            }
        folder = root / f"step-{e * 10}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=str(folder), no_dist=True)
        out.append(folder)
    return out


def stored_epochs(store: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every committed epoch of a store as {label: {name: float32 tensor}}, read with plain
    zarr and split at the documented ``params`` offsets (not with cmdtool)."""
    import numpy as np
    import zarr

    group = zarr.open_group(store, mode="r")
    meta = group.attrs["cmdtool"]
    weights = np.asarray(group["weights"][: len(meta["epochs"])])
    out = {}
    for row, epoch in enumerate(meta["epochs"]):
        out[epoch["label"]] = {
            p["name"]: torch.from_numpy(
                weights[row, p["offset"] : p["offset"] + int(np.prod(p["shape"], dtype=np.int64))]
                .copy()
                .reshape(p["shape"])
            )
            for p in meta["params"]
        }
    return out


def assert_rows_equal(store: Path, expected: dict[int, dict[str, torch.Tensor]]) -> None:
    """The store's rows are the float32 values of ``expected`` (label -> state dict; a
    stored name may carry a prefix the expected one lacks)."""
    got = stored_epochs(store)
    assert sorted(got) == sorted(expected)
    for label, tensors in expected.items():
        floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
        row = got[label]
        assert len(row) == len(floats), (label, sorted(row), sorted(floats))
        for name, value in floats.items():
            (stored,) = [v for k, v in row.items() if k == name or k.endswith("." + name)]
            assert torch.equal(stored, value.to(torch.float32)), (label, name)
