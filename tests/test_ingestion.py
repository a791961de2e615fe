"""Ingest of every checkpoint layout into a store, appending, and refusals."""

import json
import os

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from cmdtool.errors import (
    CheckpointError,
    MismatchError,
    NonFiniteError,
    SourceNotFoundError,
    UsageError,
)
from cmdtool.ingestion import ingest
from cmdtool.store import TrajectoryStore
from tests.conftest import (
    LAYOUT,
    n_modeled,
    planted,
    state_dicts,
    store_params,
    to_store_order,
    tree_digest,
    write_run,
)

T = 5


@pytest.fixture
def traj():
    w, _, _ = planted(n_modeled(), T, 2, seed=11)
    return w


def _check_rows(store, w, labels):
    g = zarr.open_group(store, mode="r")
    assert [e["label"] for e in g.attrs["cmdtool"]["epochs"]] == labels
    expected = to_store_order(w, store_params(store)).T.astype(np.float32)
    assert np.array_equal(g["weights"][:], expected)


def _write_hf(folder, sds, labels, sharded):
    for label, sd in zip(labels, sds, strict=True):
        ck = folder / f"checkpoint-{label}"
        ck.mkdir(parents=True)
        if sharded:
            names = list(sd)
            halves = [names[: len(names) // 2], names[len(names) // 2 :]]
            weight_map = {}
            for i, part in enumerate(halves, start=1):
                shard = f"model-{i:05d}-of-00002.safetensors"
                save_file({k: sd[k].contiguous() for k in part}, ck / shard)
                weight_map.update(dict.fromkeys(part, shard))
            (ck / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map})
            )
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, ck / "model.safetensors")
        # what the HF Trainer writes beside the weights: never read
        (ck / "trainer_state.json").write_text("{}")
        (ck / "optimizer.pt").write_bytes(b"not a checkpoint at all")
        (ck / "training_args.bin").write_bytes(b"\x80\x04garbage")


@pytest.mark.parametrize("layout", ["safetensors", "hf", "hf-sharded", "pt", "lightning"])
def test_every_layout_ingests_to_the_same_rows(tmp_path, traj, layout):
    sds = state_dicts(traj)
    run = tmp_path / "run"
    labels = [2, 10, 30, 200, 1000]  # natural order, not string order
    if layout == "safetensors":
        write_run(run, sds, labels=labels)
    elif layout.startswith("hf"):
        _write_hf(run, sds, labels, sharded=layout == "hf-sharded")
    elif layout == "pt":
        write_run(run, sds, labels=labels, name=lambda e: f"model_epoch_{e}.pt")
        (run / "optimizer.pt").write_bytes(b"never unpickled")
    else:
        write_run(run, sds, labels=labels, name=lambda e: f"epoch={e}-step={e * 7}.ckpt")
    store = tmp_path / "s.zarr"
    summary = ingest(run, store)
    assert summary.added == labels
    _check_rows(store, traj, labels)
    if layout == "lightning":
        assert summary.state_keys == {"state_dict": T}


def test_lightning_weight_averaging_uses_the_raw_weights(tmp_path, traj):
    run = tmp_path / "run"
    run.mkdir()
    for t, sd in enumerate(state_dicts(traj)):
        averaged = {k: v * 0 if v.is_floating_point() else v for k, v in sd.items()}
        torch.save(
            {"epoch": t, "state_dict": averaged, "current_model_state": sd},
            run / f"epoch={t}.ckpt",
        )
    summary = ingest(run, tmp_path / "s.zarr")
    assert summary.state_keys == {"current_model_state": T}
    _check_rows(tmp_path / "s.zarr", traj, list(range(T)))


def test_reingest_appends_only_new_epochs(tmp_path, traj):
    run = tmp_path / "run"
    sds = state_dicts(traj)
    write_run(run, sds[:3])
    store = tmp_path / "s.zarr"
    assert ingest(run, store).added == [1, 2, 3]
    write_run(run, sds[3:], labels=[4, 5])
    second = ingest(run, store)
    assert second.added == [4, 5] and second.skipped == [1, 2, 3]
    _check_rows(store, traj, [1, 2, 3, 4, 5])
    assert ingest(run, store).added == []


def test_prefix_appearing_between_epochs_still_ingests(tmp_path, traj):
    sds = state_dicts(traj[:, :2]) + state_dicts(traj[:, 2:], prefix="module._orig_mod.")
    write_run(tmp_path / "run", sds)
    ingest(tmp_path / "run", tmp_path / "s.zarr")
    _check_rows(tmp_path / "s.zarr", traj, [1, 2, 3, 4, 5])
    st = TrajectoryStore.open(tmp_path / "s.zarr")
    assert st.epochs[3].renamed["fc.weight"] == "module._orig_mod.fc.weight"
    assert st.params[0].name.startswith(("bn.", "conv.", "fc."))  # names kept as found


def test_include_exclude(tmp_path, traj):
    write_run(tmp_path / "run", state_dicts(traj))
    ingest(tmp_path / "run", tmp_path / "s.zarr", include=r"^(conv|fc)\.", exclude=r"bias$")
    names = [p["name"] for p in store_params(tmp_path / "s.zarr")]
    assert sorted(names) == ["conv.weight", "fc.weight"]


def _append_bad(tmp_path, traj, mutate, name="epoch_6.safetensors"):
    run = tmp_path / "run"
    write_run(run, state_dicts(traj))
    store = tmp_path / "s.zarr"
    ingest(run, store)
    before = tree_digest(store)
    sd = state_dicts(traj)[-1]
    mutate(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, run / name)
    return run, store, before


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda sd: sd.pop("fc.bias"), MismatchError, r"epoch_6.safetensors.*missing 'fc.bias'"),
        (
            lambda sd: sd.update({"extra.weight": torch.zeros(3)}),
            MismatchError,
            r"epoch_6.safetensors.*not in the store 'extra.weight'",
        ),
        (
            lambda sd: sd.update({"fc.bias": torch.zeros(41)}),
            MismatchError,
            r"epoch_6.safetensors: tensor 'fc.bias' has shape \(41,\), the store has \(40,\)",
        ),
        (
            lambda sd: sd["conv.bias"].__setitem__(3, float("nan")),
            NonFiniteError,
            r"epoch_6.safetensors: tensor 'conv.bias' of epoch 6 holds NaN or Inf",
        ),
    ],
)
def test_bad_epoch_leaves_store_exactly_as_it_was(tmp_path, traj, mutate, error, message):
    # guards: ingest._match_names / _row_blocks (isfinite check) and store.abort_epoch
    run, store, before = _append_bad(tmp_path, traj, mutate)
    with pytest.raises(error, match=message):
        ingest(run, store)
    assert tree_digest(store) == before


def test_nonfinite_accepted_on_request(tmp_path, traj):
    run, store, _ = _append_bad(
        tmp_path, traj, lambda sd: sd["conv.bias"].__setitem__(3, float("inf"))
    )
    ingest(run, store, allow_nonfinite=True)
    assert np.isinf(zarr.open_group(store, mode="r")["weights"][5]).sum() == 1


def test_truncated_file_is_named_and_nothing_is_created(tmp_path, traj):
    run = tmp_path / "run"
    paths = write_run(run, state_dicts(traj))
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"epoch_1\.safetensors"):
        ingest(run, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(SourceNotFoundError, match="nowhere"):
        ingest(tmp_path / "nowhere", tmp_path / "s.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="empty"):
        ingest(tmp_path / "empty", tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_older_epoch_after_newer_is_refused(tmp_path, traj):
    run = tmp_path / "run"
    sds = state_dicts(traj)
    # guards: the append-only check in ingest (before anything is written)
    write_run(run, sds[2:], labels=[3, 4, 5])
    store = tmp_path / "s.zarr"
    ingest(run, store)
    before = tree_digest(store)
    write_run(run, sds[:2], labels=[1, 2])
    write_run(run, [state_dicts(traj + 1.0)[0]], labels=[6])  # a newer one in the same call
    with pytest.raises(
        UsageError, match=r"^epoch_1\.safetensors: epoch 1 is older than the store's last epoch 5"
    ):
        ingest(run, store)
    assert tree_digest(store) == before
    _check_rows(store, traj[:, 2:], [3, 4, 5])


def test_checkpoint_changed_after_commit_is_reported_not_reread(tmp_path, traj):
    # guards: ingest._changed_since_commit (size/mtime first, then sha256)
    run = tmp_path / "run"
    paths = write_run(run, state_dicts(traj))
    store = tmp_path / "s.zarr"
    ingest(run, store)
    before = zarr.open_group(store, mode="r")["weights"][1].copy()
    os.utime(paths[0], ns=(1, 1))  # touched only: same bytes, not reported
    altered = state_dicts(traj + 1.0)[1]
    save_file({k: v.contiguous() for k, v in altered.items()}, paths[1])
    summary = ingest(run, store)
    assert summary.changed == [{"label": 2, "source": "epoch_2.safetensors"}]
    assert summary.added == []
    assert np.array_equal(zarr.open_group(store, mode="r")["weights"][1], before)
    recorded = TrajectoryStore.open(store).epochs[0]
    assert recorded.sha256 is not None and recorded.size == paths[0].stat().st_size


@pytest.mark.parametrize("readers", [0, 1, 4])
def test_read_ahead_writes_the_same_store(tmp_path, traj, readers):
    # guards: ingest._read_ahead keeps epoch order and pairs each file with its own hash
    run = tmp_path / "run"
    write_run(run, state_dicts(traj))
    ingest(run, tmp_path / "s.zarr", readers=readers)
    _check_rows(tmp_path / "s.zarr", traj, [1, 2, 3, 4, 5])
    import hashlib

    for epoch in TrajectoryStore.open(tmp_path / "s.zarr").epochs:
        assert epoch.sha256 == hashlib.sha256((run / epoch.source).read_bytes()).hexdigest()


def test_bad_epoch_rolls_back_the_whole_call(tmp_path, traj):
    # guards: ingest's rollback of the epochs a failing call had appended
    sds = state_dicts(traj)
    write_run(tmp_path / "run", sds[:3])
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "run", store)
    before = tree_digest(store)
    bad = dict(sds[-1])
    bad["conv.bias"] = torch.full_like(bad["conv.bias"], float("nan"))
    write_run(tmp_path / "run", [*sds[3:5], bad], labels=[4, 5, 6])
    with pytest.raises(NonFiniteError, match=r"epoch_6\.safetensors"):
        ingest(tmp_path / "run", store)
    assert tree_digest(store) == before
    # a store created by the failing call is removed again
    with pytest.raises(NonFiniteError):
        ingest(tmp_path / "run", tmp_path / "new.zarr")
    assert not (tmp_path / "new.zarr").exists()


def _flat_rows(sds, layout=LAYOUT) -> np.ndarray:
    """(N, T) float64: the floating tensors of each state dict in layout order, as float32."""
    cols = [
        np.concatenate(
            [sd[name].to(torch.float32).reshape(-1).numpy() for name, _, dt in layout
             if dt.is_floating_point]
        )
        for sd in sds
    ]  # fmt: skip
    return np.stack(cols, axis=1).astype(np.float64)


def test_dtype_changing_between_epochs_is_recorded_per_epoch(tmp_path, traj):
    # guards: the per-epoch `dtypes` record in ingest._append and raw_state's cast back to
    # each epoch's own dtype
    from cmdtool.reconstruction import reconstruct

    sds = state_dicts(traj)
    for sd in sds[2:]:  # saved in mixed precision from epoch 3 on
        sd["fc.weight"] = sd["fc.weight"].to(torch.bfloat16)
        sd["conv.bias"] = sd["conv.bias"].to(torch.float16)
    run = tmp_path / "run"
    write_run(run, sds)
    store = tmp_path / "s.zarr"
    ingest(run, store)
    meta = zarr.open_group(store, mode="r").attrs["cmdtool"]
    dtypes = {p["name"]: p["dtype"] for p in meta["params"]}
    assert dtypes["fc.weight"] == "float32" and dtypes["conv.bias"] == "float32"  # epoch 1's
    changed = {"fc.weight": "bfloat16", "conv.bias": "float16"}
    assert [e.get("dtypes") or {} for e in meta["epochs"]] == [{}, {}] + [changed] * 3
    _check_rows(store, _flat_rows(sds), [1, 2, 3, 4, 5])  # the values as each epoch held them
    reconstruct(store, tmp_path / "out", epochs="all", raw=True)
    for t, sd in enumerate(sds):
        got = load_file(tmp_path / "out" / f"epoch_{t + 1}.safetensors")
        for name, tensor in sd.items():
            assert got[name].dtype == tensor.dtype, (t, name)
            same = got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            assert torch.equal(*same), (t, name)


def _fp8_values(bits: np.ndarray, exponent: int, mantissa: int) -> np.ndarray:
    """Decode fp8 bit patterns (uint8) by the format's definition: sign, ``exponent`` bits
    with bias 2^(exponent-1) - 1, ``mantissa`` bits, subnormals at exponent 0."""
    bias = 2 ** (exponent - 1) - 1
    sign = np.where(bits >> 7, -1.0, 1.0)
    e = (bits.astype(np.int64) >> mantissa) & (2**exponent - 1)
    m = (bits & (2**mantissa - 1)).astype(np.float64) / 2**mantissa
    return sign * np.where(e == 0, m * 2.0 ** (1 - bias), (1 + m) * 2.0 ** (e - bias))


def test_fp8_checkpoints_ingest_exactly_and_come_back_bit_for_bit(tmp_path):
    # guards: the safetensors F8_E4M3 / F8_E5M2 dtypes, ingest's float32 conversion and
    # raw_state's cast back to fp8
    from cmdtool.reconstruction import reconstruct

    every = np.arange(256, dtype=np.uint8)
    e4m3 = every[(every & 0x7F) != 0x7F]  # all but the two NaNs (float8_e4m3fn: no Inf)
    e5m2 = every[(every & 0x7C) != 0x7C]  # all but Inf and NaN (exponent all ones)
    sds = []
    for t in range(4):  # each epoch a different permutation of every finite value
        q, k = np.roll(e4m3, 17 * t), np.roll(e5m2, 29 * t)
        sds.append(
            {
                "q.weight": torch.from_numpy(q.copy()).view(torch.float8_e4m3fn),
                "k.weight": torch.from_numpy(k.copy()).view(torch.float8_e5m2),
                "scale": torch.tensor([1.0, 2.0, 3.0]) * (t + 1),
            }
        )
    run = tmp_path / "run"
    write_run(run, sds)
    store = tmp_path / "s.zarr"
    ingest(run, store)
    g = zarr.open_group(store, mode="r")
    params = {p["name"]: p for p in g.attrs["cmdtool"]["params"]}
    assert params["q.weight"]["dtype"] == "float8_e4m3fn"
    assert params["k.weight"]["dtype"] == "float8_e5m2"
    weights = g["weights"][:]
    for t, sd in enumerate(sds):
        for name, (exponent, mantissa) in (("q.weight", (4, 3)), ("k.weight", (5, 2))):
            p = params[name]
            stored = weights[t, p["offset"] : p["offset"] + p["shape"][0]]
            want = _fp8_values(sd[name].view(torch.uint8).numpy(), exponent, mantissa)
            assert np.array_equal(stored, want.astype(np.float32)), (t, name)
            assert np.array_equal(np.signbit(stored), np.signbit(want)), (t, name)  # -0.0
    reconstruct(store, tmp_path / "out", epochs="all", raw=True)
    for t, sd in enumerate(sds):
        got = load_file(tmp_path / "out" / f"epoch_{t + 1}.safetensors")
        for name, tensor in sd.items():
            assert got[name].dtype == tensor.dtype, (t, name)
            same = got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            assert torch.equal(*same), (t, name)
