"""The command line end to end: real processes, exit codes, one-line errors, --json."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from cmdtool.ingestion import ingest
from tests import cmd_reference as ref
from tests.conftest import (
    LAYOUT,
    invoke_cli,
    n_modeled,
    one_line_error,
    planted,
    run_cli,
    run_cli_process,
    state_dicts,
    tree_digest,
    write_run,
)

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
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["epoch_8.pt"]
    sd = torch.load(tmp_path / "o" / "epoch_8.pt", weights_only=True)
    src = load_file(run_dir / "epoch_8.safetensors")
    assert set(sd) == set(src)
    for name, tensor in src.items():
        assert sd[name].shape == tensor.shape and sd[name].dtype == tensor.dtype, name
    assert sd["bn.num_batches_tracked"].item() == 800  # copied from epoch 8
    # values: a * r(8) + b from the stored model, read with plain zarr; r from the sources
    g = zarr.open_group(store, mode="r")
    model = {k: np.asarray(g[f"cmd/{k}"][:]) for k in ("labels", "a", "b", "ref_index")}
    params = sorted(g.attrs["cmdtool"]["params"], key=lambda p: p["offset"])
    w8 = np.concatenate([src[p["name"]].reshape(-1).numpy() for p in params])
    want = ref.reconstruct(w8[:, None], **model)[:, 0].astype(np.float32)
    got = np.concatenate([sd[p["name"]].reshape(-1).numpy() for p in params])
    assert np.array_equal(got, want)


@pytest.fixture(scope="module")
def model_template(run_dir, tmp_path_factory):
    """A store of run_dir with a 2-mode decomposition, made once by the CLI."""
    store = tmp_path_factory.mktemp("cli-model") / "s.zarr"
    assert cli("ingest", run_dir, store).returncode == 0
    assert cli("decompose", store, "--samples", "200", "--modes", "2").returncode == 0
    return store


@pytest.fixture
def store_with_model(model_template, tmp_path):
    """A test's own copy of the template (the store records no path of its own)."""
    store = tmp_path / "s.zarr"
    shutil.copytree(model_template, store)
    return store


@pytest.mark.parametrize(
    ("args", "code", "needles", "process"),
    [  # process: through a real `python -m cmdtool` (one per command and exit code);
        # the others call the same Typer app in this process (invoke_cli)
        (["decompose", "{store}", "--modes", "0"], 2, ["modes=0"], True),
        (["decompose", "{store}", "--modes", "500", "--samples", "200"], 2, ["modes=500"], False),
        (["decompose", "{store}", "--samples", "999999"], 2, ["samples=999999"], False),
        (["decompose", "{store}", "--epochs", "50:60"], 2, ["--epochs 50:60"], False),
        (["decompose", "{store}", "--epochs", "1:3"], 2, ["at least 3"], False),
        (["decompose", "{store}", "--modes", "3", "--threshold", "0.5"], 2, ["not both"], False),
        (["decompose", "{store}", "--name", "weights"], 2, ["--name 'weights'"], False),
        (["reconstruct", "{store}", "{tmp}/o", "--epochs", "99"], 3, ["epoch 99"], True),
        (["reconstruct", "{store}", "{tmp}/o", "--name", "nope"], 3, ["'nope'", "decompose"], False),  # noqa: E501
        (["info", "{tmp}/missing.zarr"], 3, ["missing.zarr"], False),
        (["ingest", "{tmp}/no_such_dir", "{store}"], 3, ["no_such_dir"], True),
    ],
)
def test_bad_input_one_line_exit_code_store_untouched(
    store_with_model, tmp_path, args, code, needles, process
):
    before = tree_digest(store_with_model)
    argv = [a.format(store=store_with_model, tmp=tmp_path) for a in args]
    one_line_error((cli if process else invoke_cli)(*argv), code, *needles)
    assert tree_digest(store_with_model) == before


def test_cuda_requested_without_gpu(store_with_model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    one_line_error(cli("decompose", store_with_model, "--device", "cuda"), 7, "no CUDA device")


def test_mismatched_checkpoint_and_unwritable_store(run_dir, tmp_path):
    store = tmp_path / "s.zarr"
    assert cli("ingest", run_dir, store).returncode == 0
    other = tmp_path / "other"
    w, _, _ = planted(10, 9, 1)
    write_run(other, state_dicts(w, [("x", (10,), torch.float32)]))
    before = tree_digest(store)
    one_line_error(cli("ingest", other, store), 5, "epoch_9.safetensors", "missing")
    assert tree_digest(store) == before
    blocker = tmp_path / "file.zarr"
    blocker.write_text("not a folder")
    one_line_error(cli("ingest", run_dir, blocker), 6, "file.zarr")
    assert blocker.read_text() == "not a folder"


def test_debug_shows_the_traceback(tmp_path):
    # guards: handle_errors re-raising under --debug (the same error, with its traceback)
    missing = tmp_path / "missing.zarr"
    plain = cli("info", missing)
    one_line_error(plain, 3, "store not found", "missing.zarr")
    r = cli("--debug", "info", missing)
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):", r.stderr
    assert f"cmdtool.errors.StoreNotFoundError: store not found: {missing}" in lines
    assert 'cmdtool/store/trajectory.py", line' in r.stderr  # where it was raised
    # then the same one line and the same exit code as without --debug
    assert lines[-1] == plain.stderr.strip() and r.returncode == 3


def _with_planted_bug(tmp_path: Path) -> dict[str, str]:
    """An environment whose interpreters start with a bug planted in the library:
    ``TrajectoryStore.open`` raises a plain RuntimeError (no library file is edited)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from cmdtool.store import trajectory\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('planted bug: list index out of range')\n"
        "trajectory.TrajectoryStore.open = classmethod(broken)\n"
    )
    return {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(site)}


def test_internal_error_is_exit_1_through_the_console_script(run_dir, tmp_path):
    # guards: handle_errors' last branch (any other exception: one line, exit 1)
    store = tmp_path / "s.zarr"
    ingest(run_dir, store)
    exe = Path(sys.executable).with_name("cmdtool")
    env = _with_planted_bug(tmp_path)
    before = tree_digest(store)
    r = subprocess.run(
        [str(exe), "decompose", str(store)], capture_output=True, text=True, env=env, timeout=300
    )
    one_line_error(r, 1, "internal error: RuntimeError: planted bug", "--debug")
    r = subprocess.run(
        [str(exe), "--debug", "info", str(store)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("Traceback (most recent call last):")
    assert r.stderr.strip().splitlines()[-1] == "RuntimeError: planted bug: list index out of range"
    assert tree_digest(store) == before


def _bad_epoch(run: Path, kind: str, sd: dict[str, torch.Tensor]) -> tuple[Path, list[str]]:
    """Write epoch 5 of ``run`` as a bad checkpoint; return its path and what the error
    line must name."""
    if kind == "nan":
        sd = {k: v.clone() for k, v in sd.items()}
        sd["fc.bias"][7] = float("nan")
        (path,) = write_run(run, [sd], labels=[5])
        return path, [path.name, "'fc.bias'", "NaN"]
    if kind == "truncated":
        (path,) = write_run(run, [sd], labels=[5])
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
        return path, [path.name]
    # unsafe: a pickled object beside the tensors needs code to be loaded
    path = run / "epoch_5.pt"
    torch.save({**sd, "args": argparse.Namespace(lr=0.1)}, path)
    return path, [path.name, "argparse.Namespace", "--allow-global"]


@pytest.mark.parametrize("kind", ["truncated", "unsafe", "nan"])
def test_bad_checkpoint_is_exit_4_and_the_store_as_it_was(tmp_path, kind):
    # guards: CheckpointError / UnsafeCheckpointError / NonFiniteError -> exit 4 with one
    # line naming the file, and ingest's rollback of the good epoch appended before it
    w, _, _ = planted(n_modeled(), 5, 2, seed=2)
    sds = state_dicts(w)
    suffix = ".pt" if kind == "unsafe" else ".safetensors"
    run = tmp_path / "run"
    write_run(run, sds[:3], name=lambda e: f"epoch_{e}{suffix}")
    store = tmp_path / "s.zarr"
    ingest(run, store)
    before = tree_digest(store)
    write_run(run, sds[3:4], name=lambda e: f"epoch_{e}{suffix}", labels=[4])  # a good one
    _, needles = _bad_epoch(run, kind, sds[4])
    one_line_error(cli("ingest", run, store), 4, *needles)
    assert tree_digest(store) == before


def test_fork_server_child_is_the_fresh_process(tmp_path):
    # guards: tests/fault_runner.py's plain mode and _exit_child (what run_cli runs): the
    # same exit code, stdout and stderr as a freshly started `python -m cmdtool`
    missing = tmp_path / "missing.zarr"
    forked, fresh = run_cli("info", missing), run_cli_process("info", missing)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode, fresh.stdout, fresh.stderr,
    )  # fmt: skip
    one_line_error(forked, 3, "store not found", str(missing))


def test_console_script_and_version():
    # the console script's main() in a process of its own; the installed script itself is
    # run by test_internal_error_is_exit_1_through_the_console_script above and by
    # test_cli_app.py's closed-pipe test
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("cmdtool ")
