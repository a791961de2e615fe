"""Torch files say what they hold (issue 11, item 3): every storage the pickle claims must
match the bytes behind it, the tensors of a file are counted before torch builds them, and
the unsafe-globals report comes from one load. Crafted files are real zip / legacy files
written here; the console script's ``main()`` is run as a user would, in a process of its
own (:func:`tests.conftest.run_cli`)."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cmdtool.checkpoints import discover, open_checkpoint
from cmdtool.checkpoints.limits import ReadLimits
from cmdtool.checkpoints.torchscan import ScanError, scan_pickle
from cmdtool.errors import CheckpointError, UnsafeCheckpointError
from tests.conftest import run_cli


def cmdtool(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``cmdtool ARGS`` in a process of its own, as a user runs it (wide terminal: one-line
    errors)."""
    env = {**os.environ, "COLUMNS": "250"}
    return run_cli(*map(str, args), env=env, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    message = r.stderr.strip()
    assert message.startswith("error:") and len(message.splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return message


def open_one(folder: Path, **limits: object) -> dict[str, torch.Tensor]:
    (entry,) = discover(folder)
    with open_checkpoint(entry, limits=ReadLimits(**limits)) as ckpt:  # type: ignore[arg-type]
        return {name: ckpt[name].clone() for name in ckpt}


def data_pkl(path: Path) -> tuple[zipfile.ZipInfo, bytes]:
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
        return info, archive.read(info)


def patch_pickle(path: Path, old: bytes, new: bytes) -> None:
    """Replace bytes of a torch zip's data.pkl in place (same length) and fix its CRC-32 in
    the local header and the central directory, so that only the claim is wrong."""
    assert len(old) == len(new)
    info, pkl = data_pkl(path)
    assert pkl.count(old) == 1, "the pattern must occur once"
    patched = pkl.replace(old, new)
    data = path.read_bytes()
    crc_old, crc_new = struct.pack("<I", info.CRC), struct.pack("<I", zlib.crc32(patched))
    assert data.count(crc_old) == 2  # local header and central directory
    path.write_bytes(data.replace(pkl, patched).replace(crc_old, crc_new))


# ------------------------------------------------------------- zip storage claims


def test_zip_storage_claiming_more_than_its_record_is_exit_4_naming_tensor_and_sizes(
    tmp_path: Path,
) -> None:
    # guards: torchscan.check_zip_storages (record size == claimed bytes)
    run, store = tmp_path / "run", tmp_path / "store.zarr"
    run.mkdir()
    path = run / "epoch_1.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    # the file: the pickle claims a storage of 64 floats and a tensor of 64 of them,
    # the record holds 4; torch.load then reads 60 floats of the zip's own bytes
    patch_pickle(path, b"cpuq\x06K\x04t", b"cpuq\x06K@t")  # storage numel 4 -> 64
    patch_pickle(path, b"K\x00K\x04\x85", b"K\x00K@\x85")  # size (4,) -> (64,)
    leaked = torch.load(path, weights_only=True, mmap=True)["w"]  # what torch alone does
    assert leaked.shape == (64,) and leaked[:4].tolist() == [0, 1, 2, 3]

    r = cmdtool("ingest", run, store)
    assert r.returncode == 4, r.stderr
    message = one_line_error(r)
    assert "tensor 'w'" in message and str(path) in message
    assert "claims 64 float32 elements (256 bytes)" in message
    assert "'epoch_1/data/0' holds 16 bytes" in message
    assert not store.exists()


def test_zip_storage_claiming_less_than_its_record_or_a_missing_record(tmp_path: Path) -> None:
    # guards: torchscan.check_zip_storages (exact size, record present)
    path = tmp_path / "epoch_1.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    patch_pickle(path, b"cpuq\x06K\x04t", b"cpuq\x06K\x02t")  # claims 2 of 4 floats
    with pytest.raises(CheckpointError, match=r"claims 2 float32 elements \(8 bytes\) but"):
        open_one(tmp_path)
    torch.save({"w": torch.arange(4.0)}, path)
    patch_pickle(path, b"X\x01\x00\x00\x000q", b"X\x01\x00\x00\x007q")  # key '0' -> '7'
    with pytest.raises(CheckpointError, match=r"record 'epoch_1/data/7', which the archive lacks"):
        open_one(tmp_path)


def test_views_and_shared_storages_keep_loading(tmp_path: Path) -> None:
    """What torch.save writes for views: the whole storage, each tensor its part."""
    base = torch.arange(24.0)
    tensors = {
        "a": base[2:10],  # a slice of a larger storage
        "b": base.reshape(4, 6).t(),  # a transpose: non-contiguous, no overlap
        "c": base.reshape(4, 6)[:, ::2],  # a strided slice
        "tied": base,  # the same storage again
        "h": torch.arange(6, dtype=torch.float16).reshape(2, 3),
    }
    torch.save(tensors, tmp_path / "epoch_1.pt")
    loaded = open_one(tmp_path)
    expect = np.arange(24.0)
    np.testing.assert_array_equal(loaded["a"].numpy(), expect[2:10])
    np.testing.assert_array_equal(loaded["b"].numpy(), expect.reshape(4, 6).T)
    np.testing.assert_array_equal(loaded["c"].numpy(), expect.reshape(4, 6)[:, ::2])
    np.testing.assert_array_equal(loaded["tied"].numpy(), expect)
    np.testing.assert_array_equal(loaded["h"].numpy(), np.arange(6.0).reshape(2, 3))


# ---------------------------------------------------------- legacy storage claims


def legacy(path: Path, tensors: dict[str, torch.Tensor]) -> bytes:
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


def test_legacy_claims_must_match_the_data_section(tmp_path: Path) -> None:
    # guards: torchscan.check_legacy_storages
    path = tmp_path / "epoch_1.pt"
    data = legacy(path, {"w": torch.arange(4.0), "v": torch.ones(3, dtype=torch.float64)})
    assert open_one(tmp_path)["w"].tolist() == [0, 1, 2, 3]
    # the pickle claims 2**40 floats for 'w' (torch would allocate 4 TiB before reading)
    at = data.index(b"cpuq")
    numel = data.index(b"K\x04", at)
    claimed = data[:numel] + b"\x8a\x06" + (2**40).to_bytes(6, "little") + data[numel + 2 :]
    path.write_bytes(claimed)
    with pytest.raises(CheckpointError) as info:
        open_one(tmp_path)
    assert "tensor 'w': the pickle claims 1,099,511,627,776 float32 elements" in str(info.value)
    assert "its data holds 4 elements" in str(info.value)

    path.write_bytes(data[:-5])  # the last storage cut short
    with pytest.raises(CheckpointError, match="the file ends 5 bytes before its data does"):
        open_one(tmp_path)
    path.write_bytes(data + b"\0" * 3)
    with pytest.raises(CheckpointError, match="3 bytes follow the last storage's data"):
        open_one(tmp_path)


def test_non_torch_files_are_refused_without_quoting_them(tmp_path: Path) -> None:
    # guards: torchscan._legacy_header (magic number), torchfile._is_torch_archive
    secret = b"SECRET-TOKEN-1234 root:x:0:0:/root:/bin/sh\n" * 4
    path = tmp_path / "epoch_1.pt"
    plain_pickle = pickle.dumps(["SECRET-TOKEN-1234", 7], protocol=2)  # no magic number
    for content in (secret, b"\x80\x02" + secret, b"garbage", plain_pickle):
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            open_one(tmp_path)
        assert "not a torch checkpoint" in str(info.value)
        assert not isinstance(info.value, UnsafeCheckpointError)
        assert "SECRET" not in str(info.value) and "'S'" not in str(info.value)
    with zipfile.ZipFile(path, "w") as archive:  # a zip, but not torch's
        archive.writestr("secret-notes/SECRET-name.txt", secret)
    with pytest.raises(CheckpointError, match="not a torch checkpoint") as info:
        open_one(tmp_path)
    assert "SECRET" not in str(info.value)


# ------------------------------------------------------------ tensors per file


def many_tensors_pickle(n: int) -> bytes:
    """A weights-only pickle of ``n`` one-float tensors named t0000000... that all view
    storage '0' (as a file of many tiny tensors, written fast)."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw

    pid = b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu")
    pid += b"J" + struct.pack("<i", n) + b"tq\x02"
    rest = b"(h\x02QJ\x00\x00\x00\x00K\x01\x85K\x01\x85\x89h\x03)RtR"
    first = text("t0000000") + b"ctorch._utils\n_rebuild_tensor_v2\nq\x01(" + pid
    first += b"QJ\x00\x00\x00\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\nq\x03)RtR"
    names = [b"X\x08\x00\x00\x00t%07d" % i for i in range(1, n)]
    body = [first] + [name + b"h\x01" + rest for name in names]
    batches = [b"(" + b"".join(body[i : i + 1000]) + b"u" for i in range(0, n, 1000)]
    return b"\x80\x02}q\x00" + b"".join(batches) + b"."


def write_torch_zip(path: Path, pkl: bytes, data: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", data)
        archive.writestr("archive/version", "3\n")


def test_the_crafted_zip_is_what_torch_reads(tmp_path: Path) -> None:
    """The generator above writes a file torch loads (so the refusal below is cmdtool's)."""
    write_torch_zip(tmp_path / "epoch_1.pt", many_tensors_pickle(5), bytes(20))
    loaded = open_one(tmp_path)
    assert list(loaded) == ["t0000000", "t0000001", "t0000002", "t0000003", "t0000004"]
    assert all(t.tolist() == [0.0] for t in loaded.values())
    with pytest.raises(CheckpointError, match="it holds more tensors than --max-tensors 4 allows"):
        open_one(tmp_path, max_tensors=4)


def test_a_file_of_a_million_tiny_tensors_is_refused_fast(tmp_path: Path) -> None:
    # guards: torchscan.Scanner.reduce (counts rebuilds, stops past max_tensors)
    run, store = tmp_path / "run", tmp_path / "store.zarr"
    run.mkdir()
    n = 1_000_000
    write_torch_zip(run / "epoch_1.pt", many_tensors_pickle(n), bytes(4 * n))
    t0 = time.perf_counter()
    r = cmdtool("ingest", run, store, timeout=120)  # torch alone: minutes, then a huge store
    seconds = time.perf_counter() - t0
    assert r.returncode == 4, r.stderr
    message = one_line_error(r)
    assert "holds more tensors than --max-tensors 100,000 allows" in message
    assert not store.exists()
    print(f"refused in {seconds:.1f} s")


def test_safetensors_tensor_count_is_bounded_before_parsing(tmp_path: Path) -> None:
    # guards: safetensors._read_safetensors_header (count before json.loads)
    from safetensors.torch import save_file

    save_file(
        {f"t{i}": torch.full((1,), float(i)) for i in range(30)}, tmp_path / "e_1.safetensors"
    )
    loaded = open_one(tmp_path, max_tensors=30)
    assert sorted(float(t) for t in loaded.values()) == [float(i) for i in range(30)]
    with pytest.raises(CheckpointError, match="holds more tensors than --max-tensors 29 allows"):
        open_one(tmp_path, max_tensors=29)


# ---------------------------------------------------------- unsafe globals, one load


def _globals(n: int) -> dict[str, object]:
    """``n`` instances of distinct classes of this module (each an unsafe global)."""
    objs = {}
    for i in range(n):
        name = f"Unsafe{i:02d}"
        cls = globals().get(name) or type(name, (), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls
        objs[f"g{i}"] = cls()
    return objs


def test_legacy_file_naming_64_globals_is_reported_from_one_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # guards: torchfile._needed_globals (named=scan.globals: one trial load, not one per global)
    path = tmp_path / "epoch_1.pt"
    weights = torch.arange(500_000, dtype=torch.float32)  # a 2 MB file, as in the issue
    torch.save({"w": weights, "cfg": _globals(64)}, path, _use_new_zipfile_serialization=False)
    expected = sorted(f"{__name__}.Unsafe{i:02d}" for i in range(64))

    loads = []
    real_load = torch.load

    def counting_load(*args: object, **kwargs: object) -> object:
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", counting_load)
    with pytest.raises(UnsafeCheckpointError) as info:
        open_one(tmp_path)
    assert ", ".join(expected) in str(info.value)
    assert len(loads) <= 2 and all(w is True for w in loads)  # the refusal, one trial

    monkeypatch.setattr(torch, "load", real_load)
    (entry,) = discover(tmp_path)
    with open_checkpoint(entry, allow_globals=expected) as ckpt:  # the report was right
        assert torch.equal(ckpt["w"], weights)


# ------------------------------------------------------------------ the scanner


def test_scan_follows_real_pickles_and_stops_at_what_torch_refuses(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(2, 3), "p": torch.nn.Parameter(torch.ones(5))}, path)
    _, pkl = data_pkl(path)
    scan = scan_pickle(pkl)
    claims = sorted((c.tensor, c.numel, str(c.dtype)) for c in scan.claims.values())
    assert claims == [("a", 6, "torch.float32"), ("p", 5, "torch.float32")]
    assert scan.n_tensors == 2 and scan.end == len(pkl)
    assert "torch._utils._rebuild_tensor_v2" in scan.globals
    for bad in (
        pkl[:-1],
        pkl[: len(pkl) // 2],
        b"\x80\x04\x95" + pkl[2:],
        b"cos\nsystem\n(S'ls'\ntR.",
    ):
        with pytest.raises(ScanError):
            scan_pickle(bad)


def test_a_normal_torch_run_still_ingests_exactly(tmp_path: Path) -> None:
    """Plain torch files (zip and legacy) pass the checks; values exact."""
    from cmdtool.ingestion import ingest

    run, store = tmp_path / "run", tmp_path / "store.zarr"
    run.mkdir()
    rng = np.random.default_rng(0)
    values = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    for k, v in enumerate(values, start=1):
        sd = {"fc.weight": torch.from_numpy(v), "fc.bias": torch.zeros(3)}
        torch.save(sd, run / f"e_{k}.pt", _use_new_zipfile_serialization=k != 2)
    assert ingest(run, store, readers=0).added == [1, 2, 3]
    group = zarr.open_group(store, mode="r")
    offsets = {p["name"]: p["offset"] for p in group.attrs["cmdtool"]["params"]}
    for row, v in enumerate(values):
        start = offsets["fc.weight"]
        np.testing.assert_array_equal(group["weights"][row, start : start + 12], v.reshape(-1))
