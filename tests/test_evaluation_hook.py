"""The ``--eval`` hook cannot bypass the CI gate (issue 11): a ``SystemExit`` from user
code (``sys.exit``, argparse) is exit 9 with one line, Ctrl-C stays exit 130, and the
help and README say that the file runs as code."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from tests.conftest import (
    REPO,
    n_modeled,
    one_line_error,
    planted,
    run_cli,
    state_dicts,
    tree_digest,
    write_run,
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A planted 6-epoch store with a 2-mode decomposition 'cmd'."""
    tmp = tmp_path_factory.mktemp("hook")
    w, _, _ = planted(n_modeled(), 6, 2, seed=4)
    write_run(tmp / "run", state_dicts(w))
    store = tmp / "s.zarr"
    ingest(tmp / "run", store)
    CMD(2, n_samples=200).fit(store)
    return store


def test_sys_exit_0_in_the_function_fails_the_gate(fitted, tmp_path):
    ev = tmp_path / "ev.py"
    ev.write_text("import sys\n\ndef score(sd):\n    sys.exit(0)\n")
    before = tree_digest(fitted)
    r = run_cli("evaluate", fitted, "--eval", f"{ev}:score", "--fail-if-worse", "acc")
    one_line_error(r, 9, f"{ev}:score", "score() on the raw checkpoint of epoch 1", "sys.exit(0)")
    assert "gate passed" not in r.stdout
    assert tree_digest(fitted) == before  # nothing stored


def test_argparse_at_import_is_exit_9_in_one_line(fitted, tmp_path):
    ev = tmp_path / "train.py"
    ev.write_text(
        "import argparse\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('--lr', type=float, required=True)\n"
        "args = p.parse_args()\n"
        "def score(sd):\n"
        "    return {'acc': 1.0}\n"
    )
    r = run_cli("evaluate", fitted, "--eval", f"{ev}:score", "--fail-if-worse", "acc")
    one_line_error(
        r, 9, f"importing {ev}", "sys.exit(2)", "the following arguments are required: --lr"
    )


def test_module_sees_argv_of_its_own_as_python_file_py_would(fitted, tmp_path):
    # optional arguments only: it parses [file] (no arguments), not cmdtool's command line
    ev = tmp_path / "train.py"
    ev.write_text(
        "import argparse, sys\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('--lr', type=float, default=0.25)\n"
        "args = p.parse_args()\n"
        "ARGV = list(sys.argv)\n"
        "def score(sd):\n"
        "    return {'acc': args.lr, 'argc': float(len(ARGV))}\n"
    )
    r = run_cli("evaluate", fitted, "--eval", f"{ev}:score", "--epochs", "last", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["raw"]["acc"] == [0.25] and got["raw"]["argc"] == [1.0]


def test_ctrl_c_in_user_code_stays_exit_130(fitted, tmp_path):
    started = tmp_path / "started"
    ev = tmp_path / "slow.py"
    ev.write_text(
        "import pathlib, time\n"
        "def score(sd):\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(120)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-m", "cmdtool", "evaluate", str(fitted), "--eval", f"{ev}:score"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), p.communicate()
        os.kill(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


def test_help_and_readme_say_the_file_runs_as_code():
    for command in ("evaluate", "sweep"):
        r = run_cli(command, "--help")
        assert r.returncode == 0
        text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.stdout).split())
        assert "The file is run as code, like 'python file.py'" in text, text
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "`--eval` runs the given file as code, like `python file.py`" in readme
