"""Out of core: decompose and reconstruct a store larger than the memory they may use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from cmdtool.method.sampling import sample_indices
from cmdtool.store import EpochInfo, ParamInfo, TrajectoryStore
from tests.conftest import REPO

N, T = 3_000_000, 50  # 600 MB of float32 trajectory: 1.5 x what the child may allocate
HEADROOM_MB = 400  # what the child may allocate beyond its warmed-up size

CHILD = """
import json, resource, sys
from pathlib import Path
from cmdtool.decomposition import CMD
from cmdtool.reconstruction import reconstruct

big, small, out = sys.argv[1], sys.argv[2], sys.argv[3]
CMD(2, n_samples=100).fit(small)  # warm up: imports, torch threads, zarr's event loop
reconstruct(small, out + "/warm")

def vm_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

base = vm_kb("VmSize") * 1024
limit = base + int(sys.argv[4]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    bytearray(int(sys.argv[5]))  # the whole trajectory would not fit: the limit bites
    bites = False
except MemoryError:
    bites = True
model = CMD(5, n_samples=1000).fit(big)
reconstruct(big, out + "/big")
print(json.dumps({"bites": bites, "n_modes": model.n_modes_,
                  "rel": model.relative_error_, "peak_rss_kb": vm_kb("VmHWM")}))
"""


def _planted_store(path, n, t, seed=0):
    rng = np.random.default_rng(seed)
    profiles = np.cumsum(rng.normal(size=(5, t)), axis=1).astype(np.float32)
    groups = rng.integers(0, 5, size=n)
    a = rng.normal(size=n).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32)
    pool = sample_indices([n], min(n, 16384), seed=0)
    st = TrajectoryStore.create(path, [ParamInfo("w", (n,), "float32", 0)], pool_index=pool)
    for e in range(t):
        row = a * profiles[groups, e] + b
        r = st.begin_epoch()
        for s0, s1 in st.column_blocks():
            st.write_row_block(r, s0, row[s0:s1])
        st.write_pool_row(r, row[pool])
        st.commit_epoch(EpochInfo(label=e + 1, source=f"epoch_{e + 1}"))
    st.close()


def test_decompose_and_reconstruct_stay_out_of_core(tmp_path):
    # guards: the column-block streaming of streaming.local_pass and reconstruct.rebuild_state
    _planted_store(tmp_path / "big.zarr", N, T)
    _planted_store(tmp_path / "small.zarr", 5000, 5, seed=1)
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # keep glibc's per-thread arenas bounded
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "big.zarr"),
            str(tmp_path / "small.zarr"),
            str(tmp_path),
            str(HEADROOM_MB),
            str(N * T * 4),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["bites"]  # N x T bytes could not have been held
    assert result["n_modes"] == 5 and result["rel"] < 1e-3
    assert (tmp_path / "big" / "epoch_50.safetensors").stat().st_size > N * 4
