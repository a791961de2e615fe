"""What one checkpoint may make cmdtool store (issue 11, item 3): stride-0 (expanded) and
overlapping views are refused unless --allow-expanded, and the logical size of a checkpoint
is bounded by --max-params. Real files, the console script as a user runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cmdtool.checkpoints import discover, open_checkpoint
from cmdtool.checkpoints.limits import (
    DEFAULT_MAX_PARAMS,
    DEFAULT_MAX_TENSORS,
    ReadLimits,
    overlaps,
)
from cmdtool.errors import CheckpointError, UsageError
from cmdtool.ingestion import ingest
from tests.test_checkpoints_torchscan import cmdtool, one_line_error


def open_one(folder: Path, **limits: object) -> dict[str, torch.Tensor]:
    (entry,) = discover(folder)
    with open_checkpoint(entry, limits=ReadLimits(**limits)) as ckpt:  # type: ignore[arg-type]
        return {name: ckpt[name].clone() for name in ckpt}


def test_expanded_tensors_are_refused_unless_allowed_and_bounded(tmp_path: Path) -> None:
    # guards: limits.check_layout (stride 0), reader._check_size (--max-params)
    run, store = tmp_path / "run", tmp_path / "store.zarr"
    run.mkdir()
    for k in (1, 2, 3):  # 3 files of ~1.8 kB, each a 1000 x 1000 "tensor" of one float
        sd = {"w": torch.full((1,), float(k)).expand(1000, 1000), "b": torch.arange(3.0) * k}
        torch.save(sd, run / f"epoch_{k}.pt")
    assert sum(f.stat().st_size for f in run.iterdir()) < 6000

    r = cmdtool("ingest", run, store)
    assert r.returncode == 4, r.stderr
    message = one_line_error(r)
    assert "tensor 'w'" in message and "expanded or overlapping view" in message
    assert "strides (0, 0)" in message
    assert "1,000,000 elements, of which the file stores 1" in message
    assert "--allow-expanded" in message
    assert not store.exists()

    with pytest.raises(CheckpointError, match="1,000,003 elements in all, more than --max-params"):
        ingest(run, store, allow_expanded=True, max_params=1000)
    assert not store.exists()

    ingest(run, store, allow_expanded=True)
    group = zarr.open_group(store, mode="r")
    params = {p["name"]: p["offset"] for p in group.attrs["cmdtool"]["params"]}
    for row, k in enumerate((1, 2, 3)):
        w = group["weights"][row, params["w"] : params["w"] + 1_000_000]
        np.testing.assert_array_equal(w, np.full(1_000_000, float(k), dtype=np.float32))
        b = group["weights"][row, params["b"] : params["b"] + 3]
        np.testing.assert_array_equal(b, np.array([0.0, 1.0, 2.0]) * k)


def test_overlapping_views_are_refused_unless_allowed(tmp_path: Path) -> None:
    # guards: limits.overlaps (strides that share elements)
    base = torch.arange(5.0)
    torch.save({"win": base.as_strided((3, 3), (1, 1))}, tmp_path / "epoch_1.pt")
    with pytest.raises(CheckpointError, match=r"'win'.*strides \(1, 1\).*stores 5"):
        open_one(tmp_path)
    loaded = open_one(tmp_path, allow_expanded=True)
    windows = np.lib.stride_tricks.sliding_window_view(np.arange(5.0), 3)  # rows 0-2, 1-3, 2-4
    np.testing.assert_array_equal(loaded["win"].numpy(), windows)


@pytest.mark.parametrize(
    ("shape", "strides", "overlap"),
    [
        ((4, 6), (6, 1), False),  # contiguous
        ((6, 4), (1, 6), False),  # transposed
        ((4, 3), (6, 2), False),  # every other column
        ((5,), (0,), True),  # expanded
        ((1, 5), (0, 1), False),  # stride 0 on a dimension of size 1 holds nothing twice
        ((3, 3), (1, 1), True),  # sliding windows
        ((2, 2, 2), (4, 1, 2), False),  # permuted
        ((2, 3), (3, 2), True),  # offsets 0 2 4 3 5 7: no repeat, reported (documented)
    ],
)
def test_overlaps_matches_the_offsets(
    shape: tuple[int, ...], strides: tuple[int, ...], overlap: bool
) -> None:
    offsets = np.zeros((), dtype=np.int64)
    for size, stride in zip(shape, strides, strict=True):
        offsets = offsets[..., None] + stride * np.arange(size)
    repeats = len(np.unique(offsets)) < offsets.size
    assert overlaps(shape, strides) == overlap
    assert repeats <= overlap  # never misses a real overlap


def test_bad_limits_are_exit_2_before_anything_happens(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"w": torch.ones(2)}, run / "epoch_1.pt")
    with pytest.raises(UsageError, match="--max-params 0 is invalid") as info:
        ingest(run, tmp_path / "s.zarr", max_params=0)
    assert info.value.exit_code == 2
    with pytest.raises(UsageError, match="--max-tensors -1 is invalid"):
        ingest(run, tmp_path / "s.zarr", max_tensors=-1)
    with pytest.raises(UsageError):
        ReadLimits(max_params=1.5)  # type: ignore[arg-type]
    assert not (tmp_path / "s.zarr").exists()


def test_cli_defaults_are_the_library_defaults() -> None:
    from cmdtool.cli import store_commands

    assert store_commands.DEFAULT_MAX_PARAMS == DEFAULT_MAX_PARAMS == 2**34
    assert store_commands.DEFAULT_MAX_TENSORS == DEFAULT_MAX_TENSORS == 100_000
