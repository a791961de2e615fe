"""The store format is public: check it with plain zarr, and the commit protocol."""

import json

import numpy as np
import pytest
import zarr

from cmdtool.errors import StoreError, StoreNotFoundError
from cmdtool.ingestion import ingest
from cmdtool.store import TrajectoryStore
from tests.conftest import LAYOUT, to_store_order, tree_digest


def test_layout_readable_with_plain_zarr(planted_run, tmp_path):
    folder, w, _ = planted_run
    store = tmp_path / "s.zarr"
    ingest(folder, store)
    g = zarr.open_group(store, mode="r")
    meta = g.attrs["cmdtool"]
    assert meta["format_version"] == 2
    weights = g["weights"]
    assert weights.dtype == np.float32 and weights.shape == (w.shape[1], w.shape[0])
    # row t = every modeled tensor of epoch t, C order, concatenated in params order
    floating = {n: s for n, s, dt in LAYOUT if dt.is_floating_point}
    assert {p["name"]: tuple(p["shape"]) for p in meta["params"]} == floating
    sizes = [int(np.prod(p["shape"])) for p in meta["params"]]
    assert [p["offset"] for p in meta["params"]] == np.cumsum([0, *sizes])[:-1].tolist()
    assert np.array_equal(weights[:], to_store_order(w, meta["params"]).T.astype(np.float32))
    assert [e["label"] for e in meta["epochs"]] == list(range(1, 13))
    assert meta["epochs"][0]["source"] == "epoch_1.safetensors"
    # the non-floating buffer is kept per epoch as raw little-endian bytes
    (extra,) = meta["extras"]
    assert extra["name"] == "bn.num_batches_tracked" and extra["dtype"] == "int64"
    raw = np.asarray(g["extras"][:]).view("<i8")[:, 0]
    assert raw.tolist() == [100 * (t + 1) for t in range(12)]
    # the group metadata is a plain JSON document
    assert json.loads((store / "zarr.json").read_text())["attributes"]["cmdtool"] == meta


def test_uncommitted_row_is_invisible_and_dropped(planted_run, tmp_path):
    folder, _, _ = planted_run
    store = tmp_path / "s.zarr"
    ingest(folder, store)
    st = TrajectoryStore.open(store, mode="r+")
    row = st.begin_epoch()  # an interrupted append: data written, never committed
    st.write_row_block(row, 0, np.full(st.n_params, 9.0, dtype=np.float32))
    assert zarr.open_group(store, mode="r")["weights"].shape[0] == 13
    reader = TrajectoryStore.open(store)
    assert reader.n_epochs == 12
    TrajectoryStore.open(store, mode="r+")  # the next writer drops the leftover row
    assert zarr.open_group(store, mode="r")["weights"].shape[0] == 12


def test_newer_format_and_foreign_folders_are_refused(planted_run, tmp_path):
    # guards: the format_version check in store.TrajectoryStore._load_meta
    folder, _, _ = planted_run
    store = tmp_path / "s.zarr"
    ingest(folder, store)
    g = zarr.open_group(store, mode="r+")
    meta = dict(g.attrs["cmdtool"])
    meta["format_version"] = 3
    g.attrs["cmdtool"] = meta
    before = tree_digest(store)
    with pytest.raises(StoreError, match=r"format_version 3.*reads version 2; upgrade cmdtool"):
        TrajectoryStore.open(store)
    assert tree_digest(store) == before
    with pytest.raises(StoreNotFoundError, match="store not found"):
        TrajectoryStore.open(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a cmdtool store"):
        TrajectoryStore.open(tmp_path / "plain")


def test_scratch_fits_are_hidden_and_removed_by_the_next_writer(planted_run, tmp_path):
    # guards: store.scratch_result_name / _recover (a killed `sweep` leaves its fits)
    from cmdtool.decomposition import CMD
    from cmdtool.store import scratch_result_name

    folder, _, _ = planted_run
    store = tmp_path / "s.zarr"
    ingest(folder, store)
    CMD(3, n_samples=100).fit(store)
    scratch = scratch_result_name()
    with TrajectoryStore.open(store, mode="r+") as st:
        fitted = CMD(2, n_samples=100).fit(st, name=scratch)  # its writer "dies" here
        n = fitted.a_.shape[0]
        assert st.open_result(scratch)["a"].shape == (n,)
    assert (store / scratch / "zarr.json").is_file()
    with TrajectoryStore.open(store) as st:  # readers do not see it, nor remove it
        assert st.result_names() == ["cmd"]
    assert (store / scratch).exists()
    with TrajectoryStore.open(store, mode="r+") as st:
        assert st.result_names() == ["cmd"]
    assert not (store / scratch).exists()
    assert zarr.open_group(store / "cmd", mode="r")["a"].shape == (n,)


def test_chunks_of_one_mib_rows_and_no_compression(tmp_path):
    # guards: TrajectoryStore.create's chunk shapes and codecs, as the README's "Store
    # format" states them: weights chunks (1, 262144) (1 MiB), no compression (the codecs
    # are `bytes`, little-endian, then the `crc32c` checksum, nothing else); pool and
    # extras one chunk per row
    import google_crc32c
    import torch

    from tests.conftest import state_dicts, write_run

    n, t = 262_144 + 1000, 3  # two chunk columns, the second a partial one
    w = np.random.default_rng(0).normal(size=(n, t))
    layout = [("p", (n,), torch.float32), ("s", (), torch.int64)]
    write_run(tmp_path / "run", state_dicts(w, layout))
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "run", store)
    chunk_of = {"weights": [1, 262_144], "pool": [1, 16_384], "extras": [1, 8]}
    for name, chunk in chunk_of.items():
        meta = json.loads((store / name / "zarr.json").read_text())
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == chunk, name
        assert [c["name"] for c in meta["codecs"]] == ["bytes", "crc32c"], name
        assert meta["codecs"][0].get("configuration", {"endian": "little"}) == {"endian": "little"}
    # on disk each chunk file is the row's raw little-endian float32 values (padded with
    # the fill value 0 at the edge), then their CRC-32C: 1 MiB + 4 bytes
    w32 = w.astype("<f4")
    for row in range(t):
        for col, values in ((0, w32[:262_144, row]), (1, w32[262_144:, row])):
            raw = (store / "weights" / "c" / str(row) / str(col)).read_bytes()
            assert len(raw) == 262_144 * 4 + 4, (row, col)
            data = raw[:-4]
            assert data[: values.nbytes] == values.tobytes(), (row, col)
            assert data[values.nbytes :] == bytes(len(data) - values.nbytes), (row, col)
            assert int.from_bytes(raw[-4:], "little") == google_crc32c.value(data), (row, col)
