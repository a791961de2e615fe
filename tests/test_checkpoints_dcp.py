"""torch.distributed.checkpoint folders: read safely, streamed tensor by tensor (issue 13,
item 2). Checkpoints are written by ``torch.distributed.checkpoint.save`` itself."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cmdtool.checkpoints import discover, open_checkpoint
from cmdtool.checkpoints.dcp import DCPReader
from cmdtool.cli import app
from cmdtool.errors import CheckpointError, UnsafeCheckpointError
from cmdtool.ingestion import ingest
from tests.conftest import tree_digest
from tests.trainer_layouts import assert_rows_equal, write_dcp_run


def model_sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tok_embeddings.weight": torch.randn(12, 4, generator=g),
        "layers.0.attention.wq.weight": torch.randn(4, 4, generator=g),
        "layers.0.ffn_norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(4, generator=g).half(),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


class Evil:
    """Pickles as a call of os.system that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_dcp_run_of_six_epochs_ingests_without_options(tmp_path: Path) -> None:
    sds = [model_sd(s) for s in range(6)]
    write_dcp_run(tmp_path / "run", sds)
    entries = discover(tmp_path / "run")
    assert [(e.label, e.kind) for e in entries] == [(10 * e, "dcp") for e in range(1, 7)]
    with open_checkpoint(entries[2]) as ckpt:
        # only the model group: the optimizer's exp_avg and train_state are training state
        assert list(ckpt) == ["model." + k for k in sds[2]]
        assert ckpt.state_key == "model"
        assert ckpt.spec("model.norm.weight") == ((4,), torch.float16)
        for name, want in sds[2].items():
            got = ckpt["model." + name]
            assert got.dtype == want.dtype and torch.equal(got, want)
    summary = ingest(tmp_path / "run", tmp_path / "s.zarr")
    assert summary.added == [10, 20, 30, 40, 50, 60]
    assert summary.state_keys == {"model": 6}
    assert_rows_equal(tmp_path / "s.zarr", {10 * (i + 1): sd for i, sd in enumerate(sds)})


def test_dcp_flat_state_dict(tmp_path: Path) -> None:
    sds = [model_sd(s) for s in range(3)]
    folders = write_dcp_run(tmp_path / "run", sds, nested=False)
    reader = DCPReader(folders[0])
    assert reader.state_key is None and reader.names() == list(sds[0])
    assert all(torch.equal(reader.get(n), t) for n, t in sds[0].items())


def test_dcp_tensor_reads_only_its_byte_ranges(tmp_path: Path) -> None:
    """A tensor is read from its own byte range: the others may be garbage."""
    (folder,) = write_dcp_run(tmp_path / "run", [model_sd(1)], nested=False)
    reader = DCPReader(folder)
    meta = reader._live()
    keep = meta["norm.weight"].chunks[0]
    distcp = folder / keep.file
    data = bytearray(distcp.read_bytes())
    for name, tensor_meta in meta.items():
        if name != "norm.weight":
            c = tensor_meta.chunks[0]
            data[c.start : c.start + c.length] = b"\xff" * c.length
    distcp.write_bytes(bytes(data))
    assert torch.equal(reader.get("norm.weight"), model_sd(1)["norm.weight"])
    with pytest.raises(CheckpointError, match=r"'steps' in .*__0_0\.distcp \(bytes \d+\.\.\d+\)"):
        reader.get("steps")


def test_dcp_chunks_assembled(tmp_path: Path) -> None:
    """A tensor saved as two chunks (as a 2-rank FSDP run shards it) is put back together."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    folder = tmp_path / "run" / "step-3"
    folder.mkdir(parents=True)
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    pieces = [(0, full[:4]), (4, full[4:])]
    storage, chunks = {}, []
    for rank, (row, piece) in enumerate(pieces):
        path = folder / f"__{rank}_0.distcp"
        with path.open("wb") as fh:
            fh.write(b"x" * 7)  # chunks need not start at byte 0
            torch.save(piece.clone(), fh)
        offsets = torch.Size([row, 0])
        chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=piece.shape))
        storage[MetadataIndex("w", offsets)] = _StorageInfo(path.name, 7, path.stat().st_size - 7)
    meta = Metadata(
        state_dict_metadata={
            "w": TensorStorageMetadata(TensorProperties(dtype=torch.float32), full.shape, chunks)
        },
        planner_data={"w": ("w",)},
        storage_data=storage,
    )
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.distributed.checkpoint as dcp

        target = {"w": torch.zeros(6, 4)}
        dcp.load(target, checkpoint_id=str(folder), no_dist=True)  # torch agrees it is valid
    assert torch.equal(target["w"], full)
    assert torch.equal(DCPReader(folder).get("w"), full)
    # chunks that overlap or leave a hole are refused
    chunks[1].offsets = torch.Size([3, 0])
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match=r"is stored nowhere|overlap"):
        DCPReader(folder)


def test_malicious_metadata_executes_nothing(tmp_path: Path) -> None:
    sds = [model_sd(s) for s in range(3)]
    folders = write_dcp_run(tmp_path / "run", sds)
    marker = tmp_path / "pwned"
    evil = {"state_dict_metadata": Evil(marker)}
    (folders[1] / ".metadata").write_bytes(pickle.dumps(evil))
    with pytest.raises(UnsafeCheckpointError, match=r"names posix\.system"):
        DCPReader(folders[1])
    assert not marker.exists()
    # through the CLI: one line, exit 4, nothing run, no store left
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "run"), str(tmp_path / "s.zarr")])
    assert result.exit_code == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "step-20/.metadata" in lines[0] and "posix.system" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("garbage", "not a torch.distributed.checkpoint .metadata pickle"),
        ("not_metadata", "holds a dict, not a torch.distributed.checkpoint Metadata"),
        (
            "missing_distcp",
            "__0_0.distcp, which .metadata names for 'model.tok_embeddings.weight', is missing",
        ),
        ("outside", "not a file inside the checkpoint folder"),
        ("truncated", "(truncated?)"),
    ],
)
def test_bad_dcp_folders(tmp_path: Path, damage: str, says: str) -> None:
    sds = [model_sd(s) for s in range(3)]
    folders = write_dcp_run(tmp_path / "run", sds)
    ingest(tmp_path / "run", tmp_path / "s.zarr", pattern="step-[12]0")
    before = tree_digest(tmp_path / "s.zarr")
    bad = folders[2]
    if damage == "garbage":
        (bad / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    elif damage == "not_metadata":
        (bad / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    elif damage == "missing_distcp":
        (bad / "__0_0.distcp").unlink()
    elif damage == "outside":
        raw = (bad / ".metadata").read_bytes().replace(b"__0_0.distcp", b"../xx.distcp")
        (bad / ".metadata").write_bytes(raw)
    else:
        distcp = bad / "__0_0.distcp"
        distcp.write_bytes(distcp.read_bytes()[:2000])
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "run"), str(tmp_path / "s.zarr")])
    assert result.exit_code == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "step-30" in lines[0]
    assert tree_digest(tmp_path / "s.zarr") == before
    shutil.rmtree(tmp_path / "run")
