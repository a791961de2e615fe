"""The command line end to end: real processes, exit codes, one-line errors, --json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import LAYOUT, n_modeled, planted, run_cli, state_dicts, tree_digest, write_run

cli = run_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "run"
    w, _, _ = planted(n_modeled(), 8, 3, seed=9)
    write_run(folder, state_dicts(w))
    return folder


def test_ingest_decompose_reconstruct_info_json(run_dir, tmp_path):
    store = tmp_path / "s.zarr"
    r = cli("ingest", run_dir, store, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["added"] == list(range(1, 9)) and summary["n_params"] == n_modeled()

    r = cli("decompose", store, "--modes", "3", "--samples", "300", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["n_modes"] == 3 and sum(d["mode_sizes"]) == n_modeled()
    assert 0 <= d["relative_error"] < 0.05 and d["seconds"] > 0

    r = cli("reconstruct", store, tmp_path / "out", "--epochs", "2:5")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "epoch_2.safetensors",
        "epoch_3.safetensors",
        "epoch_4.safetensors",
    ]
    assert set(load_file(tmp_path / "out" / "epoch_3.safetensors")) == {n for n, _, _ in LAYOUT}

    r = cli("info", store, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["n_epochs"] == 8 and info["labels"] == list(range(1, 9))
    assert info["decompositions"][0]["name"] == "cmd" and info["disk_bytes"] > 0

    r = cli("info", store)  # the human-readable table
    assert r.returncode == 0 and "fc.weight" in r.stdout and "decomposition 'cmd'" in r.stdout


def test_run_makes_store_model_and_last_checkpoint(run_dir, tmp_path):
    r = cli("run", run_dir, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "modes" in r.stdout
    rebuilt = load_file(tmp_path / "out" / "reconstructed" / "epoch_8.safetensors")
    assert rebuilt["bn.num_batches_tracked"].item() == 800  # copied from epoch 8
    assert (tmp_path / "out" / "store.zarr" / "cmd" / "zarr.json").is_file()


def test_pt_format_via_cli(run_dir, tmp_path):
    store = tmp_path / "s.zarr"
    assert cli("ingest", run_dir, store).returncode == 0
    assert cli("decompose", store, "--samples", "200").returncode == 0
    r = cli("reconstruct", store, tmp_path / "o", "--format", "pt", "--epochs", "last")
    assert r.returncode == 0, r.stderr
    sd = torch.load(tmp_path / "o" / "epoch_8.pt", weights_only=True)
    assert sd["fc.weight"].shape == (40, 64)


def _one_line_error(r, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def store_with_model(run_dir, tmp_path):
    store = tmp_path / "s.zarr"
    assert cli("ingest", run_dir, store).returncode == 0
    assert cli("decompose", store, "--samples", "200", "--modes", "2").returncode == 0
    return store


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["decompose", "{store}", "--modes", "0"], 2, ["modes=0"]),
        (["decompose", "{store}", "--modes", "500", "--samples", "200"], 2, ["modes=500"]),
        (["decompose", "{store}", "--samples", "999999"], 2, ["samples=999999"]),
        (["decompose", "{store}", "--epochs", "50:60"], 2, ["--epochs 50:60"]),
        (["decompose", "{store}", "--epochs", "1:3"], 2, ["at least 3"]),
        (["decompose", "{store}", "--modes", "3", "--threshold", "0.5"], 2, ["not both"]),
        (["decompose", "{store}", "--name", "weights"], 2, ["--name 'weights'"]),
        (["reconstruct", "{store}", "{tmp}/o", "--epochs", "99"], 3, ["epoch 99"]),
        (["reconstruct", "{store}", "{tmp}/o", "--name", "nope"], 3, ["'nope'", "decompose"]),
        (["info", "{tmp}/missing.zarr"], 3, ["missing.zarr"]),
        (["ingest", "{tmp}/no_such_dir", "{store}"], 3, ["no_such_dir"]),
    ],
)
def test_bad_input_one_line_exit_code_store_untouched(
    store_with_model, tmp_path, args, code, needles
):
    before = tree_digest(store_with_model)
    argv = [a.format(store=store_with_model, tmp=tmp_path) for a in args]
    _one_line_error(cli(*argv), code, *needles)
    assert tree_digest(store_with_model) == before


def test_cuda_requested_without_gpu(store_with_model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _one_line_error(cli("decompose", store_with_model, "--device", "cuda"), 7, "no CUDA device")


def test_mismatched_checkpoint_and_unwritable_store(run_dir, tmp_path):
    store = tmp_path / "s.zarr"
    assert cli("ingest", run_dir, store).returncode == 0
    other = tmp_path / "other"
    w, _, _ = planted(10, 9, 1)
    write_run(other, state_dicts(w, [("x", (10,), torch.float32)]))
    before = tree_digest(store)
    _one_line_error(cli("ingest", other, store), 5, "epoch_9.safetensors", "missing")
    assert tree_digest(store) == before
    blocker = tmp_path / "file.zarr"
    blocker.write_text("not a folder")
    _one_line_error(cli("ingest", run_dir, blocker), 6, "file.zarr")
    assert blocker.read_text() == "not a folder"


def test_debug_shows_the_traceback(tmp_path):
    r = cli("--debug", "info", tmp_path / "missing.zarr")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_console_script_and_version():
    exe = Path(sys.executable).with_name("cmdtool")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("cmdtool ")
