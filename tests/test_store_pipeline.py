"""The codec pipeline (``cmdtool/store/pipeline.py``): zarrs reads ``weights``' column
blocks, bit-identical to zarr-python both ways, with integrity whole and a fallback that
never gives other numbers."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.storage

from cmdtool.errors import StoreError
from cmdtool.store import pipeline
from cmdtool.store.integrity import WRITE_CONFIG
from cmdtool.store.layout import EpochInfo, ParamInfo
from cmdtool.store.trajectory import TrajectoryStore
from tests.conftest import run_cli

zarrs = pytest.importorskip("zarrs")

N, T, CHUNK = 2500, 6, 1024  # three chunk columns, the last one partial


def _values(seed: int = 0) -> np.ndarray:
    """(T, N) float32 of arbitrary bit patterns (NaN payloads, -0.0, subnormals, inf),
    one row all zeros (a chunk equal to the fill value must still be written)."""
    bits = np.random.default_rng(seed).integers(0, 2**32, size=(T, N), dtype=np.uint64)
    v = bits.astype(np.uint32).view(np.float32)
    v[2] = 0.0
    return v


def _epoch(t: int) -> EpochInfo:
    return EpochInfo(label=t, source=f"e{t}", kind="safetensors", size=0, mtime_ns=0, sha256="")


def _store(path: Path, values: np.ndarray, *, zarrs_rows: bool = False) -> Path:
    """A cmdtool store holding ``values``; its rows written by zarr-python (cmdtool's own
    append) or, with ``zarrs_rows``, by an array on the zarrs pipeline."""
    st = TrajectoryStore.create(path, [ParamInfo("w", (N,), "float32", 0)], chunk=CHUNK)
    for t in range(values.shape[0]):
        if zarrs_rows:
            row = st.begin_epoch()
            with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
                arr = zarr.open_array(zarr.storage.LocalStore(path), path="weights", mode="r+")
            assert type(arr._async_array.codec_pipeline).__module__.startswith("zarrs")
            arr.with_config(WRITE_CONFIG)[row, :] = values[t]
            st.commit_epoch(_epoch(t))
        else:
            st.append_epoch([(0, values[t])], _epoch(t))
    st.close()
    return path


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(pipeline.ENV, raising=False)
    pipeline.reset()
    yield
    pipeline.reset()


def _read_all(path: Path) -> tuple[np.ndarray, bool]:
    """Every column block of every row through ``read_block``; whether zarrs read them."""
    with TrajectoryStore.open(path) as st:
        rows = np.arange(st.n_epochs)
        got = np.concatenate([st.read_block(rows, a, b) for a, b in st.column_blocks()], axis=1)
        return got, pipeline.reader_for(st) is not None


def test_zarr_python_written_store_reads_bit_identical_through_zarrs(tmp_path: Path) -> None:
    values = _values()
    path = _store(tmp_path / "s", values)
    got, used = _read_all(path)
    assert used and pipeline.choice()[0] == "zarrs"
    assert np.array_equal(got.view(np.uint32), values.view(np.uint32))
    # a column block across a chunk boundary and a sub-range of rows
    with TrajectoryStore.open(path) as st:
        part = st.read_block(np.arange(1, 5), 1000, 2100)
    assert np.array_equal(part.view(np.uint32), values[1:5, 1000:2100].view(np.uint32))


def test_zarrs_written_store_reads_bit_identical_with_plain_zarr_python(tmp_path: Path) -> None:
    values = _values(1)
    path = _store(tmp_path / "s", values, zarrs_rows=True)
    # every chunk written, the all-zero row too (format v2's missing-chunk rule)
    assert all((path / f"weights/c/{t}/{j}").is_file() for t in range(T) for j in range(3))
    plain = zarr.open_array(zarr.storage.LocalStore(path), path="weights", mode="r")
    assert type(plain._async_array.codec_pipeline).__module__.startswith("zarr.")
    assert np.array_equal(np.asarray(plain[:]).view(np.uint32), values.view(np.uint32))
    # and cmdtool's own checked reads (zarrs and zarr-python) agree with the source
    got, _ = _read_all(path)
    assert np.array_equal(got.view(np.uint32), values.view(np.uint32))


@pytest.mark.parametrize("damage", ["missing", "flipped", "truncated"])
def test_damage_read_through_zarrs_is_the_checked_store_error(tmp_path: Path, damage: str) -> None:
    values = _values(2)
    values[2] = 1.0  # no zero row here: a missing chunk must not read as zeros
    path = _store(tmp_path / "s", values)
    chunk = path / "weights/c/3/1"
    if damage == "missing":
        chunk.unlink()
    elif damage == "flipped":
        raw = bytearray(chunk.read_bytes())
        raw[17] ^= 0x10
        chunk.write_bytes(bytes(raw))
    else:
        chunk.write_bytes(chunk.read_bytes()[:-8])
    with TrajectoryStore.open(path) as st, pytest.raises(StoreError) as err:
        st.read_block(np.arange(T), CHUNK, 2 * CHUNK)
    msg = str(err.value)
    assert "chunk (3, 1) of 'weights'" in msg and "epoch 3" in msg
    assert {"missing": "is missing", "flipped": "crc32c", "truncated": "bytes"}[damage] in msg
    assert pipeline.choice()[0] == "zarrs"  # damage is not a zarrs failure


def test_missing_zarrs_falls_back_with_one_notice(tmp_path: Path, monkeypatch, capsys) -> None:
    values = _values(3)
    path = _store(tmp_path / "s", values)
    monkeypatch.setitem(sys.modules, "zarrs", None)  # "import zarrs" raises ImportError
    got, used = _read_all(path)
    got2, _ = _read_all(path)
    assert not used and pipeline.choice()[0] == "zarr-python"
    assert np.array_equal(got.view(np.uint32), values.view(np.uint32))
    assert np.array_equal(got2.view(np.uint32), values.view(np.uint32))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "zarrs is not available" in err[0], err


def test_zarrs_giving_other_numbers_is_switched_off(tmp_path: Path, monkeypatch, capsys) -> None:
    """A broken zarrs that decodes wrong values: the first block's check catches it."""
    values = _values(4)
    path = _store(tmp_path / "s", values)
    real = zarrs.ZarrsCodecPipeline

    class Wrong(real):  # type: ignore[misc, valid-type]
        async def read(self, batch_info, out, drop_axes=()):  # type: ignore[no-untyped-def]
            await super().read(batch_info, out, drop_axes)
            bits = out.as_ndarray_like().view(np.uint32)
            bits ^= np.uint32(1)  # the last mantissa bit of every value

    monkeypatch.setitem(sys.modules, "zarrs", types.SimpleNamespace(ZarrsCodecPipeline=Wrong))
    got, used = _read_all(path)
    assert not used and pipeline.choice()[0] == "zarr-python"
    assert np.array_equal(got.view(np.uint32), values.view(np.uint32))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "other values" in err[0], err


def test_env_selects_zarr_python_silently(tmp_path: Path, monkeypatch, capsys) -> None:
    values = _values(5)
    path = _store(tmp_path / "s", values)
    monkeypatch.setenv(pipeline.ENV, "zarr-python")
    got, used = _read_all(path)
    assert not used and np.array_equal(got.view(np.uint32), values.view(np.uint32))
    assert capsys.readouterr().err == ""


def test_info_json_names_the_pipeline(tmp_path: Path) -> None:
    path = _store(tmp_path / "s", _values(6))
    for env, reads in (("auto", "zarrs"), ("zarr-python", "zarr-python")):
        # a process of its own (the fork server's child: the choice is made at the first
        # read, from the child's environment, not at import)
        r = run_cli("info", path, "--json", env={**os.environ, pipeline.ENV: env}, timeout=120)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)["codec_pipeline"]
        assert got["reads"] == reads and got["writes"] == "zarr-python"
