"""Every message of the CLI is one line of plain text (issue 11): rich markup, matplotlib
mathtext and control characters in user strings (paths, tensor names, file names), and
epoch labels beyond int64, through the real console script."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import one_line_error, planted, run_cli, state_dicts, write_run

HUGE = 10**20  # a 21-digit epoch label: beyond int64 (9.2e18)
LAYOUT = [
    ("enc[/x].weight", (40, 8), torch.float32),  # rich: a closing tag that opens nothing
    ("$\\frac{a$", (30,), torch.float32),  # matplotlib: mathtext that does not parse
    ("[bold]b[/bold]", (20,), torch.float32),  # rich: would print as a bold "b"
]


def test_plain_shows_control_characters_escaped():
    from cmdtool.cli.app import plain

    assert plain("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert plain("x\x1b[2Jy\x00") == "x\\x1b[2Jy\\x00"
    assert plain("p\u2028q\x85r\x7f") == "p\\u2028q\\x85r\\x7f"
    assert plain("w/mk[/st] $\\frac{a$ é") == "w/mk[/st] $\\frac{a$ é"  # the rest as is


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A 6-epoch run with hostile tensor names and labels HUGE..HUGE+5, in a folder whose
    name is rich markup."""
    base = tmp_path_factory.mktemp("hostile") / "w" / "mk[/st]"
    n = sum(int(np.prod(s)) for _, s, _ in LAYOUT)
    w, _, _ = planted(n, 6, 2, seed=2)
    labels = [HUGE + i for i in range(6)]
    write_run(base / "run", state_dicts(w, LAYOUT), labels=labels)
    return base, labels


def test_markup_mathtext_names_and_huge_labels_end_to_end(hostile):
    base, labels = hostile
    store = base / "s.zarr"
    r = run_cli("ingest", base / "run", store)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"created {store}: +6 epoch(s) ({labels[0]}, ")
    r = run_cli("info", store)
    assert r.returncode == 0, r.stderr
    for name, _, _ in LAYOUT:
        assert name in r.stdout  # printed as written, markup not interpreted
    r = run_cli("decompose", store, "--epochs", f"{labels[1]}:", "--samples", "100", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["epochs"] == labels[1:]
    out = base / "rep"
    r = run_cli("report", store, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"report: {out / 'report.html'} (6 figures" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["epochs"] == labels
    assert sorted(t["name"] for t in rep["tensors"]) == sorted(n for n, _, _ in LAYOUT)
    assert (out / "errors.png").read_bytes().startswith(b"\x89PNG")


def test_error_naming_a_markup_path_is_one_line(tmp_path):
    missing = tmp_path / "w" / "mk[/st]" / "none.zarr"
    one_line_error(run_cli("info", missing), 3, f"{missing}")


def test_newline_in_a_file_name_cannot_forge_lines(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    w, _, _ = planted(8, 1, 1)
    save_file({"w": torch.tensor(w[:, 0], dtype=torch.float32)}, str(run / "epoch_1.safetensors"))
    (run / "epoch_2\nerror: all fine\x1b[2J.safetensors").write_bytes(b"\x08\x00not a header")
    line = one_line_error(
        run_cli("ingest", run, tmp_path / "s.zarr"), 4, "epoch_2\\nerror: all fine\\x1b[2J"
    )
    assert line.startswith("error: ")
    assert not (tmp_path / "s.zarr").exists()  # the failing call created it: removed
