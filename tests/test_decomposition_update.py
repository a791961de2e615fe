"""Online CMD on a store: ``update`` folds new epochs into a decomposition.

The oracle is an independent float64 numpy least-squares fit over the whole window with
the decomposition's own labels and references (tests/cmd_reference.py).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
import zarr.storage

import cmdtool.store.trajectory
from cmdtool.decomposition import CMD
from cmdtool.decomposition.update import ingest_and_update, update
from cmdtool.errors import DecompositionNotFoundError, MismatchError, UsageError
from cmdtool.ingestion import ingest
from cmdtool.store import TrajectoryStore
from tests import cmd_reference as ref
from tests.conftest import (
    REPO,
    n_modeled,
    planted,
    run_cli,
    state_dicts,
    tree_digest,
    write_run,
)

CHUNK = 1000  # rows of several chunks in these small stores
T = 30


@pytest.fixture(scope="module")
def run_template(tmp_path_factory):
    """30 planted epochs on disk; a store of the first 20, decomposed over all 20 (made
    once; each test gets its own copy from :func:`run`)."""
    base = tmp_path_factory.mktemp("update")
    w, _, _ = planted(n_modeled(), T, 4, seed=11, noise=0.02)
    sds = state_dicts(w)
    write_run(base / "run", sds[:20])
    write_run(base / "later", sds)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cmdtool.store.trajectory, "CHUNK", CHUNK)
        ingest(base / "run", base / "s.zarr")
    CMD(4, n_samples=300, seed=1).fit(base / "s.zarr")
    return base, sds


@pytest.fixture
def run(run_template, tmp_path, monkeypatch):
    """30 planted epochs on disk; the store holds the first 20, decomposed over all 20."""
    monkeypatch.setattr(cmdtool.store.trajectory, "CHUNK", CHUNK)
    base, sds = run_template
    for name in ("run", "later", "s.zarr"):  # the store records no path of its own
        shutil.copytree(base / name, tmp_path / name)
    return tmp_path / "s.zarr", tmp_path / "later", sds


def _weights(store) -> np.ndarray:
    """All rows with plain zarr, as float64 (N, T)."""
    return np.asarray(zarr.open_group(store, mode="r")["weights"][:], dtype=np.float64).T


def _oracle(store, rows):
    """a, b and the relative error over ``rows`` with the stored labels and references."""
    g = zarr.open_group(store / "cmd", mode="r")
    labels = np.asarray(g["labels"][:])
    w = _weights(store)[:, rows]
    refs = w[np.asarray(g["ref_index"][:])]
    a, b = ref._affine(w, refs[labels])
    w_hat = a[:, None] * refs[labels] + b[:, None]
    return a, b, np.linalg.norm(w - w_hat) / np.linalg.norm(w)


def _close(x, y, rtol=1e-5):
    return np.abs(np.asarray(x, np.float64) - y).max() <= rtol * np.abs(y).max()


class ReadSpy:
    """Records every key zarr reads from a LocalStore (real zarr underneath)."""

    def __init__(self, monkeypatch):
        self.keys: list[str] = []
        original = zarr.storage.LocalStore.get

        async def get(store, key, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.keys.append(key)
            return await original(store, key, *args, **kwargs)

        monkeypatch.setattr(zarr.storage.LocalStore, "get", get)

    def rows(self, array: str) -> list[int]:
        """Rows read of a (T, ...) array chunked one row per chunk."""
        prefix = f"{array}/c/"
        return [int(k[len(prefix) :].split("/")[0]) for k in self.keys if k.startswith(prefix)]


def test_update_equals_batch_fit_and_reads_only_new_rows(run, monkeypatch, request):
    store, later, _ = run
    before = CMD.load(store)
    # a loaded model refuses to read a version republished after it was loaded
    before_labels = before.labels_
    ingest(later, store)
    # the spy sees zarr-python's store reads; zarrs (the default reader) reads chunk
    # files itself, so count them through zarr-python
    from cmdtool.store import pipeline

    monkeypatch.setenv("CMDTOOL_CODEC_PIPELINE", "zarr-python")
    pipeline.reset()
    request.addfinalizer(pipeline.reset)
    spy = ReadSpy(monkeypatch)
    summary = update(store)
    assert summary.added == list(range(21, 31))
    assert summary.rows_read == 10
    # only rows 20..29 of weights and of the pool were read, each chunk of them once
    n_chunks = -(-n_modeled() // CHUNK)
    read = spy.rows("weights")
    assert set(read) == set(range(20, 30))
    assert sorted(read) == sorted(list(range(20, 30)) * n_chunks)
    assert set(spy.rows("pool")) <= set(range(20, 30))

    after = CMD.load(store)
    a, b, rel = _oracle(store, np.arange(T))
    assert _close(after.a_, a) and _close(after.b_, b)
    assert abs(after.relative_error_ - rel) <= 1e-4 * rel
    # modes, references and labels are those of the first fit
    assert np.array_equal(after.labels_, before_labels)
    assert np.array_equal(after.ref_index_, before.ref_index_)
    assert after.summary_["epochs"] == list(range(1, 31))
    assert after.summary_["rows"] == list(range(T))
    w = _weights(store)
    np.testing.assert_array_equal(after.ref_traj_, w[after.ref_index_].astype(np.float32))


def test_updates_in_steps_equal_one_update(run, tmp_path):
    store, later, sds = run
    twin = tmp_path / "twin.zarr"
    shutil.copytree(store, twin)
    step = tmp_path / "step"
    for upto in (23, 24, 30):
        write_run(step, sds[:upto])
        assert ingest_and_update(step, store)[1].added[-1] == upto
    ingest(later, twin)
    update(twin)
    one, steps = CMD.load(twin), CMD.load(store)
    assert _close(steps.a_, one.a_.astype(np.float64), 1e-6)
    assert _close(steps.b_, one.b_.astype(np.float64), 1e-6)
    assert abs(steps.relative_error_ - one.relative_error_) <= 1e-6 * one.relative_error_
    assert steps.summary_["updates"] == 3


def test_update_keeps_the_stride(tmp_path, monkeypatch):
    monkeypatch.setattr(cmdtool.store.trajectory, "CHUNK", CHUNK)
    w, _, _ = planted(n_modeled(), 25, 3, seed=5)
    sds = state_dicts(w)
    write_run(tmp_path / "run", sds[:12])
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "run", store)
    CMD(3, n_samples=200, epochs="3:", stride=2).fit(store)  # rows 2, 4, ..., 10
    write_run(tmp_path / "run", sds)
    summary = ingest_and_update(tmp_path / "run", store)[1]
    assert summary.added == list(range(13, 26, 2))  # rows 12, 14, ..., 24
    rows = np.arange(2, 25, 2)
    model = CMD.load(store)
    assert model.summary_["rows"] == rows.tolist()
    a, b, _ = _oracle(store, rows)
    assert _close(model.a_, a) and _close(model.b_, b)


def test_up_to_date_changes_nothing(run):
    store, _, _ = run
    before = tree_digest(store)
    summary = update(store)
    assert summary.added == [] and summary.rows_read == 0 and summary.n_epochs == 20
    assert tree_digest(store) == before


def test_partial_fit_fits_first_then_folds(tmp_path, monkeypatch):
    monkeypatch.setattr(cmdtool.store.trajectory, "CHUNK", CHUNK)
    w, _, _ = planted(n_modeled(), 15, 3, seed=2)
    sds = state_dicts(w)
    write_run(tmp_path / "run", sds[:8])
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "run", store)
    model = CMD(3, n_samples=200).partial_fit(store)
    assert model.window_rows_.tolist() == list(range(8))
    write_run(tmp_path / "run", sds)
    ingest(tmp_path / "run", store)
    model.partial_fit(store)
    assert model.window_rows_.tolist() == list(range(15))
    a, b, rel = _oracle(store, np.arange(15))
    assert _close(model.a_, a) and _close(model.b_, b)
    assert abs(model.relative_error_ - rel) <= 1e-4 * rel


def test_constant_reference_and_constant_parameters(tmp_path):
    # parameters constant over the first window that move later: they are in no mode
    # (never a reference, so no mode has a constant reference), and the update keeps them
    # in the constant class: a = 0, b = their mean over the longer window
    n = n_modeled()
    rng = np.random.default_rng(0)
    w = np.repeat(rng.normal(size=(n, 1)), 12, axis=1)  # every parameter constant...
    w[: n // 2] += np.cumsum(rng.normal(size=(n // 2, 12)), axis=1) * 0.1  # ...half of them
    write_run(tmp_path / "run", state_dicts(w[:, :6]))
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "run", store)
    CMD(2, n_samples=100).fit(store)
    w[n // 2 :, 6:] += np.linspace(0.1, 0.6, 6)  # the constant half starts moving
    write_run(tmp_path / "run", state_dicts(w))
    update_summary = ingest_and_update(tmp_path / "run", store)[1]
    assert update_summary.added == list(range(7, 13))
    a, b, _ = _oracle(store, np.arange(12))
    model = CMD.load(store)
    assert np.all(np.isfinite(model.a_))
    w_all = _weights(store)
    const = ref.constant(w_all[:, :6])  # the oracle's own rule, on the first window
    assert const.sum() == n - n // 2 and np.array_equal(model.constant_, const)
    assert _close(model.a_[~const], a[~const]) and _close(model.b_[~const], b[~const])
    assert np.all(model.a_[const] == 0)
    assert _close(model.b_[const], w_all[const].mean(axis=1))


def test_bad_input_changes_nothing(run):
    store, later, sds = run
    before = tree_digest(store)
    bad = dict(sds[20])
    bad["fc.bias"] = torch.zeros(41)
    folder = store.parent / "bad"
    write_run(folder, [*sds[:21], bad], labels=list(range(1, 23)))
    # epoch 21 is fine, epoch 22 has another shape: neither is kept, nothing updated
    with pytest.raises(MismatchError, match=r"epoch_22.safetensors: tensor 'fc.bias'"):
        ingest_and_update(folder, store)
    assert tree_digest(store) == before
    with pytest.raises(DecompositionNotFoundError, match="no decomposition named 'other'"):
        ingest_and_update(later, store, name="other")
    assert tree_digest(store) == before


def test_decomposition_without_running_sums_is_refused(run):
    store, later, _ = run
    ingest(later, store)
    for key in ("sum_w", "sum_w2", "sum_wr"):
        shutil.rmtree(store / "cmd" / key)  # as left by cmdtool before running sums
    before = tree_digest(store)
    with pytest.raises(UsageError, match=r"no running sums.*run 'cmdtool decompose' again"):
        update(store)
    assert tree_digest(store) == before


def test_cli_update_and_ingest_update(run):
    store, later, _ = run
    res = run_cli("ingest", later, store, "--update", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["added"] == list(range(21, 31))
    assert out["update"]["added"] == list(range(21, 31))
    assert out["update"]["n_epochs"] == 30
    res = run_cli("update", store)
    assert res.returncode == 0 and "'cmd' is up to date: 30 epochs" in res.stdout
    res = run_cli("update", store, "--name", "nope")
    assert res.returncode == 3 and res.stderr.count("\n") == 1
    assert "no decomposition named 'nope'" in res.stderr


@pytest.mark.parametrize("kill_at", [1, 4, 8])
def test_killed_update_leaves_old_or_new_decomposition(run, kill_at, fault_server):
    store, later, _ = run
    ingest(later, store)
    old = tree_digest(store / "cmd")
    # `fault_runner.py kill K 0 -- update STORE` in a child of the fork server: a real
    # process, killed by a real SIGKILL at its K-th write
    res = fault_server.run("kill", kill_at, 0, "update", store, cwd=REPO)
    assert res.returncode == -9, res.stderr
    with TrajectoryStore.open(store, mode="r+") as st:  # recovery by the next writer
        assert st.result_names() == ["cmd"]
    assert tree_digest(store / "cmd") == old
    update(store)
    a, b, _ = _oracle(store, np.arange(T))
    model = CMD.load(store)
    assert _close(model.a_, a) and _close(model.b_, b)


def test_update_keeps_constant_parameters_exact(tmp_path):
    # guards: running.coefficients(constant=...) and update._fold's constant mask
    w, _, _ = planted(600, 14, 2, seed=4, noise=0.02)
    w[:90] = 0.3  # constant over the whole run
    w[90:100, 10:] += 1.0  # constant over the first window only, then moving
    w[90:100, :10] = -2.0
    sds = state_dicts(w, [("p", (600,), torch.float32)])
    write_run(tmp_path / "first", sds[:10])
    write_run(tmp_path / "all", sds)
    store = tmp_path / "s.zarr"
    ingest(tmp_path / "first", store)
    CMD(2, n_samples=600).fit(store)
    ingest(tmp_path / "all", store)
    update(store)
    model = CMD.load(store)
    assert model.n_constant_ == 100 and model.mode_sizes_.sum() == 500
    assert np.all(model.a_[:100] == 0)
    assert np.all(model.b_[:90] == np.float32(0.3))  # bit for bit
    # the ten that moved after the window: still in no mode, b = their mean over all 14
    w32 = w.astype(np.float32).astype(np.float64)
    assert np.allclose(model.b_[90:100], w32[90:100].mean(axis=1), rtol=1e-6)
    oracle = ref.fit(w32[:, :10], np.arange(600), n_modes=2)
    assert np.array_equal(oracle["constant"][:100], np.ones(100, dtype=bool))
