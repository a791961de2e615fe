"""Commands that do not compute on tensors never import torch (issue 14, fixed costs:
importing torch costs ~2.5 s of CPU per process on the 2-core machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cmdtool.store.layout import EpochInfo, ParamInfo
from cmdtool.store.trajectory import TrajectoryStore

# Runs each command in this one fresh process, then reports what got imported.
PROBE = r"""
import json, sys
from cmdtool.cli.app import app
import cmdtool.cli  # registers every command, as `cmdtool` does
out = {}
for args in json.loads(sys.argv[1]):
    try:
        app(args, prog_name="cmdtool")
        code = 0
    except SystemExit as exc:
        code = exc.code
    out[" ".join(args)] = [code, "torch" in sys.modules]
sys.stderr.write("\nPROBE " + json.dumps(out) + "\n")
"""

COMMANDS = ["ingest", "decompose", "reconstruct", "report", "run", "watch", "compare"]


def test_non_tensor_commands_do_not_import_torch(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    st = TrajectoryStore.create(path, [ParamInfo("w", (64,), "float32", 0)])
    for t in range(3):
        st.append_epoch(
            [(0, np.full(64, t, np.float32))],
            EpochInfo(label=t, source=f"e{t}", kind="safetensors", size=0, mtime_ns=0, sha256=""),
        )
    st.close()
    runs = [
        ["--version"],
        ["--help"],
        ["info", str(path)],
        ["info", str(path), "--json"],
        ["verify", str(path)],
        *[[c, "--help"] for c in COMMANDS],
    ]
    r = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(runs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("PROBE "))
    got = json.loads(line[len("PROBE ") :])
    assert {k: v[0] for k, v in got.items()} == {" ".join(a): 0 for a in runs}, r.stderr
    assert [k for k, v in got.items() if v[1]] == [], "torch imported by: " + line
