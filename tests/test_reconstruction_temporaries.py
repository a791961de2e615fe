"""What ``cmdtool reconstruct`` removes from OUT (issue 11): only the temporaries that a
reconstruct which is gone created (named with its host, pid and a random token), never a
user's file that merely looks like one, nor a running writer's."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

import pytest

from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from tests.conftest import n_modeled, planted, run_cli, state_dicts, write_run


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rec_tmp")
    w, _, _ = planted(n_modeled(), 4, 2, seed=8)
    write_run(tmp / "run", state_dicts(w))
    store = tmp / "s.zarr"
    ingest(tmp / "run", store)
    CMD(2, n_samples=200).fit(store)
    return store


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_temporaries_of_a_gone_reconstruct_are_removed(fitted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    users = {  # files that only look like temporaries: a user's, a live writer's, ...
        ".epoch_3.tmp": b"notes",
        ".epoch_4.safetensors.k3j_x9a2.tmp": b"an older cmdtool's, or mine",
        f".epoch_2.safetensors.cmdtool-{host}-{os.getpid()}-abc.tmp": b"a live writer's",
        f".epoch_2.safetensors.cmdtool-0badc0de-{_dead_pid()}-abc.tmp": b"another host's",
    }
    for name, data in users.items():
        (out / name).write_bytes(data)
    gone = out / f".epoch_4.safetensors.cmdtool-{host}-{_dead_pid()}-q1w2e3r4.tmp"
    gone.write_bytes(b"half a file")
    r = run_cli("reconstruct", fitted, out, "--epochs", "all")
    assert r.returncode == 0, r.stderr
    assert not gone.exists()
    for name, data in users.items():
        assert (out / name).read_bytes() == data
    assert sorted(p.name for p in out.glob("epoch_*")) == [
        f"epoch_{i}.safetensors" for i in range(1, 5)
    ]
