"""evaluate and sweep end to end: real processes, real stores, stored attributes."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner

from cmdtool.cli import app
from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from tests import cmd_reference as ref
from tests.conftest import SAMPLE, run_cli, store_params, to_store_order, tree_digest

DIGITS = f"{SAMPLE / 'digits_cnn.py'}:evaluate"


cli = run_cli


def _attrs(store: Path, name: str = "cmd") -> dict:
    return dict(zarr.open_group(store / name, mode="r").attrs)


@pytest.fixture
def planted_store(planted_run, tmp_path):
    folder, _, _ = planted_run
    store = tmp_path / "s.zarr"
    ingest(folder, store)
    CMD(3, n_samples=200).fit(store)
    return store, folder


def test_sample_raw_accuracy_matches_direct_and_gate_passes(tmp_path):
    store = tmp_path / "s.zarr"
    ingest(SAMPLE / "run", store)
    CMD(10).fit(store)
    r = cli("evaluate", store, "--eval", DIGITS, "--epochs", "51:61", "--json")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed["epochs"] == list(range(51, 61)) and printed["metrics"] == ["accuracy"]
    assert _attrs(store)["cmdtool_evaluation"] == printed

    sys.path.insert(0, str(SAMPLE))
    try:
        import digits_cnn  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(SAMPLE))
    heldout = load_file(SAMPLE / "heldout.safetensors")
    x, y = heldout["x"], heldout["y"]
    for label, acc in zip(printed["epochs"], printed["raw"]["accuracy"], strict=True):
        model = digits_cnn.build_model()
        model.load_state_dict(load_file(SAMPLE / "run" / f"epoch_{label:03d}.safetensors"))
        model.eval()
        with torch.no_grad():
            direct = float((model(x).argmax(dim=1) == y).float().mean())
        assert abs(acc - direct) <= 1e-6

    r = cli("evaluate", store, "--eval", DIGITS, "--epochs", "51:61", "--fail-if-worse", "accuracy")
    assert r.returncode == 0, r.stderr
    assert "gate passed" in r.stdout


GATE_FN = """
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

RUNS = [load_file(p) for p in {paths!r}]


def closeness(state):
    # 0 on a raw epoch (float32 stored exactly), < 0 on any checkpoint that differs
    dist = min(
        sum(float((state[k].double() - ref[k].double()).abs().sum()) for k in ref
            if ref[k].is_floating_point())
        for ref in RUNS
    )
    return {{"closeness": -dist}}
"""


def test_gate_fails_when_cmd_is_worse_and_results_stay(planted_store, tmp_path):
    store, folder = planted_store
    fn_file = tmp_path / "gate_fn.py"
    paths = [str(p) for p in sorted(folder.glob("*.safetensors"))]
    fn_file.write_text(GATE_FN.format(paths=paths))
    r = cli("evaluate", store, "--eval", f"{fn_file}:closeness", "--fail-if-worse", "closeness:0")
    assert r.returncode == 10, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "closeness" in line and "tolerance 0" in line
    stored = _attrs(store)["cmdtool_evaluation"]
    assert stored["function"] == f"{fn_file}:closeness"
    assert stored["raw"]["closeness"] == [0.0] * 12
    assert all(v < 0 for v in stored["cmd"]["closeness"])

    r = cli("evaluate", store, "--eval", f"{fn_file}:closeness", "--fail-if-worse", "nope")
    assert r.returncode == 2 and "nope" in r.stderr


BAD_FNS = """
def boom(state):
    raise RuntimeError("kaput")


def text(state):
    return "not a dict"


def word(state):
    return {"acc": "high"}
"""


def test_bad_targets_exit_9_and_store_unchanged(planted_store, tmp_path):
    store, _ = planted_store
    fn_file = tmp_path / "bad_fns.py"
    fn_file.write_text(BAD_FNS)
    before = tree_digest(store)
    runner = CliRunner()  # in process (a fresh interpreter per target is slow); same app
    for target, says in (
        ("no_such_module_xyz:fn", "No module named"),
        (f"{fn_file}:missing", "no function 'missing'"),
        (f"{fn_file}:boom", "kaput"),
        (f"{fn_file}:text", "returned str"),
        (f"{fn_file}:word", "metric 'acc'"),
    ):
        r = runner.invoke(app, ["evaluate", str(store), "--eval", target, "--epochs", "last"])
        assert r.exit_code == 9, (target, r.output)
        err = r.stderr.strip()
        assert "\n" not in err and target in err and says in err, err
        assert "Traceback" not in r.output
        assert tree_digest(store) == before
    # and in a real process: one line, no traceback
    r = cli("evaluate", store, "--eval", f"{fn_file}:boom")
    assert r.returncode == 9 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert tree_digest(store) == before


def test_sweep_errors_and_no_leftover_groups(planted_store, planted_run, tmp_path):
    # guards: sweep's fits (decomposition cmd's samples, seed and window) and the figures
    # it records, checked against the float64 oracle on the source values
    store, _ = planted_store
    r = cli("sweep", store, "--modes", "1,2,5", "--json")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    stored = _attrs(store)["cmdtool_sweep"]
    assert stored == printed
    assert stored["modes"] == [1, 2, 5] and len(stored["relative_error"]) == 3
    assert len(stored["n_modes_found"]) == 3 and stored["epoch"] == 12
    assert stored["samples"] == 200 and stored["seed"] == 0
    _, w, _ = planted_run
    w = to_store_order(w.astype(np.float32).astype(np.float64), store_params(store))
    samples = zarr.open_group(store / "cmd", mode="r")["sample_index"][:]  # K = 200, seed 0
    for i, m in enumerate([1, 2, 5]):
        oracle = ref.fit(w, samples, n_modes=m)
        sizes = np.bincount(oracle["labels"], minlength=len(oracle["ref_index"]))
        assert stored["n_modes_found"][i] == len(oracle["ref_index"]), m
        # parameters between two near-identical modes may flip (5 of 3224 at M = 5)
        assert np.abs(np.array(stored["mode_sizes"][i]) - sizes).sum() <= 0.005 * len(w), m
        assert stored["relative_error"][i] == pytest.approx(oracle["rel_error"], rel=1e-3), m
    groups = sorted(p.name for p in store.iterdir() if p.is_dir())
    assert groups == ["cmd", "extras", "pool", "pool_index", "weights"]

    r = cli("sweep", store, "--modes", "1,2", "--name", "other")
    assert r.returncode == 3 and "decompose" in r.stderr
