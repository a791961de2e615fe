"""``reconstruct --layout source``: each epoch written the way its trainer wrote it, and
Lightning's raw or averaged weights (issue 13, item 4)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from cmdtool.cli import app
from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from cmdtool.reconstruction import reconstruct
from tests.trainer_layouts import (
    assert_rows_equal,
    write_dcp_run,
    write_hf_run,
    write_lightning_run,
)


def sd(seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        prefix + "embed.weight": torch.randn(10, 4, generator=g),
        prefix + "block.weight": torch.randn(4, 4, generator=g),
        prefix + "block.bias": torch.randn(4, generator=g).to(torch.bfloat16),
        prefix + "norm.num_batches_tracked": torch.tensor(seed),
    }


def cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_hf_sharded_folder_rebuilt_as_it_was(tmp_path: Path) -> None:
    sds = [sd(s) for s in range(3)]
    shards = [["embed.weight"], ["block.weight", "block.bias", "norm.num_batches_tracked"]]
    write_hf_run(tmp_path / "out", sds, shards=shards)
    ingest(tmp_path / "out", tmp_path / "s.zarr")
    code, stdout, stderr = cli(
        "reconstruct", tmp_path / "s.zarr", tmp_path / "re", "--raw", "--epochs", "all",
        "--layout", "source", "--json",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads(stdout)["files"] == [
        str(tmp_path / "re" / f"checkpoint-{s}") for s in (5, 10, 15)
    ]
    for step, want in zip((5, 10, 15), sds, strict=True):
        src, got = tmp_path / "out" / f"checkpoint-{step}", tmp_path / "re" / f"checkpoint-{step}"
        copied = ["config.json", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "trainer_state.json", "training_args.bin"]  # fmt: skip
        shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert sorted(f.name for f in got.iterdir()) == sorted(
            [*copied, *shard_names, "model.safetensors.index.json"]
        )  # optimizer.pt, scheduler.pt, rng_state.pth: training state, dropped
        for name in copied:
            assert (got / name).read_bytes() == (src / name).read_bytes(), name
        index = json.loads((got / "model.safetensors.index.json").read_text())
        source_index = json.loads((src / "model.safetensors.index.json").read_text())
        assert index == source_index  # same weight_map, same total_size
        for shard, names in zip(shard_names, shards, strict=True):
            with safe_open(str(got / shard), framework="pt") as fh:
                assert fh.metadata() == {"format": "pt"}
                assert sorted(fh.keys()) == sorted(names)
            back = load_file(got / shard)
            for name in names:
                assert back[name].dtype == want[name].dtype
                assert torch.equal(back[name], want[name]), name


def test_hf_single_file_from_the_model_and_source_gone(tmp_path: Path) -> None:
    sds = [sd(s) for s in range(4)]
    write_hf_run(tmp_path / "out", sds)
    ingest(tmp_path / "out", tmp_path / "s.zarr")
    CMD(n_modes=2, n_samples=30).fit(tmp_path / "s.zarr")
    summary = reconstruct(tmp_path / "s.zarr", tmp_path / "re", layout="source")
    (folder,) = map(Path, summary.files)
    assert folder == tmp_path / "re" / "checkpoint-20"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert sorted(fh.keys()) == sorted(sds[-1])
    assert (folder / "config.json").read_bytes() == (
        tmp_path / "out" / "checkpoint-20" / "config.json"
    ).read_bytes()

    # the source folder is gone: the config cannot be copied; stop before writing anything
    shutil.rmtree(tmp_path / "out" / "checkpoint-15")
    code, _, stderr = cli(
        "reconstruct",
        tmp_path / "s.zarr",
        tmp_path / "re2",
        "--epochs",
        "all",
        "--layout",
        "source",
    )
    assert code == 3
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint-15 (epoch 15) is gone" in lines[0]
    assert "leave --layout out" in lines[0]
    assert not (tmp_path / "re2").exists()
    code, _, stderr = cli(
        "reconstruct", tmp_path / "s.zarr", tmp_path / "re2", "--layout", "source", "--format", "pt"
    )
    assert code == 2 and "--format applies to --layout flat" in stderr


def test_lightning_raw_or_averaged_and_ckpt_rebuilt(tmp_path: Path) -> None:
    raw = [sd(s, "model.") for s in range(3)]
    averaged = [sd(10 + s, "model.") for s in range(3)]
    paths = write_lightning_run(tmp_path / "ckpts", raw, averaged=averaged)
    ingest(tmp_path / "ckpts", tmp_path / "raw.zarr")
    assert_rows_equal(tmp_path / "raw.zarr", dict(enumerate(raw)))
    code, stdout, stderr = cli(
        "ingest", tmp_path / "ckpts", tmp_path / "avg.zarr", "--state", "averaged", "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["state_keys"] == {"state_dict": 3}
    assert_rows_equal(tmp_path / "avg.zarr", dict(enumerate(averaged)))
    code, _, stderr = cli("ingest", tmp_path / "ckpts", tmp_path / "x.zarr", "--state", "ema")
    assert code == 2 and "--state 'ema' is not one of raw, averaged" in stderr

    out = reconstruct(
        tmp_path / "raw.zarr", tmp_path / "re", epochs="all", raw=True, layout="source"
    )
    assert out.files == [str(tmp_path / "re" / p.name) for p in paths]
    for path, want, source in zip(out.files, raw, paths, strict=True):
        back = torch.load(path, weights_only=True)
        src = torch.load(source, weights_only=True)
        # the source's entries in its order, minus optimizer, schedulers, raw-weight copy
        dropped = {"optimizer_states", "lr_schedulers", "current_model_state", "averaging_state"}
        assert list(back) == [k for k in src if k not in dropped]
        for key in (
            "epoch",
            "global_step",
            "pytorch-lightning_version",
            "hyper_parameters",
            "loops",
        ):
            assert back[key] == src[key], key
        assert sorted(back["state_dict"]) == sorted(want)
        for name, value in want.items():
            assert back["state_dict"][name].dtype == value.dtype
            assert torch.equal(back["state_dict"][name], value)


def test_dcp_folder_rebuilt_loads_with_dcp_load(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    sds = [sd(s) for s in range(5)]
    write_dcp_run(tmp_path / "run", sds)
    ingest(tmp_path / "run", tmp_path / "s.zarr")
    out = reconstruct(
        tmp_path / "s.zarr", tmp_path / "re", epochs="30,50", raw=True, layout="source"
    )
    assert out.files == [str(tmp_path / "re" / "step-30"), str(tmp_path / "re" / "step-50")]
    for folder, want in zip(out.files, (sds[2], sds[4]), strict=True):
        target = {"model": {k: torch.zeros_like(v) for k, v in want.items()}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(target, checkpoint_id=folder, no_dist=True)
        for name, value in want.items():
            assert torch.equal(target["model"][name], value), name
