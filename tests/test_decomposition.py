"""CMD against planted modes and an independent float64 numpy implementation."""

import numpy as np
import pytest
import torch
import zarr

from cmdtool.decomposition import CMD
from cmdtool.errors import DeviceError, UsageError
from cmdtool.ingestion import ingest
from cmdtool.method.kernels import resolve_device
from cmdtool.method.sampling import sample_indices
from tests import cmd_reference as ref
from tests.conftest import (
    n_modeled,
    planted,
    state_dicts,
    store_params,
    to_store_order,
    tree_digest,
    write_run,
)


@pytest.fixture
def planted_store(tmp_path):
    n = n_modeled()
    w, groups, _ = planted(n, 20, 4, seed=7, noise=0.02)
    write_run(tmp_path / "run", state_dicts(w))
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "run", store)
    params = store_params(store)
    w = to_store_order(w.astype(np.float32).astype(np.float64), params)
    groups = to_store_order(groups, params)
    return store, w, groups


def _purity(labels, groups):
    """Share of parameters in the majority planted group of their mode."""
    return sum(np.bincount(groups[labels == k]).max() for k in np.unique(labels)) / len(labels)


def test_planted_modes_recovered_and_matches_reference(planted_store):
    store, w, groups = planted_store
    model = CMD(4, n_samples=500, seed=2).fit(store)
    assert model.n_modes_ == 4
    assert _purity(model.labels_, groups) >= 0.99
    oracle = ref.fit(w, model.sample_index_, n_modes=4)
    assert np.array_equal(model.ref_index_, oracle["ref_index"])
    assert np.mean(model.labels_ == oracle["labels"]) >= 0.999
    assert abs(model.relative_error_ - oracle["rel_error"]) <= 0.01 * oracle["rel_error"]
    assert np.allclose(model.a_, oracle["a"], rtol=1e-5, atol=1e-6)
    assert np.allclose(model.b_, oracle["b"], rtol=1e-5, atol=1e-5)
    assert model.mode_sizes_.sum() == w.shape[0]
    assert np.array_equal(model.mode_sizes_, np.bincount(model.labels_, minlength=4))


def test_result_group_layout_is_public(planted_store):
    store, w, _ = planted_store
    model = CMD(3, n_samples=200).fit(store, name="three")
    g = zarr.open_group(store / "three", mode="r")
    assert g["labels"].shape == (w.shape[0],)
    assert g["a"].dtype == np.float32 and g["b"].dtype == np.float32
    assert g["ref_index"].dtype == np.int64 and g["sample_index"].shape == (200,)
    assert g["ref_traj"].shape == (3, 20)
    # ref_traj is the references' own trajectories over the window
    assert np.array_equal(g["ref_traj"][:], w[model.ref_index_].astype(np.float32))
    attrs = g.attrs["cmdtool_result"]
    assert attrs["n_modes"] == 3 and attrs["samples"] == 200 and attrs["seed"] == 0
    assert attrs["epochs"] == list(range(1, 21))


def test_window_and_stride(planted_store):
    store, w, _ = planted_store
    model = CMD(4, n_samples=400, epochs="5:17", stride=2).fit(store)
    rows = np.arange(4, 16, 2)
    assert model.window_rows_.tolist() == rows.tolist()
    oracle = ref.fit(w[:, rows], model.sample_index_, n_modes=4)
    assert abs(model.relative_error_ - oracle["rel_error"]) <= 0.01 * oracle["rel_error"]
    assert np.allclose(model.a_, oracle["a"], rtol=1e-5, atol=1e-6)


def test_threshold_cut(planted_store):
    # guards: the threshold branch of clustering (cut at t x the largest pairwise distance)
    store, w, groups = planted_store
    model = CMD(None, threshold=0.5, n_samples=300).fit(store)
    oracle = ref.fit(w, model.sample_index_, threshold=0.5)
    assert model.n_modes_ == len(oracle["ref_index"])
    assert np.array_equal(model.ref_index_, oracle["ref_index"])  # the same modes
    assert np.mean(model.labels_ == oracle["labels"]) >= 0.999
    assert np.allclose(model.a_, oracle["a"], rtol=1e-5, atol=1e-6)
    assert abs(model.relative_error_ - oracle["rel_error"]) <= 0.01 * oracle["rel_error"]
    # a finer cut separates the 4 planted groups (two of them share a mode at 0.5)
    fine = CMD(None, threshold=0.3, n_samples=300).fit(store)
    assert fine.n_modes_ == 4 and _purity(fine.labels_, groups) >= 0.99


#: a 598-parameter model for K = N fits (the clustering's cost grows as K^3)
SMALL_LAYOUT = [
    ("conv.weight", (8, 4, 3, 3), torch.float32),
    ("fc.weight", (10, 30), torch.float32),
    ("fc.bias", (10,), torch.float32),
    ("step", (), torch.int64),
]


def test_constant_trajectories(tmp_path):
    n = n_modeled(SMALL_LAYOUT)
    w, _, _ = planted(n, 8, 2, seed=0)
    w[:100] = 0.25  # constant parameters (part of conv.weight), all of them sampled (K = N)
    write_run(tmp_path / "run", state_dicts(w, SMALL_LAYOUT))
    ingest(tmp_path / "run", tmp_path / "s.zarr")
    model = CMD(2, n_samples=n).fit(tmp_path / "s.zarr")
    assert model.sample_index_.size == n
    start, col = {}, 0  # each tensor's first row of w (SMALL_LAYOUT order)
    for name, shape, dt in SMALL_LAYOUT:
        if dt.is_floating_point:
            start[name], col = col, col + int(np.prod(shape))
    params = sorted(store_params(tmp_path / "s.zarr"), key=lambda p: p["offset"])
    rows = np.concatenate([start[p["name"]] + np.arange(np.prod(p["shape"])) for p in params])
    const = rows < 100  # store column -> its row of w
    assert const.sum() == 100
    assert np.all(model.a_[const] == 0)
    assert np.allclose(model.b_[const], 0.25)
    assert np.all(np.isfinite(model.a_)) and np.all(np.isfinite(model.b_))


def test_refit_replaces_and_load_reads_back(planted_store):
    store, _, _ = planted_store
    CMD(2, n_samples=100).fit(store)
    second = CMD(4, n_samples=300).fit(store)
    loaded = CMD.load(store)
    assert loaded.n_modes_ == 4
    assert np.array_equal(loaded.labels_, second.labels_)
    assert loaded.relative_error_ == second.relative_error_


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_modes": 0}, "modes=0 must be >= 1"),
        ({"n_modes": 60, "n_samples": 50}, "modes=60 must be >= 1 and <= the number of sampled"),
        ({"n_samples": 10**7}, "samples=10000000 must be <= the number of parameters"),
        ({"epochs": "100:200"}, "no stored epoch falls in it"),
        ({"epochs": "1:3"}, "the window holds 2 epoch"),
        ({"threshold": 0.0, "n_modes": None}, "threshold=0.0"),
    ],
)
def test_bad_settings_leave_store_untouched(planted_store, kwargs, message):
    store, _, _ = planted_store
    CMD(3, n_samples=100).fit(store)
    before = tree_digest(store)
    with pytest.raises(UsageError, match=message):
        CMD(**kwargs).fit(store)
    assert tree_digest(store) == before


def test_cuda_without_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda")


def test_weights_read_at_most_once(planted_store, monkeypatch):
    # guards: sampling from the ingest-time pool in CMD._fit (no second pass over weights)
    import collections

    import zarr.storage

    store, w, _ = planted_store
    reads: collections.Counter[str] = collections.Counter()
    original = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        reads[key] += 1
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    model = CMD(4, n_samples=500, epochs="3:15", stride=3).fit(store)
    chunks = {k: v for k, v in reads.items() if k.startswith("weights/c/")}
    assert chunks and max(chunks.values()) == 1
    read_rows = {int(k.split("/")[2]) for k in chunks}
    assert read_rows == set(model.window_rows_.tolist())  # only the window's rows
    assert len(chunks) == len(model.window_rows_)  # one chunk per row in this small store
    oracle = ref.fit(w[:, model.window_rows_], model.sample_index_, n_modes=4)
    assert np.allclose(model.a_, oracle["a"], rtol=1e-5, atol=1e-6)


def test_without_a_usable_pool_samples_come_from_weights(planted_store):
    store, w, _ = planted_store
    # K/2 <= L (7 tensors): the design's uniform sampling over all N, not from the pool
    model = CMD(3, n_samples=12).fit(store)
    assert len(model.sample_index_) == 12
    assert np.array_equal(model.sample_index_, sample_indices(_sizes(store), 12, 0))
    oracle = ref.fit(w, model.sample_index_, n_modes=3)
    assert np.array_equal(model.ref_index_, oracle["ref_index"])
    assert np.allclose(model.a_, oracle["a"], rtol=1e-5, atol=1e-6)


def _sizes(store):
    import zarr

    return [
        int(np.prod(p["shape"]))
        for p in zarr.open_group(store, mode="r").attrs["cmdtool"]["params"]
    ]


def test_planted_modes_with_fifteen_percent_constant_parameters(tmp_path):
    # guards: clustering.find_modes (constants left out of steps 2-4), kernels.fit_block
    # (constant_columns: a = 0, b = the value, slot M of the totals) and the oracle rule
    import torch

    from cmdtool.reconstruction import rebuild_state

    n = n_modeled()
    w, groups, _ = planted(n, 20, 4, seed=11, noise=0.02)
    rng = np.random.default_rng(5)
    const = np.zeros(n, dtype=bool)
    const[rng.choice(n, size=int(0.15 * n), replace=False)] = True
    w[const] = rng.normal(size=(int(const.sum()), 1))  # exactly constant
    wobble = np.flatnonzero(~const)[:10]  # rounding level: 1.5 + {0, 1, 2} ulp
    w[wobble] = 1.5 + 2.0**-23 * (np.arange(20) % 3)
    const[wobble] = True
    exact = const.copy()
    exact[wobble] = False
    write_run(tmp_path / "run", state_dicts(w))
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "run", store)
    params = store_params(store)
    w32 = to_store_order(w.astype(np.float32).astype(np.float64), params)
    groups, const, exact = (to_store_order(x, params) for x in (groups, const, exact))

    model = CMD(4, n_samples=500, seed=2).fit(store)
    assert model.n_modes_ == 4 and min(model.mode_sizes_) > 0
    assert model.n_constant_ == const.sum() and model.mode_sizes_.sum() == (~const).sum()
    assert np.array_equal(model.constant_, const)
    assert not const[model.ref_index_].any()
    assert _purity(model.labels_[~const], groups[~const]) >= 0.99
    oracle = ref.fit(w32, model.sample_index_, n_modes=4)
    assert np.array_equal(oracle["constant"], const)
    assert np.array_equal(model.ref_index_, oracle["ref_index"])
    assert np.array_equal(model.mode_sizes_, oracle["mode_sizes"])
    assert np.allclose(model.a_, oracle["a"], rtol=1e-6, atol=1e-6)
    # b = mean - a * mean(r): a's float32 rounding times |mean(r)| (up to ~10 here)
    assert np.allclose(model.b_, oracle["b"], rtol=1e-5, atol=1e-5)
    assert np.array_equal(model.b_[exact], w32[exact, 0].astype(np.float32))
    assert np.all(model.a_[const] == 0)
    for label in (1, 20):
        state = rebuild_state(model, label)
        ordered = sorted(params, key=lambda d: d["offset"])
        flat = np.concatenate([state[p["name"]].reshape(-1).numpy() for p in ordered])
        assert np.array_equal(flat[exact], w32[exact, label - 1].astype(np.float32))
    attrs = zarr.open_group(store / "cmd", mode="r").attrs["cmdtool_result"]
    assert attrs["constant"] == const.sum() and "max - min" in attrs["constant_rule"]
    assert torch.is_tensor(state[params[0]["name"]])
