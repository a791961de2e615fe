"""Issue 11, the store part: checksums, no silent zeros, metadata validated on open,
``cmdtool verify`` and ``cmdtool upgrade`` (format v1 -> v2).

Stores are real zarr folders in tmp_path, damaged the way a careless or hostile user
would: a chunk file deleted, truncated or with a byte flipped, ``zarr.json`` attributes
edited, a label written with plain zarr. Where a user meets the damage it is checked
through the console script's ``main()`` in a process of its own (:func:`run_cli`): one
line on stderr, exit 6, the store untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from cmdtool.decomposition import CMD
from cmdtool.errors import StoreError
from cmdtool.ingestion import ingest
from cmdtool.store import TrajectoryStore
from cmdtool.store.cleanup import UPGRADE_OLD_PREFIX, UPGRADE_PREFIX
from tests.conftest import (
    n_modeled,
    one_line_error,
    planted,
    run_cli,
    state_dicts,
    tree_digest,
    write_run,
)

CHUNK = 1024  # N = 3224: rows of 4 chunks
EPOCHS = 6
ZERO_EPOCH = 4  # label of an epoch whose weights are all zero


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``cmdtool ARGS`` in a process of its own (wide terminal, so errors stay one line)."""
    return run_cli(*args, env={**os.environ, "COLUMNS": "250"})


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, np.ndarray, list[Any]]:
    """A 6-epoch store (chunk width 1024, epoch 4 all zeros) with decomposition 'cmd';
    returns (store, values float32 (T, N) in store order, params records)."""
    base = tmp_path_factory.mktemp("integrity")
    w, _, _ = planted(n_modeled(), EPOCHS, 3, seed=11)
    w[:, ZERO_EPOCH - 1] = 0.0
    write_run(base / "run", state_dicts(w))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("cmdtool.store.trajectory.CHUNK", CHUNK)
        ingest(base / "run", base / "store")
    CMD(3, n_samples=300).fit(base / "store")
    g = zarr.open_group(base / "store", mode="r")
    values = np.asarray(g["weights"][:])
    return base / "store", values, list(g.attrs["cmdtool"]["params"])


@pytest.fixture
def store(built, tmp_path) -> Path:
    """A fresh copy of the built store."""
    shutil.copytree(built[0], tmp_path / "s")
    return tmp_path / "s"


def _arrays(root: Path) -> dict[str, dict[str, Any]]:
    """Every array's zarr.json under root (relative folder -> parsed JSON)."""
    out = {}
    for meta in root.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc["node_type"] == "array":
            out[str(meta.parent.relative_to(root))] = doc
    return out


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# ----------------------------------------------------------------------- checksums
def test_every_array_is_checksummed_and_plain_zarr_checks_it(store):
    # guards: integrity.compressors()/WRITE_CONFIG used by every create_array
    arrays = _arrays(store)
    expected = {"weights", "pool", "pool_index", "extras"} | {
        f"cmd/{k}"
        for k in ("labels", "a", "b", "sum_w", "sum_w2", "sum_wr", "ref_index", "ref_traj")
    }
    assert expected <= set(arrays)
    for name, doc in arrays.items():
        codecs = [c["name"] for c in doc["codecs"]]
        assert codecs == ["bytes", "crc32c"], (name, codecs)
    # zeros are written too: every chunk of the all-zero epoch is a file
    row = ZERO_EPOCH - 1
    assert [(store / f"weights/c/{row}/{j}").is_file() for j in range(4)] == [True] * 4
    # a flipped byte: plain zarr (no cmdtool) refuses to read the chunk
    chunk = store / "weights/c/2/1"
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0x40
    chunk.write_bytes(bytes(raw))
    plain = zarr.open_array(store / "weights", mode="r")
    with pytest.raises(ValueError, match="checksum"):
        plain[2, :]


# ------------------------------------------------------------ damage is exit 6
def test_missing_weights_chunk_is_exit_6_never_zeros(store, tmp_path):
    # guards: CheckedLocalStore.chunk_problem's "is missing" (checksummed arrays)
    (store / "weights/c/2/1").unlink()
    before = tree_digest(store)
    out = tmp_path / "out"
    r = cli("reconstruct", store, out, "--raw", "--epochs", "all")
    one_line_error(r, 6, "chunk (2, 1) of 'weights'", "epoch 3", "is missing", starts="error:")
    assert not (out / "epoch_3.safetensors").exists()
    r = cli("decompose", store, "--modes", "3", "--samples", "300", "--name", "again")
    one_line_error(r, 6, "chunk (2, 1) of 'weights'", "is missing", starts="error:")
    assert tree_digest(store) == before


def test_missing_result_chunk_is_exit_6(store, tmp_path):
    (store / "cmd/a/c/2").unlink()
    before = tree_digest(store)
    r = cli("reconstruct", store, tmp_path / "out", "--epochs", "all")
    one_line_error(
        r, 6, "chunk (2,) of 'cmd/a'", "parameters 2048..3071", "is missing", starts="error:"
    )
    assert tree_digest(store) == before


@pytest.mark.parametrize(
    ("chunk", "read", "needle"),
    [
        ("pool/c/1/0", "pool", "chunk (1, 0) of 'pool'"),
        ("extras/c/5/0", "extras", "chunk (5, 0) of 'extras'"),
        ("cmd/labels/c/3", "labels", "chunk (3,) of 'cmd/labels'"),
    ],
)
def test_missing_chunk_of_any_array_is_a_store_error(store, chunk, read, needle):
    (store / chunk).unlink()
    with TrajectoryStore.open(store) as st:
        with pytest.raises(StoreError, match=r"is damaged: .*is missing") as exc:
            if read == "pool":
                st.read_pool(np.arange(EPOCHS))
            elif read == "extras":
                st.read_extras(5)
            else:
                CMD.load(st).labels_  # noqa: B018
        assert needle in str(exc.value)


def _copy(built, tmp_path: Path, name: str) -> Path:
    shutil.copytree(built[0], tmp_path / name)
    return tmp_path / name


def test_truncated_flipped_and_unreadable_results_are_exit_6(built, tmp_path):
    # guards: chunk_problem's size and crc checks; validate.unreadable_group; the
    # array-metadata check of validate_result (zarr's parse errors were exit 1)
    s1 = _copy(built, tmp_path, "s1")
    chunk = s1 / "weights/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[:1000])
    r = cli("reconstruct", s1, tmp_path / "o1", "--raw", "--epochs", "1")
    one_line_error(
        r, 6, "chunk (0, 0) of 'weights'", "has 1000 bytes, 4100 expected", starts="error:"
    )

    s2 = _copy(built, tmp_path, "s2")
    chunk = s2 / "cmd/b/c/1"
    raw = bytearray(chunk.read_bytes())
    raw[7] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"chunk \(1,\) of 'cmd/b'.* fails its crc32c"):
        CMD.load(s2).b_  # noqa: B018  (exit 6 on the command line, as s1 and s3 show)

    s3 = _copy(built, tmp_path, "s3")
    (s3 / "cmd/zarr.json").write_text('{"zarr_format": 3, "node_ty')
    before = tree_digest(s3)
    r = cli("reconstruct", s3, tmp_path / "o3")
    one_line_error(r, 6, "decomposition 'cmd'", "unreadable zarr.json", starts="error:")
    assert tree_digest(s3) == before

    s4 = _copy(built, tmp_path, "s4")
    (s4 / "cmd/labels/zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match="decomposition 'cmd': array 'labels' has unreadable"):
        CMD.load(s4)


# ------------------------------------------------------------ metadata on open
def _root(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["attributes"]["cmdtool"]


def _swap_offsets(doc):
    p = _root(doc)["params"]
    p[0]["offset"], p[1]["offset"] = p[1]["offset"], p[0]["offset"]


def _grow_last_shape(doc):
    _root(doc)["params"][-1]["shape"][0] += 1


def _overlap(doc):
    _root(doc)["params"][2]["offset"] -= 3


def _set(key, value):
    def edit(doc):
        _root(doc)[key] = value

    return edit


def _epoch_label(doc):
    _root(doc)["epochs"][3]["label"] = 2


def _extras_nbytes(doc):
    _root(doc)["extras"][0]["nbytes"] = 4


def _param_dtype(doc):
    _root(doc)["params"][0]["dtype"] = "int32"


ROOT_TAMPERING = [
    (_swap_offsets, r"params\[0\] \('\S+'\): offset \d+, expected 0"),
    (_overlap, r"params\[2\] \('\S+'\): offset \d+, expected \d+ \(offsets run contiguously"),
    (_grow_last_shape, r"add up to N = \d+ columns, 'weights' has 3224"),
    (_param_dtype, r"dtype 'int32' is not a floating dtype"),
    (_extras_nbytes, r"extras\[0\] \('bn.num_batches_tracked'\): nbytes 4, expected 8"),
    (_epoch_label, r"epochs\[3\]: label 2 does not follow the previous label 3"),
    (_set("format_version", 0), r"format_version 0 is not a positive integer"),
    (_set("format_version", True), r"format_version True is not a positive integer"),
    (_set("format_version", "2"), r"format_version '2' is not a positive integer"),
]


@pytest.mark.parametrize(("edit", "message"), ROOT_TAMPERING)
def test_tampered_root_metadata_is_refused_naming_the_field(store, edit, message):
    # guards: validate.validate_store / check_format_version, called by _load_meta
    _edit_json(store / "zarr.json", edit)
    before = tree_digest(store)
    for mode in ("r", "r+"):
        with pytest.raises(StoreError, match=message):
            TrajectoryStore.open(store, mode=mode)
    assert tree_digest(store) == before  # not even the lock file is left


def _endian(doc):
    doc["codecs"][0]["configuration"]["endian"] = "big"


def _dtype(doc):
    doc["data_type"] = "int32"
    doc["fill_value"] = 0


def _no_crc(doc):
    doc["codecs"] = doc["codecs"][:1]


ARRAY_TAMPERING = [
    ("weights", _endian, r"array 'weights' is stored big-endian, expected little-endian"),
    ("weights", _dtype, r"array 'weights' has data type 'int32', expected 'float32'"),
    ("pool", _no_crc, r"array 'pool' has codecs \['bytes'\], expected \['bytes', 'crc32c'\]"),
]


@pytest.mark.parametrize(("array", "edit", "message"), ARRAY_TAMPERING)
def test_tampered_array_metadata_is_refused(store, array, edit, message):
    _edit_json(store / array / "zarr.json", edit)
    with pytest.raises(StoreError, match=message):
        TrajectoryStore.open(store)


def test_out_of_range_indexes_and_bad_shapes_of_a_result_are_refused(built, tmp_path):
    # guards: validate.validate_result (called by pin_result) and the label range check
    n = n_modeled()
    cases = {
        "ref": (
            lambda s: zarr.open_array(s / "cmd/ref_index", mode="r+").__setitem__(0, n),
            rf"array 'ref_index' holds column {n}, outside \[0, {n}\)",
        ),
        "len": (
            lambda s: _edit_json(s / "cmd/a/zarr.json", lambda d: d["shape"].__setitem__(0, n - 1)),
            rf"array 'a' has length {n - 1}, expected N = {n}",
        ),
        "rows": (
            lambda s: _edit_json(
                s / "cmd/zarr.json", lambda d: d["attributes"]["cmdtool_result"]["rows"].append(9)
            ),
            r"rows \[.*9\] are not rows of the store's 6 epochs",
        ),
    }
    for key, (damage, message) in cases.items():
        s = _copy(built, tmp_path, key)
        damage(s)
        with TrajectoryStore.open(s) as st, pytest.raises(StoreError, match=message):
            CMD.load(st)


def test_negative_label_or_big_endian_weights_fail_through_the_cli(built, tmp_path):
    # guards: CheckedLocalStore.chunk_problem's label range; the endian check on open
    s1 = _copy(built, tmp_path, "s1")
    labels = zarr.open_array(s1 / "cmd/labels", mode="r+")  # plain zarr: a valid crc
    labels[1500] = -1
    r = cli("reconstruct", s1, tmp_path / "o1", "--epochs", "all")
    one_line_error(
        r, 6, "chunk (1,) of 'cmd/labels'", "holds label -1, outside [0, 3)", starts="error:"
    )
    assert not list((tmp_path / "o1").glob("epoch_*"))

    s2 = _copy(built, tmp_path, "s2")
    _edit_json(s2 / "weights/zarr.json", _endian)
    r = cli("reconstruct", s2, tmp_path / "o2", "--raw")
    one_line_error(r, 6, "array 'weights' is stored big-endian", starts="error:")


# ---------------------------------------------------------------------- verify
def test_verify_lists_every_damaged_chunk(built, tmp_path):
    # guards: verify.verify reading every committed chunk through chunk_problem
    clean = _copy(built, tmp_path, "clean")
    r = cli("verify", clean)
    assert r.returncode == 0, r.stderr
    assert "no damage" in r.stdout and "crc32c" in r.stdout
    s = _copy(built, tmp_path, "s")
    (s / "weights/c/4/2").unlink()
    extras = s / "extras/c/1/0"
    extras.write_bytes(extras.read_bytes()[:-2])
    pool = s / "pool/c/0/0"
    raw = bytearray(pool.read_bytes())
    raw[0] ^= 0xFF
    pool.write_bytes(bytes(raw))
    zarr.open_array(s / "cmd/labels", mode="r+")[3000] = 7  # 3 modes: out of range
    before = tree_digest(s)
    r = cli("verify", s, "--json")
    one_line_error(r, 6, "4 problem(s)", "chunk (4, 2) of 'weights'", starts="error:")
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["checksummed"] is True
    problems = report["problems"]
    assert len(problems) == 4, problems
    assert "chunk (4, 2) of 'weights' (epoch 5, row 4; columns 2048..3071)" in problems[0]
    assert "is missing" in problems[0]
    assert "chunk (0, 0) of 'pool'" in problems[1] and "crc32c" in problems[1]
    assert "chunk (1, 0) of 'extras'" in problems[2] and "has 10 bytes, 12 expected" in problems[2]
    assert "chunk (2,) of 'cmd/labels'" in problems[3] and "label 7" in problems[3]
    # everything committed was read: T rows x 4 chunks of weights, T of pool and extras,
    # 1 of pool_index, 4 of each per-parameter result array and 1 of each small one
    shapes = [d["shape"] for k, d in _arrays(s).items() if k.startswith("cmd/")]
    per_param = shapes.count([n_modeled()])
    small = len(shapes) - per_param
    assert report["chunks"] == EPOCHS * 4 + EPOCHS + EPOCHS + 1 + 4 * per_param + small
    assert tree_digest(s) == before


# ------------------------------------------------------------- format v1 stores
def make_v1_store(path: Path, values: np.ndarray, params: list[dict[str, Any]]) -> None:
    """A store exactly as format v1 (README of that version) lays it out, written with
    plain zarr: no checksum, zarr's default of not writing chunks equal to the fill value."""
    g = zarr.open_group(path, mode="w")
    w = g.create_array(
        "weights",
        shape=values.shape,
        chunks=(1, CHUNK),
        dtype="float32",
        fill_value=0.0,
        compressors=None,
    )
    w[:] = values
    g.attrs["cmdtool"] = {
        "format_version": 1,
        "params": params,
        "extras": [],
        "filters": {},
        "source_roots": [],
        "epochs": [
            {"label": t + 1, "source": f"epoch_{t + 1}.safetensors", "kind": "safetensors"}
            for t in range(values.shape[0])
        ],
    }


def test_v1_store_is_read_decomposed_and_upgraded(built, tmp_path):
    # guards: v1 reading (absent chunk = zeros), upgrade.upgrade, and the version checks
    from cmdtool.store.describe import describe
    from cmdtool.store.upgrade import upgrade
    from cmdtool.store.verify import verify

    _, values, params = built
    v1 = tmp_path / "v1"
    make_v1_store(v1, values, params)
    row = ZERO_EPOCH - 1
    assert not (v1 / f"weights/c/{row}/0").exists()  # zarr skipped the zero chunk
    info = describe(v1)  # what `cmdtool info --json` prints
    assert info["format_version"] == 1 and info["checksums"] is False
    with TrajectoryStore.open(v1) as st:
        assert np.array_equal(st.read_block(np.arange(EPOCHS), 0, st.n_params), values)
    r = cli("decompose", v1, "--modes", "3", "--samples", "300")
    assert r.returncode == 0, r.stderr
    labels = np.asarray(zarr.open_array(v1 / "cmd/labels", mode="r")[:])
    report = verify(v1)
    assert report.ok and not report.checksummed and report.format_version == 1

    r = cli("upgrade", v1)
    assert r.returncode == 0, r.stderr
    assert "from format v1 to v2" in r.stdout
    g = zarr.open_group(v1, mode="r")
    assert g.attrs["cmdtool"]["format_version"] == 2
    for name, doc in _arrays(v1).items():
        assert [c["name"] for c in doc["codecs"]] == ["bytes", "crc32c"], name
    assert (v1 / f"weights/c/{row}/0").is_file()  # zeros now written
    assert np.array_equal(np.asarray(g["weights"][:]), values)
    assert np.array_equal(np.asarray(g["cmd/labels"][:]), labels)
    assert not [p for p in v1.rglob(UPGRADE_PREFIX + "*")]
    assert upgrade(v1).arrays == []  # already v2: nothing to do
    report = verify(v1)
    assert report.ok and report.checksummed and report.format_version == 2


def test_an_interrupted_upgrade_is_recovered_and_resumed(built, tmp_path):
    # guards: cleanup.recover_upgrade (run by the next writer before the arrays are
    # checked) and the skip of already checksummed arrays in upgrade._rewrite
    from cmdtool.store.upgrade import upgrade

    _, values, params = built
    v1 = tmp_path / "v1"
    make_v1_store(v1, values, params)
    # killed between the two renames of the weights swap: only the old folder is there,
    # beside a half-written checksummed copy
    os.replace(v1 / "weights", v1 / (UPGRADE_OLD_PREFIX + "weights"))
    half = zarr.open_group(v1, mode="r+").create_array(
        UPGRADE_PREFIX + "weights", shape=values.shape, chunks=(1, CHUNK), dtype="float32"
    )
    half[0, :] = values[0]
    with TrajectoryStore.open(v1, mode="r+") as st:  # any writer puts it back
        assert st.format_version == 1
        assert np.array_equal(st.read_block(np.arange(EPOCHS), 0, st.n_params), values)
    assert not (v1 / (UPGRADE_PREFIX + "weights")).exists()
    assert not (v1 / (UPGRADE_OLD_PREFIX + "weights")).exists()
    summary = upgrade(v1)
    assert summary.arrays == ["weights"] and summary.to_version == 2
    assert np.array_equal(np.asarray(zarr.open_array(v1 / "weights", mode="r")[:]), values)


# ------------------------------------------------------------ half-made stores
def test_a_half_made_store_left_by_an_older_cmdtool_is_taken_over(built, tmp_path):
    # guards: cleanup.clear_half_made_store, called by TrajectoryStore.create. (A creation
    # killed now leaves only a hidden folder: tests/test_crash.py kills it at every write.)
    import socket

    run = built[0].parent / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "cmdtool"})
    no_root = tmp_path / "a"  # killed before the root zarr.json was written
    (no_root / "weights").mkdir(parents=True)
    (no_root / ".cmdtool-lock").write_text(lock)
    (no_root / "weights/zarr.json").write_text('{"zarr_format": 3, "node_type": "array"')
    no_attr = tmp_path / "b"  # killed before the cmdtool attribute was written
    no_attr.mkdir()
    (no_attr / ".cmdtool-lock").write_text(lock)
    (no_attr / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    r = cli("ingest", run, no_root)
    assert r.returncode == 0, r.stderr
    ingest(run, no_attr)
    for s in (no_root, no_attr):
        with TrajectoryStore.open(s) as st:
            assert st.n_epochs == EPOCHS
            assert np.array_equal(st.read_block(np.arange(EPOCHS), 0, st.n_params), built[1])
    mine = tmp_path / "c"  # anything else is left alone
    mine.mkdir()
    (mine / ".cmdtool-lock").write_text(lock)
    (mine / "notes.txt").write_text("mine")
    before = tree_digest(mine)
    with pytest.raises(StoreError, match="exists and is not an empty folder"):
        ingest(run, mine)
    assert tree_digest(mine) == before
