"""What ``cmdtool report`` may replace and remove (issue 11): ``--force`` replaces only a
previous report's own files, never a folder holding the store or anything else; the
leftovers of killed report runs are removed by the next run, file by file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmdtool.decomposition import CMD
from cmdtool.errors import UsageError
from cmdtool.ingestion import ingest
from cmdtool.report import write_report
from tests.conftest import (
    n_modeled,
    one_line_error,
    planted,
    run_cli,
    state_dicts,
    tree_digest,
    write_run,
)

FIGURES = {
    "correlation.png",
    "references.png",
    "members.png",
    "bands.png",
    "tensor_modes.png",
    "errors.png",
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A planted 8-epoch store with a 2-mode decomposition 'cmd'."""
    tmp = tmp_path_factory.mktemp("report_folder")
    w, _, _ = planted(n_modeled(), 8, 2, seed=5)
    write_run(tmp / "run", state_dicts(w))
    store = tmp / "s.zarr"
    ingest(tmp / "run", store)
    CMD(2, n_samples=200).fit(store)
    return store


@pytest.fixture(scope="module")
def previous(fitted):
    """A report of ``fitted`` written by cmdtool (copy it before changing it)."""
    out = fitted.parent / "previous"
    write_report(fitted, out)
    return out


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_force_never_replaces_a_folder_holding_the_store(fitted, tmp_path):
    # the case: --out proj, where proj holds the store and a stray report.json
    proj = tmp_path / "proj"
    shutil.copytree(fitted, proj / "store.zarr")
    (proj / "report.json").write_text("{}\n")
    (proj / "notes.txt").write_text("mine\n")
    before = tree_digest(proj)
    r = run_cli("report", proj / "store.zarr", "--out", proj, "--force")
    one_line_error(r, 2, "holds the store", str(proj))
    assert tree_digest(proj) == before


def test_force_refuses_anything_a_report_did_not_write(fitted, previous, tmp_path):
    stray = tmp_path / "stray"  # a stray report.json beside the user's own files
    stray.mkdir()
    (stray / "report.json").write_text("{}\n")
    (stray / "data.csv").write_text("1,2\n")
    before = tree_digest(stray)
    with pytest.raises(UsageError, match=r"'data\.csv'"):
        write_report(fitted, stray, force=True)
    assert tree_digest(stray) == before

    out = tmp_path / "rep"
    shutil.copytree(previous, out)
    manifest = json.loads((out / ".cmdtool-report.json").read_text())
    assert set(manifest["cmdtool_report_files"]) == FIGURES | {"report.html", "report.json"}
    (out / "report.html").write_text("my edits\n")  # edited after cmdtool wrote it
    (out / "todo.txt").write_text("keep\n")
    before = tree_digest(out)
    with pytest.raises(UsageError, match=r"report\.html.*changed"):
        write_report(fitted, out, force=True)
    assert tree_digest(out) == before


def test_next_run_removes_killed_runs_leftovers_only(fitted, tmp_path):
    out = tmp_path / "rep"
    dead = _dead_pid()
    # what a killed report left (the pre-manifest name of the issue, and the current one)
    left_old = tmp_path / f".rep.partial-{dead}"
    left_new = tmp_path / f".rep.partial-{dead}-k2j4h_x1"
    with_user_file = tmp_path / f".rep.partial-{_dead_pid()}"
    running = tmp_path / f".rep.partial-{os.getpid()}-abc"  # a report still running
    for folder in (left_old, left_new, with_user_file, running):
        folder.mkdir()
        (folder / "correlation.png").write_bytes(b"\x89PNG half")
        (folder / "report.json").write_text("{}")
    (with_user_file / "mine.txt").write_text("not cmdtool's\n")
    other = tmp_path / f".other.partial-{dead}"  # another folder's leftover: not ours to judge
    other.mkdir()
    (other / "report.json").write_text("{}")
    r = run_cli("report", fitted, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    assert not left_old.exists() and not left_new.exists()
    assert sorted(p.name for p in with_user_file.iterdir()) == ["mine.txt"]
    assert sorted(p.name for p in running.iterdir()) == ["correlation.png", "report.json"]
    assert other.exists()
    assert {p.name for p in out.iterdir()} == FIGURES | {
        "report.html",
        "report.json",
        ".cmdtool-report.json",
    }
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".rep."))
    assert hidden == sorted([with_user_file.name, running.name])


def test_killed_between_the_renames_puts_the_previous_report_back(fitted, previous, tmp_path):
    out = tmp_path / "rep"
    shutil.copytree(previous, out)
    before = tree_digest(out)
    moved = tmp_path / f".rep.old-{_dead_pid()}"
    out.rename(moved)  # a --force run died after moving the old report away
    with pytest.raises(UsageError, match="pass --force"):
        write_report(fitted, out)  # it is back, and not replaced without --force
    assert not moved.exists()
    assert tree_digest(out) == before


def test_report_inside_the_store_is_refused(fitted):
    before = tree_digest(fitted)
    with pytest.raises(UsageError, match="inside the store"):
        write_report(fitted, Path(fitted) / "rep")
    assert tree_digest(fitted) == before
