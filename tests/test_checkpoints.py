"""Tests of cmdtool.checkpoints: discovery, ordering and safe reading of real files."""

from __future__ import annotations

import json
import os
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
)  # an absolute path, a ../ path, a sub-folder
def test_hf_shard_outside_folder_rejected(tmp_path: Path, bad: str) -> None:
    # guards: checkpoints._index_shards (_is_plain_name on every weight_map shard)
    source = tmp_path / "run"
    folder = source / "checkpoint-1"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(tmp_path / "evil.safetensors"))  # outside SOURCE
    index = {"weight_map": {"w": bad}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain file names"):
        discover(source)


def test_hf_tensor_in_wrong_or_two_shards(tmp_path: Path) -> None:
    # guards: checkpoints._check_shards (each tensor in exactly its indexed shard)
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
    # without a pattern, the unnumbered model.safetensors is skipped (a notice, see
    # test_checkpoints_discover.py) and the two files of each epoch stop discovery
    with pytest.raises(CheckpointError, match=r"ema_1\.pt and epoch_1.*--pattern"):
        discover(tmp_path)


def test_pattern_picks_other_hf_folder_names(tmp_path: Path) -> None:
    for epoch in (2, 1):
        (tmp_path / f"epoch{epoch}").mkdir()
        save_file(sd(epoch), str(tmp_path / f"epoch{epoch}" / "model.safetensors"))
    (tmp_path / "epoch_logs").mkdir()  # matches the pattern but holds no weights
    entries = discover(tmp_path, pattern="epoch*")
    assert [(e.label, e.kind) for e in entries] == [(1, "hf"), (2, "hf")]


def test_non_weight_files_never_opened(tmp_path: Path) -> None:
    # guards: checkpoints._is_non_weight in discover()
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
    # alone (no numbered checkpoint beside it) an unnumbered file cannot be ordered;
    # beside numbered ones it is skipped with a notice (test_checkpoints_discover.py)
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
    # guards: weights_only=True in checkpoints._weights_only_load
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


# ------------------------------------------------------------- safetensors validation


def st_file(
    path: Path,
    header: object,
    data: bytes = b"",
    *,
    length: int | None = None,
    raw: bytes | None = None,
) -> Path:
    """Write a safetensors-like file: u64 length, a JSON header (or raw bytes), data."""
    text = raw if raw is not None else json.dumps(header).encode()
    n = len(text) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + text + data)
    return path


def fc_header(begin: int = 0, end: int = 24, **entry: object) -> dict[str, object]:
    return {"fc.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end], **entry}}


@pytest.fixture
def no_safe_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if an invalid file reaches safetensors.safe_open."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("safe_open was handed a file that failed validation")

    monkeypatch.setattr("cmdtool.checkpoints.safetensors.safe_open", refuse)


def open_single(path: Path, **kwargs: object) -> Checkpoint:
    (entry,) = discover(path.parent)
    return open_checkpoint(entry, **kwargs)  # type: ignore[arg-type]


def test_safetensors_size_mismatch_message(tmp_path: Path, no_safe_open: None) -> None:
    header = {"fc.weight": {"dtype": "F32", "shape": [10, 100], "data_offsets": [0, 3996]}}
    path = st_file(tmp_path / "epoch_3.safetensors", header, bytes(3996))
    with pytest.raises(CheckpointError) as info:
        open_single(path)
    assert "epoch_3.safetensors: tensor 'fc.weight' claims 4000 bytes" in str(info.value)
    assert "but its offsets span 3996" in str(info.value)
    assert not isinstance(info.value, UnsafeCheckpointError)


D24 = bytes(24)
BAD_SAFETENSORS: list[tuple[str, dict[str, object], str]] = [
    ("too-short", {"raw": b"\x01\x02\x03", "header": None}, "too short"),
    ("header-over-limit", {"header": fc_header(), "length": 100_000_001}, "100000000"),
    ("header-past-eof", {"header": fc_header(), "length": 10_000}, r"only \d+ follow"),
    ("header-length-max", {"header": fc_header(), "length": 2**64 - 1}, "100000000"),
    ("not-utf8", {"raw": b'{"\xff": 1}', "header": None}, "not UTF-8"),
    ("not-json", {"raw": b"{not json}", "header": None}, "not valid JSON"),
    ("not-object", {"header": [1, 2]}, "not an object"),
    ("duplicate-key", {"raw": b'{"a": {}, "a": {}}', "header": None}, "twice"),
    ("nan", {"raw": b'{"__metadata__": {"a": NaN}}', "header": None}, "NaN"),
    ("lone-surrogate", {"raw": b'{"\\ud800": {}}', "header": None}, "not valid JSON"),
    ("metadata-not-str", {"header": {"__metadata__": {"a": 1}, **fc_header()}}, "metadata"),
    ("metadata-list", {"header": {"__metadata__": ["a"], **fc_header()}}, "metadata"),
    ("entry-not-object", {"header": {"fc.weight": [1]}}, "not an object"),
    ("no-dtype", {"header": {"w": {"shape": [0], "data_offsets": [0, 0]}}}, "no 'dtype'"),
    ("unknown-dtype", {"header": fc_header(dtype="F33")}, "unknown dtype 'F33'"),
    ("sub-byte-dtype", {"header": fc_header(dtype="F4")}, "sub-byte"),
    ("negative-dim", {"header": fc_header(shape=[-2, -3])}, "non-negative"),
    ("float-dim", {"header": fc_header(shape=[2.0, 3])}, "non-negative integers"),
    ("bool-dim", {"header": fc_header(shape=[True, 6])}, "non-negative integers"),
    ("huge-dims", {"header": fc_header(shape=[2**40, 2**40, 0])}, "too many elements"),
    ("three-offsets", {"header": fc_header(data_offsets=[0, 12, 24])}, "pair"),
    ("negative-offset", {"header": fc_header(-4, 20)}, "non-negative"),
    ("reversed-offsets", {"header": fc_header(24, 0)}, "end before they begin"),
    ("past-data", {"header": fc_header(0, 24), "data": bytes(20)}, r"truncated\?"),
    ("gap", {"header": fc_header(4, 28), "data": bytes(28)}, "gap of 4 bytes"),
    ("trailing", {"header": fc_header(), "data": bytes(30)}, "6 trailing bytes"),
    (
        "overlap",
        {
            "header": {
                "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]},
            },
            "data": bytes(12),
        },
        "overlap of 4 bytes",
    ),
]


@pytest.mark.parametrize(
    ("spec", "match"), [(spec, match) for _, spec, match in BAD_SAFETENSORS],
    ids=[case for case, _, _ in BAD_SAFETENSORS],
)  # fmt: skip
def test_invalid_safetensors_refused_before_safe_open(
    tmp_path: Path, no_safe_open: None, spec: dict[str, object], match: str
) -> None:
    # guards: checkpoints._read_safetensors_header before safe_open
    path = tmp_path / "epoch_1.safetensors"
    if spec.get("raw") is not None and spec["raw"] == b"\x01\x02\x03":
        path.write_bytes(b"\x01\x02\x03")
    else:
        st_file(
            path,
            spec["header"],
            spec.get("data", D24),  # type: ignore[arg-type]
            length=spec.get("length"),  # type: ignore[arg-type]
            raw=spec.get("raw"),  # type: ignore[arg-type]
        )
    with pytest.raises(CheckpointError, match=match) as info:
        open_single(path)
    assert "epoch_1.safetensors" in str(info.value)


def test_safetensors_huge_claims_allocate_nothing(tmp_path: Path, no_safe_open: None) -> None:
    # guards: checkpoints._element_count (Python ints, limit before allocating)
    """Claims of huge headers or tensors are refused without allocating for them."""
    import tracemalloc

    claims = {
        "header": (fc_header(), 99_999_999),  # a 100 MB header in a 60-byte file
        "tensor": (fc_header(0, 2**62, shape=[2**60]), None),  # a 4 EiB tensor
    }
    for case, (header, length) in claims.items():
        (tmp_path / case).mkdir()
        path = st_file(tmp_path / case / "epoch_1.safetensors", header, D24, length=length)
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError):
                open_single(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000, (case, peak)


def test_safetensors_edge_cases_accepted(tmp_path: Path) -> None:
    """What the format allows: metadata (or null), zero-size tensors, leading space."""
    header = {
        "__metadata__": {"format": "pt", "note": "x"},
        "none": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]},
        "also_none": {"dtype": "I64", "shape": [3, 0], "data_offsets": [0, 0]},
        "w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
        "i": {"dtype": "I64", "shape": [], "data_offsets": [4, 12]},
    }
    data = torch.tensor([1.5, -2.0], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    data += (7).to_bytes(8, "little", signed=True)
    path = st_file(tmp_path / "epoch_1.safetensors", header, data)
    with open_single(path) as ckpt:
        assert ckpt.spec("none") == ((0, 5), torch.float32)
        assert torch.equal(ckpt["w"], torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
        assert ckpt["i"].item() == 7 and ckpt.spec("i") == ((), torch.int64)
    header["__metadata__"] = None  # safetensors reads null as no metadata
    st_file(path, header, data, raw=b" " + json.dumps(header).encode())
    with open_single(path) as ckpt:
        assert set(ckpt) == {"none", "also_none", "w", "i"}


def test_hf_shard_validated_too(tmp_path: Path) -> None:
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    st_file(folder / a, fc_header(), D24)  # valid
    st_file(folder / b, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))
    index = {"weight_map": {"fc.weight": a, "x": b}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (entry,) = discover(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{b}: tensor 'x' claims 12 bytes"):
        open_checkpoint(entry)


# -------------------------------------------------------------- zip integrity checks


def _record_data_offset(path: Path, suffix: str) -> int:
    """Where the bytes of the zip record whose name ends with ``suffix`` start."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    with path.open("rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


@pytest.mark.parametrize("where", ["data/0", "data.pkl"])
def test_torch_zip_flipped_bit_detected(tmp_path: Path, where: str) -> None:
    # guards: checkpoints._verify_zip (record CRC-32 check)
    """torch.load checks no checksum: cmdtool verifies each record's CRC-32 first."""
    path = tmp_path / "epoch_1.pt"
    torch.save(sd(), path)
    data = bytearray(path.read_bytes())
    data[_record_data_offset(path, where) + 9] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"epoch_1\.pt.*CRC-32") as info:
        open_single(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_torch_zip_without_crcs_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "epoch_1.pt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(sd(), path)
    finally:
        torch.serialization.set_crc32_options(True)
    with open_single(path) as ckpt:
        assert_same(ckpt, sd())


# ------------------------------------------------------------------- allow_globals

#: Calls into HParams' own code; unpickling with its real class would record here.
SIDE_EFFECTS: list[str] = []


class HParams:
    """A hyper-parameter object whose unpickling would run (and record) its code."""

    def __new__(cls, *args: object, **kwargs: object) -> HParams:
        SIDE_EFFECTS.append("__new__")
        return super().__new__(cls)

    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr
        self.layers = [64, 32]

    def __setstate__(self, state: dict[str, object]) -> None:
        SIDE_EFFECTS.append("__setstate__")
        self.__dict__.update(state)


class AttrDict(dict):  # type: ignore[type-arg]
    """A dict subclass, as Lightning's AttributeDict: pickled with SETITEMS."""

    def __setitem__(self, key: object, value: object) -> None:
        SIDE_EFFECTS.append("AttrDict.__setitem__")
        super().__setitem__(key, value)


class Layers(list):  # type: ignore[type-arg]
    """A list subclass: pickled with APPENDS."""

    def extend(self, values: object) -> None:
        SIDE_EFFECTS.append("Layers.extend")
        super().extend(values)  # type: ignore[arg-type]


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def write_lightning_with_hparams(path: Path, hparams: dict[str, object]) -> dict[str, torch.Tensor]:
    weights = {"model." + k: v for k, v in sd(5).items()}
    torch.save(
        {"epoch": 5, "global_step": 50, "state_dict": weights, "hyper_parameters": hparams}, path
    )
    SIDE_EFFECTS.clear()  # pickling may call into the classes; only loading matters
    return weights


def test_allow_globals_loads_with_inert_placeholders(tmp_path: Path) -> None:
    # guards: checkpoints._inert_class / _weights_only_load (placeholders, never the real class)
    import argparse

    path = tmp_path / "epoch=5-step=50.ckpt"
    weights = write_lightning_with_hparams(
        path, {"config": HParams(0.5), "args": argparse.Namespace(lr=0.5, name="mlp")}
    )
    needed = sorted(["argparse.Namespace", qualname(HParams)])
    with pytest.raises(UnsafeCheckpointError) as info:
        open_single(path)
    message = str(info.value)
    assert str(path) in message
    assert ", ".join(needed) in message  # all of them, sorted
    assert "--allow-global QUALNAME" in message
    for name in needed:
        assert f"--allow-global {name}" in message

    with pytest.raises(UnsafeCheckpointError) as info:  # one allowed: the other still refused
        open_single(path, allow_globals=["argparse.Namespace"])
    assert qualname(HParams) in str(info.value) and "beyond those allowed" in str(info.value)
    assert "--allow-global argparse.Namespace" not in str(info.value)

    with open_single(path, allow_globals=needed) as ckpt:
        assert ckpt.state_key == "state_dict"
        assert_same(ckpt, weights)
    assert SIDE_EFFECTS == []  # HParams' code never ran

    # the tripwire works: a (trusted, here) full unpickle does run HParams' code
    torch.load(path, weights_only=False)
    assert "__setstate__" in SIDE_EFFECTS and "__new__" in SIDE_EFFECTS


def test_allow_globals_dict_and_list_subclasses(tmp_path: Path) -> None:
    path = tmp_path / "epoch=5-step=50.ckpt"
    attrs = AttrDict()
    dict.__setitem__(attrs, "lr", 0.1)
    attrs.note = "x"  # type: ignore[attr-defined]
    layers = Layers()
    list.extend(layers, [64, 32])
    weights = write_lightning_with_hparams(path, {"attrs": attrs, "layers": layers})
    names = [qualname(AttrDict), qualname(Layers)]
    with pytest.raises(UnsafeCheckpointError, match=", ".join(sorted(names))):
        open_single(path)
    with open_single(path, allow_globals=names) as ckpt:
        assert_same(ckpt, weights)
    assert SIDE_EFFECTS == []


def test_allow_globals_custom_state_dict_class(tmp_path: Path) -> None:
    """A state dict pickled as a dict subclass is still found, as a plain mapping."""
    path = tmp_path / "epoch_2.pt"
    state = AttrDict()
    for name, tensor in sd(2).items():
        dict.__setitem__(state, name, tensor)
    torch.save({"state_dict": state}, path)
    SIDE_EFFECTS.clear()
    with open_single(path, allow_globals=[qualname(AttrDict)]) as ckpt:
        assert_same(ckpt, sd(2))
    assert SIDE_EFFECTS == []


def test_unsafe_legacy_file_names_all_globals(tmp_path: Path) -> None:
    path = tmp_path / "epoch_1.pt"
    torch.save(
        {"w": torch.ones(2), "x": Tripwire(), "cfg": HParams()},
        path,
        _use_new_zipfile_serialization=False,
    )
    SIDE_EFFECTS.clear()
    needed = sorted([qualname(HParams), f"{__name__}._tripped"])
    with pytest.raises(UnsafeCheckpointError, match=", ".join(needed)):
        open_single(path)
    with open_single(path, allow_globals=needed) as ckpt:
        assert torch.equal(ckpt["w"], torch.ones(2))
    assert SIDE_EFFECTS == []


def test_blocked_module_refused_even_if_allowed(tmp_path: Path) -> None:
    class CallsOs:
        def __reduce__(self) -> tuple[object, tuple[()]]:
            return os.getcwd, ()

    path = tmp_path / "epoch_1.pt"
    torch.save({"w": torch.ones(2), "x": CallsOs()}, path)
    refused = f"{os.getcwd.__module__}.getcwd"  # posix.getcwd
    with pytest.raises(UnsafeCheckpointError, match=rf"{refused}.*could not be loaded"):
        open_single(path)
    with pytest.raises(UnsafeCheckpointError, match="blocked"):
        open_single(path, allow_globals=[refused])


@pytest.mark.parametrize("bad", ["Namespace", "", "a..b", "a.b c", "1a.b", "os.system()"])
def test_allow_globals_must_be_qualnames(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "epoch_1.pt"
    torch.save(sd(), path)
    with pytest.raises(UsageError, match="--allow-global"):
        open_single(path, allow_globals=[bad])


def test_force_no_weights_only_env_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # guards: weights_only=True passed explicitly in checkpoints._weights_only_load
    """weights_only=True is passed explicitly, so torch's escape hatch cannot open it."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "epoch_1.ckpt"
    write_lightning_with_hparams(path, {"config": HParams(), "trip": Tripwire("env")})
    with pytest.raises(UnsafeCheckpointError, match="_tripped"):
        open_single(path)
    with open_single(path, allow_globals=[qualname(HParams), f"{__name__}._tripped"]) as ckpt:
        assert len(ckpt) == len(sd())
    assert SIDE_EFFECTS == []  # and UNPICKLED stays empty (checked by the autouse fixture)


# ---------------------------------------------------------------- sharded index paths


@pytest.mark.parametrize(
    "bad", ["..\\evil.safetensors", "C:evil.safetensors", "..", "/abs/model.safetensors"]
)
def test_hf_shard_path_forms_rejected(tmp_path: Path, bad: str) -> None:
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model-00001-of-00001.safetensors"))
    index = {"weight_map": {"w": bad}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain file names"):
        discover(tmp_path)


def test_hf_index_maps_tensor_to_shard_without_it(tmp_path: Path) -> None:
    # guards: checkpoints._check_shards (index entries no shard holds)
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    save_file({"x": torch.ones(2)}, str(folder / a))
    save_file({"z": torch.ones(3)}, str(folder / b))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": a, "z": b, "ghost": a}}))
    (entry,) = discover(tmp_path)
    with pytest.raises(CheckpointError, match=r"lists tensors that no shard holds: 'ghost'"):
        open_checkpoint(entry)


def test_hf_index_shard_name_too_long(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model-00001-of-00001.safetensors"))
    index = {"weight_map": {"w": "x" * 300 + ".safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard index"):
        discover(tmp_path)


# -------------------------------------------------- symlinks and foreign bytes (issue 11)


def test_symlinked_shard_outside_its_folder_is_exit_4_naming_the_link(tmp_path: Path) -> None:
    # guards: discover._refuse_outside_link
    from tests.test_checkpoints_torchscan import cmdtool, one_line_error

    secret = tmp_path / "elsewhere" / "credentials.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"SECRET-TOKEN-1234 aws_secret_access_key=abcd\n" * 8)
    source, store = tmp_path / "run", tmp_path / "store.zarr"
    folder = source / "checkpoint-1"
    folder.mkdir(parents=True)
    shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"x": torch.ones(2)}, str(folder / shard1))
    (folder / shard2).symlink_to(secret)
    index = {"weight_map": {"x": shard1, "z": shard2}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    r = cmdtool("ingest", source, store)
    assert r.returncode == 4, r.stderr
    message = one_line_error(r)
    link = folder / shard2
    assert f"{link} is a symbolic link to a file outside its checkpoint folder" in message
    assert "SECRET" not in r.stderr and "credentials" not in r.stderr
    assert not store.exists()

    # a link that stays inside the folder is an ordinary shard
    (folder / shard2).unlink()
    save_file({"z": torch.full((3,), 7.0)}, str(folder / "real.safetensors"))
    (folder / shard2).symlink_to(folder / "real.safetensors")
    (entry,) = discover(source)
    with open_checkpoint(entry) as ckpt:
        assert ckpt["z"].tolist() == [7.0, 7.0, 7.0]


def test_non_checkpoint_files_never_show_their_bytes(tmp_path: Path) -> None:
    # guards: safetensors._read_safetensors_header (no header length, no codec text)
    secret = b"SECRET-TOKEN-1234 root:x:0:0:/root:/bin/sh\n" * 8
    length = str(int.from_bytes(secret[:8], "little"))
    for i, (name, content) in enumerate(
        (
            ("epoch_1.safetensors", secret),
            ("epoch_1.safetensors", (8).to_bytes(8, "little") + b"\xffSECRET!"),
            ("epoch_1.pt", secret),
        )
    ):
        run = tmp_path / str(i)
        run.mkdir()
        (run / name).write_bytes(content)
        (entry,) = discover(run)
        with pytest.raises(CheckpointError) as info:  # the CLI prints this one line
            open_checkpoint(entry)
        message = str(info.value)
        assert "SECRET" not in message and length not in message and "0xff" not in message
