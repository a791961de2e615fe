"""A file system that refuses the write (full disk, file-size limit) during ``cmdtool
reconstruct`` is exit 6 with one line naming the file, and leaves no partial file
(issue 11: it was an internal error, exit 1)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from tests.conftest import run_cli


def _cli(*args: str | Path, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """``cmdtool ARGS`` in a process of its own (:func:`run_cli`); ``limit``: the largest
    file it may write (bytes; RLIMIT_FSIZE with SIGXFSZ ignored: a longer write is EFBIG)."""
    return run_cli(*args, env={**os.environ, "COLUMNS": "250"}, fsize=limit)


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory):
    from tests.conftest import n_modeled, planted, state_dicts, write_run

    base = tmp_path_factory.mktemp("write")
    w, _, _ = planted(n_modeled(), 6, 2, seed=2)
    write_run(base / "run", state_dicts(w))
    ingest(base / "run", base / "store")
    CMD(2, n_samples=200).fit(base / "store")
    return base / "store"


def _check_refused(r: subprocess.CompletedProcess[str], out: Path, reason: str) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 6, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: cannot write "), r.stderr
    assert reason in lines[0] and "epoch_" in lines[0], lines[0]
    assert not [p.name for p in out.iterdir()], "a partial or temporary file was left"


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_refused_write_is_exit_6_not_an_internal_error(decomposed, tmp_path, fmt):
    # guards: reconstruction.write._write_failure (safetensors and torch wrap the OSError)
    out = tmp_path / "out"
    out.mkdir()
    r = _cli("reconstruct", decomposed, out, "--format", fmt, limit=4096)
    _check_refused(r, out, "File too large")


def test_a_full_disk_is_exit_6(decomposed, tmp_path):
    # a real ENOSPC: a 64 KiB tmpfs (needs the right to mount; skipped otherwise)
    out = tmp_path / "full"
    out.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        for fmt in ("safetensors", "pt"):
            (out / "filler").write_bytes(b"\0" * 56_000)  # 8 KiB left: less than one checkpoint
            r = _cli("reconstruct", decomposed, out, "--format", fmt)
            (out / "filler").unlink()
            _check_refused(r, out, "No space left on device")
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)
