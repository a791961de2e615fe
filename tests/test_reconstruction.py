"""Rebuilt checkpoints: the source's names, shapes and dtypes, the model's values."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cmdtool.decomposition import CMD
from cmdtool.errors import DecompositionNotFoundError, EpochNotFoundError, UsageError
from cmdtool.ingestion import ingest
from cmdtool.reconstruction import reconstruct
from tests import cmd_reference as ref
from tests.conftest import LAYOUT, n_modeled, planted, state_dicts, write_run

MIXED = [
    ("emb.weight", (30, 20), torch.bfloat16),
    ("ln.weight", (20,), torch.float16),
    ("ln.bias", (20,), torch.float64),
    ("head.weight", (10, 20), torch.float32),
    ("mask", (4, 5), torch.bool),
    ("steps", (), torch.int64),
]


def _mixed_sds(w):
    sds = state_dicts(w, MIXED)
    for t, sd in enumerate(sds):
        sd["mask"] = torch.arange(20).reshape(4, 5) % (t + 2) == 0
    return sds


@pytest.fixture
def mixed_store(tmp_path):
    n = sum(int(np.prod(s)) for _, s, dt in MIXED if dt.is_floating_point)
    w, _, _ = planted(n, 10, 3, seed=5)
    sds = _mixed_sds(w)
    write_run(tmp_path / "run", sds)
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "run", store)
    model = CMD(3, n_samples=300, epochs="2:9").fit(store)
    return store, sds, model


def test_names_shapes_dtypes_and_extras_as_source(mixed_store, tmp_path):
    store, sds, _ = mixed_store
    summary = reconstruct(store, tmp_path / "out", epochs="all")
    assert summary.epochs == list(range(1, 11))
    for t, sd in enumerate(sds):
        path = tmp_path / "out" / f"epoch_{t + 1}.safetensors"
        got = load_file(path)
        assert set(got) == set(sd)
        for name, src in sd.items():
            assert got[name].shape == src.shape and got[name].dtype == src.dtype, name
        assert torch.equal(got["mask"], sd["mask"]) and torch.equal(got["steps"], sd["steps"])
        with safe_open(path, "pt") as f:  # same tensor order as the source file
            with safe_open(tmp_path / "run" / f"epoch_{t + 1}.safetensors", "pt") as g:
                assert list(f.keys()) == list(g.keys())


def test_values_equal_the_reference_model_inside_and_outside_the_window(mixed_store, tmp_path):
    store, sds, model = mixed_store
    reconstruct(store, tmp_path / "out", epochs="1,5,10")
    # W in store column order, read from the source files (independent of cmdtool)
    params = [p for p in _store_params(store)]
    w_src = np.stack(
        [
            np.concatenate([sd[p["name"]].to(torch.float32).reshape(-1).numpy() for p in params])
            for sd in sds
        ],
        axis=1,
    ).astype(np.float64)
    expected = ref.reconstruct(w_src, model.labels_, model.a_, model.b_, model.ref_index_)
    for label in (1, 5, 10):  # 1 and 10 lie outside the window 2:9
        got = load_file(tmp_path / "out" / f"epoch_{label}.safetensors")
        for p in params:
            size = int(np.prod(p["shape"]))
            want = expected[p["offset"] : p["offset"] + size, label - 1]
            want_t = torch.tensor(want.astype(np.float32)).to(got[p["name"]].dtype)
            assert torch.equal(got[p["name"]].reshape(-1), want_t), (label, p["name"])


def _store_params(store):
    from tests.conftest import store_params

    return store_params(store)


def test_pt_format_loads_with_weights_only(mixed_store, tmp_path):
    # guards: write_epoch's torch.save branch (names, shapes, dtypes and values as for
    # safetensors), checked against the float64 oracle on the source files
    store, sds, model = mixed_store
    summary = reconstruct(store, tmp_path / "pt", fmt="pt", epochs="1,5,10")
    names = [f.rsplit("/", 1)[1] for f in summary.files]
    assert names == ["epoch_1.pt", "epoch_5.pt", "epoch_10.pt"]
    params = _store_params(store)
    w_src = np.stack(
        [
            np.concatenate([sd[p["name"]].to(torch.float32).reshape(-1).numpy() for p in params])
            for sd in sds
        ],
        axis=1,
    ).astype(np.float64)
    expected = ref.reconstruct(w_src, model.labels_, model.a_, model.b_, model.ref_index_)
    for label in (1, 5, 10):  # 1 and 10 lie outside the window 2:9
        got = torch.load(tmp_path / "pt" / f"epoch_{label}.pt", weights_only=True)
        src = sds[label - 1]
        assert set(got) == set(src)
        for name, tensor in src.items():
            assert got[name].shape == tensor.shape and got[name].dtype == tensor.dtype, name
        assert torch.equal(got["mask"], src["mask"]) and torch.equal(got["steps"], src["steps"])
        for p in params:
            size = int(np.prod(p["shape"]))
            want = expected[p["offset"] : p["offset"] + size, label - 1]
            want_t = torch.tensor(want.astype(np.float32)).to(src[p["name"]].dtype)
            assert torch.equal(got[p["name"]].reshape(-1), want_t), (label, p["name"])


def test_prefix_change_between_epochs_keeps_each_epochs_names(tmp_path):
    n = n_modeled()
    w, _, _ = planted(n, 6, 2, seed=1)
    sds = state_dicts(w[:, :3]) + state_dicts(w[:, 3:], prefix="module.")
    write_run(tmp_path / "run", sds)
    ingest(tmp_path / "run", tmp_path / "s.zarr")
    CMD(2, n_samples=200).fit(tmp_path / "s.zarr")
    reconstruct(tmp_path / "s.zarr", tmp_path / "out", epochs="all")
    assert set(load_file(tmp_path / "out" / "epoch_2.safetensors")) == {n for n, _, _ in LAYOUT}
    assert set(load_file(tmp_path / "out" / "epoch_5.safetensors")) == {
        "module." + n for n, _, _ in LAYOUT
    }


def test_bad_requests(mixed_store, tmp_path):
    store, _, _ = mixed_store
    with pytest.raises(EpochNotFoundError, match="epoch 42 is not in the store"):
        reconstruct(store, tmp_path / "o", epochs="42")
    with pytest.raises(DecompositionNotFoundError, match="no decomposition named 'other'"):
        reconstruct(store, tmp_path / "o", name="other")
    with pytest.raises(UsageError, match="--format 'npz'"):
        reconstruct(store, tmp_path / "o", fmt="npz")
    with pytest.raises(UsageError, match="inside the store"):
        reconstruct(store, store / "x")


def test_output_into_the_source_folder_is_refused(tmp_path):
    # guards: the source_roots check in reconstruct()
    w, _, _ = planted(n_modeled(), 4, 2, seed=0)
    write_run(tmp_path / "run", state_dicts(w))
    ingest(tmp_path / "run", tmp_path / "s.zarr")
    CMD(2, n_samples=100).fit(tmp_path / "s.zarr")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(UsageError, match="holds the source checkpoints"):
        reconstruct(tmp_path / "s.zarr", tmp_path / "run", epochs="all")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
