"""Tied tensors (two names, one storage) are stored once and written back under both
names (issue 13, item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import zarr
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from cmdtool.checkpoints import discover, open_checkpoint
from cmdtool.checkpoints.tied import find_aliases
from cmdtool.cli import app
from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from cmdtool.reconstruction import reconstruct
from tests.conftest import tree_digest
from tests.trainer_layouts import assert_rows_equal


def gpt2_like(seed: int) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict as ``torch.save(model.state_dict())`` writes it: ``lm_head.weight``
    is the very tensor ``transformer.wte.weight`` (tied embeddings)."""
    g = torch.Generator().manual_seed(seed)
    wte = torch.randn(16, 4, generator=g)
    return {
        "transformer.wte.weight": wte,
        "transformer.wpe.weight": torch.randn(8, 4, generator=g),
        "transformer.h.0.attn.c_attn.weight": torch.randn(4, 12, generator=g),
        "transformer.h.0.attn.bias": torch.tril(torch.ones(1, 1, 8, 8)).bool(),
        "transformer.ln_f.weight": torch.randn(4, generator=g),
        "lm_head.weight": wte,
    }


def write_run(folder: Path, epochs: int = 5) -> list[dict[str, torch.Tensor]]:
    folder.mkdir(parents=True)
    sds = [gpt2_like(s) for s in range(epochs)]
    for e, sd in enumerate(sds, start=1):
        torch.save(sd, folder / f"epoch_{e}.pt")
    return sds


def test_find_aliases(tmp_path: Path) -> None:
    sd = gpt2_like(0)
    sd["half_view"] = sd["transformer.wpe.weight"][:4]  # a view of part: not tied
    sd["same_again"] = sd["transformer.wpe.weight"]
    torch.save(sd, tmp_path / "epoch_1.pt")
    (entry,) = discover(tmp_path)
    with open_checkpoint(entry) as ckpt:
        assert find_aliases(entry, ckpt) == {
            "lm_head.weight": "transformer.wte.weight",
            "same_again": "transformer.wpe.weight",
        }
        assert find_aliases(entry, ckpt, keep=lambda n: n != "transformer.wte.weight") == {
            "same_again": "transformer.wpe.weight"
        }


def test_tied_pt_run_stored_once_rebuilt_under_both_names(tmp_path: Path) -> None:
    sds = write_run(tmp_path / "run")
    summary = ingest(tmp_path / "run", tmp_path / "s.zarr")
    untied = sum(t.numel() for n, t in sds[0].items() if t.is_floating_point())
    assert summary.n_params == untied - 16 * 4  # lm_head.weight is not stored again
    meta = zarr.open_group(tmp_path / "s.zarr", mode="r").attrs["cmdtool"]
    assert meta["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert [p["name"] for p in meta["params"]] == [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.ln_f.weight",
    ]
    expected = {
        e: {k: v for k, v in sd.items() if k != "lm_head.weight"} for e, sd in enumerate(sds, 1)
    }
    assert_rows_equal(tmp_path / "s.zarr", expected)

    # .pt: both names, one storage again, values as the source
    pt = reconstruct(tmp_path / "s.zarr", tmp_path / "pt", epochs="all", raw=True, fmt="pt")
    for path, sd in zip(pt.files, sds, strict=True):
        back = torch.load(path, weights_only=True)
        assert sorted(back) == sorted(sd)  # (key order: issue 13 item 5)
        assert back["lm_head.weight"].untyped_storage().data_ptr() == (
            back["transformer.wte.weight"].untyped_storage().data_ptr()
        )
        for name, value in sd.items():
            assert torch.equal(back[name], value), name
    # safetensors: both names (a copy each: the format cannot share), format pt
    st = reconstruct(tmp_path / "s.zarr", tmp_path / "st", epochs="last", raw=True)
    back = load_file(st.files[0])
    assert torch.equal(back["lm_head.weight"], sds[-1]["transformer.wte.weight"])
    with safe_open(st.files[0], framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    # a model rebuild keeps them tied too
    CMD(n_modes=2, n_samples=40).fit(tmp_path / "s.zarr")
    rebuilt = reconstruct(tmp_path / "s.zarr", tmp_path / "cmd", fmt="pt")
    back = torch.load(rebuilt.files[0], weights_only=True)
    assert back["lm_head.weight"] is not None
    assert back["lm_head.weight"].untyped_storage().data_ptr() == (
        back["transformer.wte.weight"].untyped_storage().data_ptr()
    )


def test_tie_broken_in_a_later_epoch_is_refused(tmp_path: Path) -> None:
    sds = write_run(tmp_path / "run", epochs=3)
    ingest(tmp_path / "run", tmp_path / "s.zarr")
    before = tree_digest(tmp_path / "s.zarr")
    untied = dict(sds[0])
    untied["lm_head.weight"] = untied["lm_head.weight"].clone()
    torch.save(untied, tmp_path / "run" / "epoch_4.pt")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "run"), str(tmp_path / "s.zarr")])
    assert result.exit_code == 5, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "epoch_4.pt: 'lm_head.weight' is not tied to 'transformer.wte.weight'" in lines[0]
    assert tree_digest(tmp_path / "s.zarr") == before


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_tied_names_follow_a_wrapper_prefix(tmp_path: Path, prefix: str) -> None:
    sds = write_run(tmp_path / "run", epochs=3)
    wrapped = {prefix + k: v for k, v in gpt2_like(7).items()}
    torch.save(wrapped, tmp_path / "run" / "epoch_4.pt")
    ingest(tmp_path / "run", tmp_path / "s.zarr")
    out = reconstruct(tmp_path / "s.zarr", tmp_path / "out", epochs="4", raw=True, fmt="pt")
    back = torch.load(out.files[0], weights_only=True)
    assert sorted(back) == sorted(wrapped)
    assert torch.equal(back[prefix + "lm_head.weight"], wrapped[prefix + "transformer.wte.weight"])
    meta = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]["cmdtool"]
    assert meta["epochs"][3]["renamed"]["lm_head.weight"] == prefix + "lm_head.weight"
    assert len(sds) == 3
