"""The command line as users expect it (issue 13, item 5): ``-h``, flags and defaults in
help, ``--debug`` keeping the exit code, a closed stdout pipe, no wrapping off a terminal,
OUT as one file, the file mode, ``--format pt`` key order, ``run`` taking the decompose
options, and the README's figures for the sample.

Commands run as processes of their own forked from the tests' fork server
(:func:`tests.conftest.run_cli`: the console script's ``main()``); the closed-pipe test
runs the installed ``cmdtool`` script itself, a fresh process with a live pipe."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from tests.conftest import (
    LAYOUT,
    REPO,
    SAMPLE,
    n_modeled,
    planted,
    run_cli,
    state_dicts,
    write_run,
)

#: a long module path: `info`'s tensor table is over 80 columns wide
PREFIX = "encoder.very_long_submodule_name.another_long_block_name."
COMMANDS = [
    "ingest", "update", "info", "verify", "upgrade", "watch", "decompose", "reconstruct",
    "report", "run", "evaluate", "sweep", "compare",
]  # fmt: skip


def console_script() -> list[str]:
    """The installed ``cmdtool`` entry point (``python -m cmdtool`` where there is none)."""
    script = Path(sys.executable).with_name("cmdtool")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cmdtool"]


def cli(*args: str | Path, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """``cmdtool ARGS`` in a process of its own (:func:`run_cli`), stdout/stderr captured
    (never a terminal); no COLUMNS, so that nothing but the tool decides the width."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return run_cli(*args, env=env, umask=umask)


@pytest.fixture(scope="module")
def pt_run(tmp_path_factory):
    """A 5-epoch torch-file run whose int tensor sits between float ones (LAYOUT order), and
    a store of it with a 2-mode decomposition; returns (source folder, store)."""
    root = tmp_path_factory.mktemp("cliapp")
    w, _, _ = planted(n_modeled(), 5, 2, seed=4)
    src = root / "run"
    write_run(src, state_dicts(w, prefix=PREFIX), name=lambda e: f"epoch_{e}.pt")
    store = root / ("long-store-name-" * 6 + "s.zarr")  # a line of `info` over 80 columns
    ingest(src, store)
    CMD(2, n_samples=200).fit(store)
    return src, store


def _help_texts(fault_server) -> dict[str, str]:
    """`cmdtool CMD -h` for every command, through cmdtool.cli.main in one process (a
    `python -c` child of the fork server)."""
    code = (
        "import json, sys, io, contextlib\n"
        "from cmdtool.cli import main\n"
        "out = {}\n"
        f"for c in {COMMANDS!r}:\n"
        "    buf = io.StringIO()\n"
        "    sys.argv = ['cmdtool', c, '-h']\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            main()\n"
        "        except SystemExit as e:\n"
        "            assert e.code in (0, None), (c, e.code)\n"
        "    out[c] = buf.getvalue()\n"
        "sys.__stdout__.write(json.dumps(out))\n"
    )
    r = fault_server.run("python", 0, 0, code, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _options(help_text: str) -> dict[str, str]:
    """{option: its help text, continuation lines joined} from a click-style help page."""
    opts: dict[str, str] = {}
    current = None
    for line in help_text.split("Options:", 1)[1].splitlines():
        m = re.match(r"  (-\w, )?(--[\w-]+)(.*)", line)
        if m:
            current = m.group(2)
            opts[current] = m.group(3)
        elif current and line.startswith("     "):
            opts[current] += " " + line.strip()
    return opts


def test_short_help_flags_and_one_form_of_defaults(fault_server):
    top = cli("-h")
    assert top.returncode == 0, top.stderr
    assert "-h, --help" in top.stdout and "reconstruct" in top.stdout

    texts = _help_texts(fault_server)
    for command, text in texts.items():
        assert "<bool>" not in text, command  # a flag is a flag
        assert "(default" not in text.lower(), command  # one form: "[default: X]"
        for opt, help_ in _options(text).items():
            assert help_.lower().count("default") <= 1, (command, opt, help_)
            assert help_.lower().count("default") == len(re.findall(r"\[default: [^]]+\]", help_))
    dec = _options(texts["decompose"])
    assert dec["--json"].split()[0] == "Print"  # no type column for a flag
    assert "[default: 10]" in dec["--modes"] and "[default: 1000]" in dec["--samples"]
    assert "[default: gated" in dec["--stats"] and "[default: all epochs]" in dec["--epochs"]
    assert "[default: STORE/../report]" in _options(texts["report"])["--out"]
    assert "[default: safetensors, or OUT's suffix]" in _options(texts["reconstruct"])["--format"]
    run = _options(texts["run"])
    for opt in ("--modes", "--threshold", "--samples", "--epochs", "--stride", "--seed",
                "--device", "--stats", "--cluster"):  # fmt: skip
        assert opt in run, opt


def test_debug_adds_the_traceback_and_keeps_the_exit_code(pt_run):
    _, store = pt_run
    debug = cli("--debug", "decompose", store, "--modes", "3", "--threshold", "0.5")
    line = "error: give --modes or --threshold, not both"  # the line without --debug
    assert debug.returncode == 2, debug.stderr  # a usage error's code, not a bug's 1
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert "UsageError" in debug.stderr and debug.stderr.strip().splitlines()[-1] == line


def test_closed_pipe_ends_quietly_with_141(pt_run):
    # the one test here through the installed console script itself (a fresh process,
    # its stdout a live pipe closed under it)
    _, store = pt_run
    p = subprocess.Popen(
        [*console_script(), "info", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()  # the reader is gone before the first line: `| head -0`
    _, err = p.communicate(timeout=300)
    assert (p.returncode, err) == (141, b"")


def test_no_wrapping_when_stdout_is_not_a_terminal(pt_run):
    _, store = pt_run
    r = cli("info", store)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first == f"store {store} (format v2)" and len(first) > 80
    lines = r.stdout.splitlines()
    assert lines[1].startswith("5 epochs, labels 1..5; N = 3,224 modeled parameters")
    assert lines[1].endswith("on disk")
    for name, _shape, dtype in LAYOUT:  # each table row whole on one line, not folded
        row = [line for line in lines if PREFIX + name + " " in line]
        assert len(row) == 1 and str(dtype).removeprefix("torch.") in row[0], (name, lines)


def test_out_file_umask_and_pt_key_order(pt_run, tmp_path):
    src, store = pt_run
    one = tmp_path / "one.pt"
    r = cli("reconstruct", store, one, "--epochs", "3", "--raw", umask=0o027)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.pt"] and one.is_file()
    assert stat.S_IMODE(one.stat().st_mode) == 0o640  # 0666 & ~027, not mkstemp's 0600
    got = torch.load(one, weights_only=True)
    want = torch.load(src / "epoch_3.pt", weights_only=True)
    assert list(got) == [PREFIX + name for name, _, _ in LAYOUT]  # int tensor stays in place
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k

    many = tmp_path / "many.safetensors"
    r = cli("reconstruct", store, many, "--epochs", "all")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"error: OUT {many} names one checkpoint file but --epochs 'all' selects 5 epochs; "
        "give a folder, or select one epoch"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.pt"]  # nothing written


def test_run_takes_the_decompose_options(pt_run, tmp_path):
    src, _ = pt_run
    r = cli("run", src, tmp_path / "out", "--modes", "2", "--samples", "64", "--seed", "5",
            "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["decompose"]
    assert (d["n_modes"], d["samples"], d["seed"]) == (2, 64, 5)


def test_readme_figures_match_the_tool():
    """N of the sample as the tool counts it (every floating tensor of a checkpoint), and
    one spread per mean: the README states each figure one way."""
    with safe_open(SAMPLE / "run" / "epoch_001.safetensors", "pt") as f:
        sizes = {k: int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()}
        floats = {k for k in f.keys() if f.get_slice(k).get_dtype().startswith(("F", "BF"))}
    n = sum(sizes[k] for k in floats)
    stats = sum(sizes[k] for k in floats if re.search(r"running_(mean|var)$", k))
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"N = {n:,} values modeled" in readme and f"{n - stats:,} trainable" in readme
    assert "population standard deviation (numpy's `std`, ddof=0)" in readme
    spreads: dict[str, set[str]] = {}
    for mean, sd in re.findall(r"(0\.9615|0\.9881) ± (\d\.\d{4})", readme):
        spreads.setdefault(mean, set()).add(sd)
    assert spreads == {"0.9615": {"0.0181"}, "0.9881": {"0.0015"}}
