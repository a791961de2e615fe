"""Discovery of what trainers write: unnumbered checkpoints skipped with a notice,
Hugging Face labels by step or by epoch (issue 13, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cmdtool.checkpoints import find_checkpoints
from cmdtool.cli import app
from cmdtool.errors import CheckpointError, UsageError
from cmdtool.ingestion import ingest
from tests.conftest import tree_digest
from tests.trainer_layouts import (
    assert_rows_equal,
    trainer_state,
    write_hf_run,
    write_lightning_run,
)


def tiny_sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),
        "block.weight": torch.randn(4, 4, generator=g),
        "block.bias": torch.randn(4, generator=g),
        "norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "norm.num_batches_tracked": torch.tensor(seed),
    }


def cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_lightning_save_last_folder_ingests_without_options(tmp_path: Path) -> None:
    sds = [tiny_sd(s) for s in range(4)]
    write_lightning_run(tmp_path / "ckpts", sds)
    code, stdout, stderr = cli("ingest", tmp_path / "ckpts", tmp_path / "s.zarr", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["added"] == [0, 1, 2, 3]
    assert summary["labels"] == "name"
    (skipped,) = summary["skipped_files"]
    assert skipped["path"] == "last.ckpt"
    assert "save_last" in skipped["reason"] and "epoch_<N>.ckpt" in skipped["reason"]
    assert_rows_equal(tmp_path / "s.zarr", dict(enumerate(sds)))
    # the human summary says it too, on stderr, in one line
    code, _, stderr = cli("ingest", tmp_path / "ckpts", tmp_path / "s.zarr")
    assert code == 0
    (note,) = [line for line in stderr.splitlines() if "last.ckpt" in line]
    assert note.startswith("note: skipped last.ckpt: Lightning's save_last copy")


def test_hf_folder_with_top_level_final_model(tmp_path: Path) -> None:
    sds = [tiny_sd(s) for s in range(3)]
    steps = write_hf_run(tmp_path / "out", sds)
    found = find_checkpoints(tmp_path / "out")
    assert [e.label for e in found.entries] == steps == [5, 10, 15]
    assert [s.path for s in found.skipped] == ["model.safetensors"]
    assert "trainer.save_model()" in found.skipped[0].reason
    assert found.labels == "step"

    summary = ingest(tmp_path / "out", tmp_path / "s.zarr")
    assert summary.added == [5, 10, 15] and summary.labels == "step"
    assert summary.skipped_files == [
        {"path": "model.safetensors", "reason": found.skipped[0].reason}
    ]
    assert_rows_equal(tmp_path / "s.zarr", dict(zip(steps, sds, strict=True)))

    # --labels epoch reads each trainer_state.json
    code, stdout, stderr = cli(
        "ingest", tmp_path / "out", tmp_path / "e.zarr", "--labels", "epoch", "--json"
    )
    assert code == 0, stderr
    summary_e = json.loads(stdout)
    assert summary_e["added"] == [1, 2, 3] and summary_e["labels"] == "epoch"
    assert_rows_equal(tmp_path / "e.zarr", {1: sds[0], 2: sds[1], 3: sds[2]})

    # changing --labels on a re-ingest would add every folder twice: refused, unchanged
    before = tree_digest(tmp_path / "e.zarr")
    code, _, stderr = cli("ingest", tmp_path / "out", tmp_path / "e.zarr")
    assert code == 2
    assert "checkpoint-5 is already in the store as epoch 1" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert tree_digest(tmp_path / "e.zarr") == before


def test_hf_sharded_final_model_skipped_as_one(tmp_path: Path) -> None:
    sds = [tiny_sd(s) for s in range(3)]
    shards = [
        ["embed.weight"],
        ["block.weight", "block.bias", "norm.weight", "norm.num_batches_tracked"],
    ]
    write_hf_run(tmp_path / "out", sds, shards=shards)
    assert (tmp_path / "out" / "model-00002-of-00002.safetensors").is_file()
    found = find_checkpoints(tmp_path / "out")
    assert [e.label for e in found.entries] == [5, 10, 15]
    assert [len(e.files) for e in found.entries] == [2, 2, 2]
    (skipped,) = found.skipped
    assert skipped.path == "model.safetensors.index.json" and "2 shard(s)" in skipped.reason


def test_best_pt_beside_numbered_files_and_alone(tmp_path: Path) -> None:
    for e in (1, 2, 3):
        torch.save(tiny_sd(e), tmp_path / f"epoch_{e}.pt")
    torch.save(tiny_sd(9), tmp_path / "best.pt")
    found = find_checkpoints(tmp_path)
    assert [e.label for e in found.entries] == [1, 2, 3]
    (skipped,) = found.skipped
    assert skipped.path == "best.pt" and "epoch_<N>.pt" in skipped.reason
    alone = tmp_path / "alone"
    alone.mkdir()
    torch.save(tiny_sd(9), alone / "best.pt")
    with pytest.raises(CheckpointError, match=r"cannot tell which epoch best\.pt"):
        find_checkpoints(alone)


def test_labels_epoch_bad_input(tmp_path: Path) -> None:
    sds = [tiny_sd(s) for s in range(3)]
    write_hf_run(tmp_path / "out", sds, final=False)
    state = tmp_path / "out" / "checkpoint-10" / "trainer_state.json"
    state.write_text(json.dumps(trainer_state(1.5, 10)))
    code, _, stderr = cli("ingest", tmp_path / "out", tmp_path / "s.zarr", "--labels", "epoch")
    assert code == 4
    assert "checkpoint-10/trainer_state.json says epoch 1.5, not a whole epoch" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()
    state.unlink()
    with pytest.raises(CheckpointError, match=r"trainer_state\.json is missing"):
        find_checkpoints(tmp_path / "out", labels="epoch")
    with pytest.raises(UsageError, match="--labels 'epochs' is not one of step, epoch"):
        find_checkpoints(tmp_path / "out", labels="epochs")
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({"w": torch.zeros(2)}, str(plain / "epoch_1.safetensors"))
    with pytest.raises(UsageError, match="holds none"):
        find_checkpoints(plain, labels="epoch")
