"""Tests of cmdtool.checkpoints: discovery, ordering and safe reading of real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cmdtool.checkpoints import (
    Checkpoint,
    CheckpointEntry,
    canonical_name,
    discover,
    natural_label,
    open_checkpoint,
)
from cmdtool.errors import (
    CheckpointError,
    SourceNotFoundError,
    UnsafeCheckpointError,
    UsageError,
)

#: Every time a pickled :class:`Tripwire` is unpickled (which only an unsafe load does),
#: a call is recorded here.
UNPICKLED: list[str] = []


def _tripped(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Tripwire:
    """An object whose unpickling runs code: what a weights-only loader must refuse."""

    def __init__(self, tag: str = "boom") -> None:
        self.tag = tag

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _tripped, (self.tag,)


class EvilPayload:
    """A plain custom class: loading an instance needs its global, so it is unsafe."""

    def __init__(self) -> None:
        self.x = 1


@pytest.fixture(autouse=True)
def _no_unpickling():
    UNPICKLED.clear()
    yield
    assert UNPICKLED == [], "an unsafe pickle was executed"


def sd(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict with known values (float32, a scalar int64, bf16)."""
    return {
        "fc.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) + seed,
        "fc.bias": torch.tensor([0.5, -1.5], dtype=torch.float32) * (seed + 1),
        "bn.num_batches_tracked": torch.tensor(100 + seed, dtype=torch.int64),
        "emb.weight": torch.tensor([[1.5, -2.0], [0.125, 3.0]], dtype=torch.bfloat16),
    }


def assert_same(ckpt: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    assert set(ckpt) == set(expected)
    assert len(ckpt) == len(expected)
    for name, want in expected.items():
        got = ckpt[name]
        assert got.dtype == want.dtype, name
        assert tuple(got.shape) == tuple(want.shape), name
        assert torch.equal(got, want), name
        assert ckpt.spec(name) == (tuple(want.shape), want.dtype)


def labels(entries: list[CheckpointEntry]) -> list[int]:
    return [e.label for e in entries]


def write_hf_sharded(folder: Path, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    folder.mkdir(parents=True)
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(folder / shard))
        weight_map.update({name: shard for name in tensors})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def write_trainer_junk(folder: Path) -> None:
    """The non-weight files a HF Trainer / training script leaves; all unsafe pickles."""
    for name in (
        "optimizer.pt",
        "optimizer.bin",
        "scheduler.pt",
        "scaler.pt",
        "rng_state.pth",
        "rng_state_3.pth",
        "training_args.bin",
        "optimizer_0.pt",
    ):
        torch.save({"state": Tripwire(name)}, folder / name)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "notes.txt").write_text("epoch 99")


# ------------------------------------------------------------------ names and labels


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("epoch_2.safetensors", 2),
        ("epoch_10.safetensors", 10),
        ("epoch=3-step=99.ckpt", 3),
        ("EPOCH-007.pt", 7),
        ("model_epoch12_acc0.93.pt", 12),
        ("checkpoint-500", 500),
        ("step=40.ckpt", 40),
        ("run3_step_250.pth", 250),
        ("weights_v12.bin", 12),
        ("a1b22.safetensors", 22),
        ("final.safetensors", None),
        ("model.pt", None),
    ],
)
def test_natural_label(name: str, label: int | None) -> None:
    assert natural_label(name) == label


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("fc.weight", "fc.weight"),
        ("model.fc.weight", "fc.weight"),
        ("module.fc.weight", "fc.weight"),
        ("_orig_mod.fc.weight", "fc.weight"),
        ("module._orig_mod.model.fc.weight", "fc.weight"),
        ("model.model.encoder.weight", "encoder.weight"),
        ("encoder.model.weight", "encoder.model.weight"),
        ("modules.fc.weight", "modules.fc.weight"),
    ],
)
def test_canonical_name(name: str, canonical: str) -> None:
    assert canonical_name(name) == canonical


# ------------------------------------------------------------------------ discovery


def test_plain_safetensors_natural_order(tmp_path: Path) -> None:
    for epoch in (10, 2, 1):
        save_file(sd(epoch), str(tmp_path / f"epoch_{epoch}.safetensors"))
    entries = discover(tmp_path)
    assert labels(entries) == [1, 2, 10]
    assert [e.relpath(tmp_path) for e in entries] == [
        "epoch_1.safetensors",
        "epoch_2.safetensors",
        "epoch_10.safetensors",
    ]
    assert all(e.kind == "safetensors" and e.files == (e.path,) for e in entries)
    for entry in entries:
        with open_checkpoint(entry) as ckpt:
            assert ckpt.state_key is None
            assert_same(ckpt, sd(entry.label))


def test_lightning_names_order(tmp_path: Path) -> None:
    for epoch, step in ((3, 99), (0, 33), (11, 396)):
        torch.save({"state_dict": sd(epoch)}, tmp_path / f"epoch={epoch}-step={step}.ckpt")
    entries = discover(tmp_path)
    assert labels(entries) == [0, 3, 11]
    assert [e.path.name for e in entries] == [
        "epoch=0-step=33.ckpt",
        "epoch=3-step=99.ckpt",
        "epoch=11-step=396.ckpt",
    ]
    assert {e.kind for e in entries} == {"lightning"}


def test_hf_folders_with_model_safetensors(tmp_path: Path) -> None:
    for step in (1000, 500, 1500):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file(sd(step), str(folder / "model.safetensors"))
        write_trainer_junk(folder)
    (tmp_path / "runs").mkdir()  # tensorboard logs: not a checkpoint folder
    entries = discover(tmp_path)
    assert labels(entries) == [500, 1000, 1500]
    for entry in entries:
        assert entry.kind == "hf"
        assert entry.path == tmp_path / f"checkpoint-{entry.label}"
        assert entry.files == (entry.path / "model.safetensors",)
        assert entry.relpath(tmp_path) == f"checkpoint-{entry.label}"
        with open_checkpoint(entry) as ckpt:
            assert_same(ckpt, sd(entry.label))


def test_hf_sharded_index(tmp_path: Path) -> None:
    full = sd(4)
    shard1 = {"fc.weight": full["fc.weight"], "fc.bias": full["fc.bias"]}
    shard2 = {k: full[k] for k in ("bn.num_batches_tracked", "emb.weight")}
    write_hf_sharded(
        tmp_path / "checkpoint-40",
        {
            "model-00002-of-00002.safetensors": shard2,
            "model-00001-of-00002.safetensors": shard1,
        },
    )
    (entry,) = discover(tmp_path)
    assert entry.kind == "hf" and entry.label == 40
    assert [f.name for f in entry.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    with open_checkpoint(entry) as ckpt:
        assert_same(ckpt, full)
        # shards in order, each in file order
        assert set(list(ckpt)[:2]) == set(shard1)
        assert set(list(ckpt)[2:]) == set(shard2)


@pytest.mark.parametrize(
    "bad", ["../evil.safetensors", "/tmp/evil.safetensors", "sub/x.safetensors"]
)
def test_hf_shard_outside_folder_rejected(tmp_path: Path, bad: str) -> None:
    source = tmp_path / "run"
    folder = source / "checkpoint-1"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(tmp_path / "evil.safetensors"))  # outside SOURCE
    index = {"weight_map": {"w": bad}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain file names"):
        discover(source)


def test_hf_tensor_in_wrong_or_two_shards(tmp_path: Path) -> None:
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    save_file({"x": torch.ones(2), "y": torch.zeros(2)}, str(folder / a))
    save_file({"z": torch.ones(3)}, str(folder / b))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": a, "y": b, "z": b}}))
    (entry,) = discover(tmp_path)
    with pytest.raises(CheckpointError, match=r"'y'.*model-00001-of-00002"):
        open_checkpoint(entry)

    save_file({"y": torch.zeros(2), "z": torch.ones(3)}, str(folder / b))  # y in both
    index.write_text(json.dumps({"weight_map": {"x": a, "y": a, "z": b}}))
    (entry,) = discover(tmp_path)
    with pytest.raises(CheckpointError, match=r"'y'.*two shards"):
        open_checkpoint(entry)


def test_hf_pytorch_model_bin(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    torch.save(sd(7), folder / "pytorch_model.bin")
    write_trainer_junk(folder)
    (entry,) = discover(tmp_path)
    assert entry.kind == "hf"
    assert entry.files == (folder / "pytorch_model.bin",)
    with open_checkpoint(entry) as ckpt:
        assert ckpt.state_key is None
        assert_same(ckpt, sd(7))


def test_hf_folder_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="checkpoint-3 holds no model weights"):
        discover(tmp_path)


def test_pattern(tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        save_file(sd(epoch), str(tmp_path / f"epoch_{epoch}.safetensors"))
        torch.save(sd(epoch), tmp_path / f"ema_{epoch}.pt")
    save_file(sd(), str(tmp_path / "model.safetensors"))  # no number: left out by pattern
    (tmp_path / "checkpoint-9").mkdir()
    save_file(sd(9), str(tmp_path / "checkpoint-9" / "model.safetensors"))

    picked = discover(tmp_path, pattern="epoch_*.safetensors")
    assert [e.path.name for e in picked] == [f"epoch_{i}.safetensors" for i in (1, 2, 3)]
    picked = discover(tmp_path, pattern="ema_*")
    assert [(e.path.name, e.kind) for e in picked] == [(f"ema_{i}.pt", "torch") for i in (1, 2, 3)]
    picked = discover(tmp_path, pattern="checkpoint-*")
    assert [(e.label, e.kind) for e in picked] == [(9, "hf")]

    with pytest.raises(SourceNotFoundError, match=r"pattern 'nope_\*' matched no"):
        discover(tmp_path, pattern="nope_*")
    with pytest.raises(UsageError):
        discover(tmp_path, pattern="sub/*.pt")
    # without a pattern, the unnumbered file stops discovery with a hint
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*--pattern"):
        discover(tmp_path)


def test_pattern_picks_other_hf_folder_names(tmp_path: Path) -> None:
    for epoch in (2, 1):
        (tmp_path / f"epoch{epoch}").mkdir()
        save_file(sd(epoch), str(tmp_path / f"epoch{epoch}" / "model.safetensors"))
    (tmp_path / "epoch_logs").mkdir()  # matches the pattern but holds no weights
    entries = discover(tmp_path, pattern="epoch*")
    assert [(e.label, e.kind) for e in entries] == [(1, "hf"), (2, "hf")]


def test_non_weight_files_never_opened(tmp_path: Path) -> None:
    write_trainer_junk(tmp_path)
    torch.save(sd(1), tmp_path / "epoch_1.pt")
    torch.save(sd(2), tmp_path / "epoch_2.pt")
    entries = discover(tmp_path)
    assert [e.path.name for e in entries] == ["epoch_1.pt", "epoch_2.pt"]
    for entry in entries:
        with open_checkpoint(entry) as ckpt:
            assert_same(ckpt, sd(entry.label))
    # the junk really is unsafe: a weights-only load refuses it
    with pytest.raises(Exception, match=r"Tripwire|_tripped"):
        torch.load(tmp_path / "optimizer.pt", weights_only=True)


def test_missing_empty_and_unrecognised_source(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="checkpoint folder not found"):
        discover(tmp_path / "nope")
    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(SourceNotFoundError):
        discover(tmp_path / "file.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceNotFoundError, match=r"no checkpoint found in .*empty"):
        discover(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    write_trainer_junk(junk)
    (junk / "sub").mkdir()
    save_file(sd(), str(junk / "sub" / "epoch_1.safetensors"))  # not recursive
    with pytest.raises(SourceNotFoundError, match=r"looked for \*\.safetensors"):
        discover(junk)


def test_duplicate_labels(tmp_path: Path) -> None:
    save_file(sd(), str(tmp_path / "epoch_1.safetensors"))
    torch.save(sd(), tmp_path / "epoch_01.pt")
    with pytest.raises(CheckpointError, match=r"epoch_01\.pt and epoch_1\.safetensors"):
        discover(tmp_path)


def test_name_without_number(tmp_path: Path) -> None:
    save_file(sd(), str(tmp_path / "epoch_1.safetensors"))
    save_file(sd(), str(tmp_path / "final.safetensors"))
    with pytest.raises(CheckpointError, match=r"cannot tell which epoch final\.safetensors"):
        discover(tmp_path)


# ------------------------------------------------------------------------ torch dicts


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_flat_state_dict(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "epoch_5.pth"
    torch.save(sd(5), path, _use_new_zipfile_serialization=not legacy)
    (entry,) = discover(tmp_path)
    assert entry.kind == "torch"
    with open_checkpoint(entry) as ckpt:
        assert ckpt.state_key is None
        assert list(ckpt) == list(sd(5))  # insertion order
        assert_same(ckpt, sd(5))


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_torch_nested_state_dict(tmp_path: Path, key: str) -> None:
    weights = {"module." + k: v for k, v in sd(2).items()}
    torch.save(
        {key: weights, "epoch": 2, "best_loss": torch.tensor(0.25), "optimizer": {"lr": 0.1}},
        tmp_path / "epoch_2.pt",
    )
    (entry,) = discover(tmp_path)
    with open_checkpoint(entry) as ckpt:
        assert ckpt.state_key == key
        assert_same(ckpt, weights)  # prefixes kept exactly


def test_lightning_state_dict_with_hparams(tmp_path: Path) -> None:
    weights = {"model." + k: v for k, v in sd(3).items()}
    torch.save(
        {
            "epoch": 3,
            "global_step": 99,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": weights,
            "hyper_parameters": {"lr": 1e-3, "layers": [64, 32], "name": "mlp", "ema": None},
            "loops": {"fit_loop": {"epoch_progress": {"current": 3}}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}],
            "lr_schedulers": [],
        },
        tmp_path / "epoch=3-step=99.ckpt",
    )
    (entry,) = discover(tmp_path)
    assert entry.kind == "lightning" and entry.label == 3
    with open_checkpoint(entry) as ckpt:
        assert ckpt.state_key == "state_dict"
        assert_same(ckpt, weights)


def test_lightning_current_model_state_preferred(tmp_path: Path) -> None:
    raw = {"model." + k: v for k, v in sd(1).items()}
    averaged = {"model." + k: v for k, v in sd(50).items()}
    torch.save(
        {"epoch": 1, "state_dict": averaged, "current_model_state": raw},
        tmp_path / "epoch=1-step=10.ckpt",
    )
    (entry,) = discover(tmp_path)
    with open_checkpoint(entry) as ckpt:
        assert ckpt.state_key == "current_model_state"
        assert_same(ckpt, raw)


def test_torch_without_tensors(tmp_path: Path) -> None:
    torch.save({"zeta": 1, "alpha": {"b": 2}, "state_dict": {}}, tmp_path / "epoch_1.pt")
    (entry,) = discover(tmp_path)
    with pytest.raises(CheckpointError, match=r"epoch_1\.pt.*alpha, state_dict, zeta"):
        open_checkpoint(entry)


# --------------------------------------------------------------------- unsafe / broken


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_unsafe_torch_checkpoint(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"epoch_1{suffix}"
    torch.save({"state_dict": sd(), "extra": EvilPayload()}, path)
    (entry,) = discover(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as info:
        open_checkpoint(entry)
    message = str(info.value)
    assert str(path) in message
    assert "EvilPayload" in message


def test_unsafe_legacy_torch_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "epoch_1.pt"
    torch.save({"w": torch.ones(2), "x": Tripwire()}, path, _use_new_zipfile_serialization=False)
    (entry,) = discover(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"epoch_1\.pt.*_tripped"):
        open_checkpoint(entry)


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "epoch_1.safetensors"
    save_file(sd(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    (entry,) = discover(tmp_path)
    with pytest.raises(CheckpointError, match=r"epoch_1\.safetensors"):
        open_checkpoint(entry)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"epoch_1\.safetensors"):
        open_checkpoint(entry)


@pytest.mark.parametrize("content", ["truncated", "garbage", "empty"])
def test_broken_torch_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "epoch_1.pt"
    torch.save(sd(), path)
    data = path.read_bytes()
    broken = {"truncated": data[: len(data) // 2], "garbage": b"garbage" * 50, "empty": b""}
    path.write_bytes(broken[content])
    (entry,) = discover(tmp_path)
    with pytest.raises(CheckpointError, match=r"epoch_1\.pt") as info:
        open_checkpoint(entry)
    assert not isinstance(info.value, UnsafeCheckpointError)


# -------------------------------------------------------------------- dtypes and spec


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_dtypes_and_values_exact(tmp_path: Path, fmt: str) -> None:
    tensors = {
        "bf16": torch.tensor([1.0078125, -3.5, 1e-3, 65504.0], dtype=torch.bfloat16),
        "fp16": torch.tensor([[0.1, -2.5], [65504.0, 6e-5]], dtype=torch.float16),
        "i64": torch.tensor([2**62, -(2**40), 0], dtype=torch.int64),
        "f64": torch.tensor([1 / 3], dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(7, dtype=torch.int32),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / f"epoch_1.{fmt}"
    if fmt == "safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    (entry,) = discover(tmp_path)
    with open_checkpoint(entry) as ckpt:
        assert ckpt.spec("fp16") == ((2, 2), torch.float16)
        assert ckpt.spec("scalar") == ((), torch.int32)
        assert ckpt.spec("empty") == ((0, 3), torch.float32)
        assert_same(ckpt, tensors)
        # bit-exact, not just numerically equal
        got = ckpt["bf16"].view(torch.int16)
        assert torch.equal(got, tensors["bf16"].view(torch.int16))


def test_safetensors_spec_without_loading(tmp_path: Path) -> None:
    save_file({"big": torch.zeros(64, 32, dtype=torch.float16)}, str(tmp_path / "e1.safetensors"))
    (entry,) = discover(tmp_path)
    with open_checkpoint(entry) as ckpt:
        assert ckpt.spec("big") == ((64, 32), torch.float16)
        with pytest.raises(KeyError):
            ckpt.spec("nope")
        with pytest.raises(KeyError):
            ckpt["nope"]
        assert "big" in ckpt and "nope" not in ckpt


def test_close(tmp_path: Path) -> None:
    save_file(sd(), str(tmp_path / "epoch_1.safetensors"))
    torch.save(sd(), tmp_path / "epoch_2.pt")
    for entry in discover(tmp_path):
        with open_checkpoint(entry) as ckpt:
            kept = ckpt["fc.weight"]
        with pytest.raises(ValueError, match="closed"):
            ckpt["fc.weight"]
        ckpt.close()  # idempotent
        assert torch.equal(kept, sd()["fc.weight"])  # returned tensors stay valid
