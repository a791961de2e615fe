"""Normalization statistics in rebuilt checkpoints: every --stats treatment, the name rule,
old stores, bad input (issue 12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from cmdtool.reconstruction import rebuild_state
from cmdtool.store.normstats import STATS_CHOICES
from tests import cmd_reference as ref
from tests.conftest import planted, run_cli, state_dicts, tree_digest, write_run

LAYOUT = [
    ("conv.weight", (40, 10), torch.float32),
    ("bn.weight", (40,), torch.float32),
    ("bn.running_mean", (40,), torch.float32),
    ("bn.running_var", (40,), torch.float32),
    ("bn.num_batches_tracked", (), torch.int64),
]
N = 520
T = 16


def _trajectories(seed: int = 0) -> np.ndarray:
    """Planted weights; running_var decays like a moving average from 1 to ~0.05, so an
    affine fit over all epochs goes negative at the first ones."""
    w, _, _ = planted(N, T, 3, seed=seed, noise=0.01)
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    scale = rng.uniform(0.02, 0.08, size=(40, 1))
    w[480:] = scale + (1.0 - scale) * 0.35**t + 0.002 * rng.random((40, T))
    return w


@pytest.fixture
def bn_store(tmp_path):
    w = _trajectories()
    write_run(tmp_path / "run", state_dicts(w, LAYOUT))
    store = tmp_path / "s.zarr"
    summary = ingest(tmp_path / "run", store)
    # safetensors sorts names: bn.num_batches_tracked, bn.running_mean, bn.running_var,
    # bn.weight, conv.weight -> the variances are store columns 40:80
    return store, w, summary


def _var_cols(store) -> tuple[int, int]:
    params = zarr.open_group(store, mode="r").attrs["cmdtool"]["params"]
    p = next(p for p in params if p["name"] == "bn.running_var")
    return p["offset"], p["offset"] + 40


def test_ingest_lists_statistics_and_records_the_pattern(bn_store):
    store, _, summary = bn_store
    assert summary.stats == ["bn.running_mean", "bn.running_var"]
    filters = zarr.open_group(store, mode="r").attrs["cmdtool"]["filters"]
    assert filters["stats"] == r"(^|\.)running_(mean|var)$"
    info = json.loads(run_cli("info", store, "--json").stdout)
    assert info["stats"]["tensors"] == ["bn.running_mean", "bn.running_var"]
    assert info["stats"]["variances"] == ["bn.running_var"]


@pytest.mark.parametrize("stats", STATS_CHOICES)
def test_no_treatment_rebuilds_a_negative_or_nonfinite_variance(bn_store, stats):
    # guards: method.normstats.safe_variances (and each treatment's own values)
    store, _, _ = bn_store
    model = CMD(2, n_samples=300, stats=stats).fit(store)
    assert model.summary_["stats"] == stats
    lo, hi = _var_cols(store)
    # the affine model alone goes negative here (independent float64 oracle)
    wz = np.asarray(zarr.open_group(store, mode="r")["weights"][:], dtype=np.float64).T
    oracle = ref.fit(wz, model.sample_index_, n_modes=2)
    affine = ref.reconstruct(wz, oracle["labels"], oracle["a"], oracle["b"], oracle["ref_index"])
    assert affine[lo:hi].min() < 0
    for label in range(1, T + 1):
        var = rebuild_state(model, label)["bn.running_var"]
        assert torch.isfinite(var).all() and (var >= 0).all(), (stats, label)


def test_raw_and_positive_and_clamp_against_numpy(bn_store):
    # guards: reconstruction.stats.apply_stats (raw copy, exp of the log fit, clip)
    store, w, _ = bn_store
    w32 = w.astype(np.float32).astype(np.float64)
    var = w32[480:]  # (40, T): the var rows of w (layout order)
    model = CMD(3, n_samples=300, stats="positive").fit(store)
    g = zarr.open_group(store / "cmd", mode="r")
    lo, hi = _var_cols(store)
    labels = np.asarray(g["labels"][lo:hi])
    wz = np.asarray(zarr.open_group(store, mode="r")["weights"][:], dtype=np.float64)  # (T, N)
    r = wz[:, np.asarray(g["ref_index"][:])][:, labels]  # (T, 40)
    rc = r - r.mean(axis=0)
    lv = np.log(var.T)
    alpha = (rc * (lv - lv.mean(axis=0))).sum(axis=0) / (rc * rc).sum(axis=0)
    beta = lv.mean(axis=0) - alpha * r.mean(axis=0)
    for label in (1, 8, T):
        t = label - 1
        got = rebuild_state(model, label)["bn.running_var"].numpy()
        assert np.allclose(got, np.exp(alpha * r[t] + beta), rtol=1e-5)
        raw = rebuild_state(model, label, stats="raw")["bn.running_var"].numpy()
        assert np.array_equal(raw, var[:, t].astype(np.float32))
        clamp = rebuild_state(model, label, stats="clamp")["bn.running_var"].numpy()
        assert np.all(clamp >= var.min(axis=1).astype(np.float32))
        assert np.all(clamp <= var.max(axis=1).astype(np.float32))
    assert np.array_equal(np.asarray(g["stats_index"][:]), np.arange(lo - 40, hi))


def test_gated_takes_the_stored_statistics_where_the_model_is_far(bn_store):
    # guards: method.normstats.gate (per tensor, relative error above GATE -> stored)
    from cmdtool.store.normstats import GATE

    store, w, _ = bn_store
    model = CMD(2, n_samples=300).fit(store)
    assert model.summary_["stats"] == "gated"
    var = w.astype(np.float32)[480:]
    seen = set()
    for label in range(1, T + 1):
        m = rebuild_state(model, label, stats="model")["bn.running_var"].numpy().astype(float)
        g = rebuild_state(model, label)["bn.running_var"].numpy()
        raw = var[:, label - 1]
        far = bool(np.linalg.norm(m - raw) > GATE * np.linalg.norm(raw))
        seen.add(far)
        assert np.array_equal(g, raw) if far else np.allclose(g, m, rtol=1e-6)
    assert seen == {True, False}  # both branches taken on this run


def test_store_without_a_recorded_pattern_is_treated_as_model(bn_store):
    store, _, _ = bn_store
    g = zarr.open_group(store, mode="r+")
    meta = dict(g.attrs["cmdtool"])
    meta["filters"] = {"include": None, "exclude": None}  # as written before issue 12
    g.attrs.put({**g.attrs.asdict(), "cmdtool": meta})
    model = CMD(3, n_samples=300).fit(store)
    assert model.summary_["stats"] == "model"
    info = run_cli("info", store)
    assert info.returncode == 0
    assert "the default: the store predates the rule" in info.stdout
    assert "statistics 'model'" in info.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("decompose", "{store}", "--samples", "100", "--stats", "bogus"),
            "--stats 'bogus' is not one of",
        ),
        (("ingest", "{run}", "{store}", "--stats-pattern", "("), "invalid regular expression"),
        (("ingest", "{run}", "{new}", "--stats-pattern", "^nothing$"), "matches none"),
    ],
)
def test_bad_stats_options_exit_2_and_change_nothing(bn_store, args, message):
    store, _, _ = bn_store
    before = tree_digest(store)
    new = store.parent / "new.zarr"
    argv = [a.format(store=store, run=store.parent / "run", new=new) for a in args]
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert tree_digest(store) == before and not new.exists()
