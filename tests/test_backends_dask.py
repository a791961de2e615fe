"""The Dask backend on a real LocalCluster of 2 worker processes: the same results as the
single-process run, and clear errors (nothing published) when the cluster fails."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("distributed")

import dask
from distributed import LocalCluster

import cmdtool.backends.dask
import cmdtool.store.trajectory
from cmdtool.decomposition import CMD
from cmdtool.errors import ClusterError, DeviceError, UsageError
from cmdtool.ingestion import ingest
from cmdtool.reconstruction import reconstruct
from cmdtool.store import TrajectoryStore
from tests.conftest import (
    REPO,
    n_modeled,
    planted,
    run_cli,
    state_dicts,
    tree_digest,
    write_run,
)

CHUNK = 512  # 7 column blocks (N = 3224): several tasks per worker
UNREACHABLE = "tcp://127.0.0.1:9"


def cmd(*, cluster: str | None = None, device: str = "auto") -> CMD:
    """The estimator the tests compare: 4 modes, K = 500, seed 2."""
    return CMD(4, n_samples=500, seed=2, device=device, cluster=cluster)


@pytest.fixture(scope="module")
def cluster(dask_cluster: str) -> Iterator[str]:
    """The session's scheduler (in this process) and its 2 worker processes
    (``tests/conftest.py``: ``dask_cluster``, started once); dask gives up on a block after
    it has been running on 2 workers that died (allowed_failures=1, default 3)."""
    yield dask_cluster


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A planted 4-mode store of 20 epochs, chunked into 7 column blocks, fitted locally
    as ``local`` (device ``auto``, as the workers: the same kind of device, so the results
    must agree bit for bit)."""
    root = tmp_path_factory.mktemp("dask")
    w, _, _ = planted(n_modeled(), 20, 4, seed=7, noise=0.02)
    write_run(root / "run", state_dicts(w))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cmdtool.store.trajectory, "CHUNK", CHUNK)
        ingest(root / "run", root / "s.zarr")
    cmd(device="auto").fit(root / "s.zarr", name="local")
    return root / "s.zarr"


def _assert_same_fit(got: CMD, want: CMD) -> None:
    for key in ("labels_", "a_", "b_", "ref_index_", "sample_index_", "ref_traj_"):
        assert np.array_equal(getattr(got, key), getattr(want, key)), key
    assert got.relative_error_ == want.relative_error_
    assert np.array_equal(got.mode_sizes_, want.mode_sizes_)
    assert np.array_equal(got.mode_errors_, want.mode_errors_)


def _no_partials(store: Path) -> bool:
    return not [p for p in store.iterdir() if p.name.startswith(".partial-")]


def cli(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``cmdtool ARGS`` as a process of its own (``run_cli``: forked from the session's
    fork server, which has not imported dask, so ``DASK_*`` variables in ``env`` apply)."""
    return run_cli(*args, cwd=REPO, env={**os.environ, "COLUMNS": "200", **env})


def test_fit_on_the_cluster_equals_the_local_fit(store: Path, cluster: str) -> None:
    calls: list[tuple[int, int]] = []
    model = cmd(cluster=cluster).fit(
        store, name="dask", progress=lambda done, n: calls.append((done, n))
    )
    assert model.store_.n_params // CHUNK >= 6
    _assert_same_fit(model, CMD.load(store, "local"))
    _assert_same_fit(CMD.load(store, "dask"), CMD.load(store, "local"))
    # auto: each worker's GPU when it has one (this machine's), else its CPU
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.summary_["device"] == kind
    assert CMD.load(store, "dask").summary_["device"] == kind
    assert CMD.load(store, "local").summary_["device"].split(":")[0] == kind
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (model.store_.n_params,) * 2
    assert _no_partials(store)
    assert not list(store.rglob("*.partial"))  # no zarr temporaries either


def test_reconstruct_on_the_cluster_writes_identical_files(
    store: Path, cluster: str, tmp_path: Path
) -> None:
    for raw in (False, True):
        here, there = tmp_path / f"local-{raw}", tmp_path / f"dask-{raw}"
        a = reconstruct(store, here, epochs="all", name="local", raw=raw)
        b = reconstruct(store, there, epochs="all", name="local", raw=raw, cluster=cluster)
        assert [Path(f).name for f in a.files] == [Path(f).name for f in b.files]
        assert b.files == [str(there / Path(f).name) for f in a.files]
        assert len(a.files) == 20
        assert tree_digest(here) == tree_digest(there)


def test_cli_decompose_and_reconstruct_with_cluster(
    store: Path, cluster: str, tmp_path: Path
) -> None:
    r = cli("decompose", store, "--modes", "4", "--samples", "500", "--seed", "2",
            "--name", "cli", "--cluster", cluster, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    _assert_same_fit(CMD.load(store, "cli"), CMD.load(store, "local"))
    r = cli("reconstruct", store, tmp_path / "out", "--name", "cli", "--cluster", cluster)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "epoch_20.safetensors").is_file()


def test_unreachable_scheduler_is_a_cluster_error(store: Path, tmp_path: Path) -> None:
    # nothing listens on port 9: refused at once, retried until the connect timeout
    before = tree_digest(store)
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "0.2s"}),
        pytest.raises(
            ClusterError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"
        ),
    ):
        cmd(cluster=UNREACHABLE).fit(store, name="local")
    assert tree_digest(store) == before
    r = cli("decompose", store, "--name", "local", "--cluster", UNREACHABLE,
            DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="0.2s")  # fmt: skip
    assert r.returncode == 8, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "tcp://127.0.0.1:9" in lines[0]
    assert tree_digest(store) == before
    r = cli("reconstruct", store, tmp_path / "out", "--name", "local", "--cluster", UNREACHABLE,
            DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="0.2s")  # fmt: skip
    assert r.returncode == 8, (r.returncode, r.stderr)
    assert not list((tmp_path / "out").glob("epoch_*"))


def test_usage_errors_before_any_connection(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = tree_digest(store)
    # object-store URLs reach the workers (tests/test_cli_objectstore.py); an in-process
    # memory:// store or an unknown scheme cannot, and is refused before any connection
    with pytest.raises(UsageError, match="memory:// store lives in this process only"):
        CMD(cluster="local").fit("memory://run.zarr")
    with pytest.raises(UsageError, match=r"ftp://bucket/run\.zarr: unsupported URL scheme"):
        reconstruct("ftp://bucket/run.zarr", "out", cluster="local")
    with pytest.raises(UsageError, match="not a usable scheduler address"):
        cmd(cluster="no-port").fit(store)
    with pytest.raises(UsageError, match="--device 'tpu'"):
        CMD(device="tpu", cluster="local").fit(store)
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(UsageError, match=r'pip install "cmdtool\[dask\]"'):
        cmd(cluster="local").fit(store)
    assert tree_digest(store) == before


def test_a_scheduler_without_workers(store: Path, cluster: str) -> None:
    before = tree_digest(store)
    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty,
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(ClusterError, match="has no worker"),
    ):
        cmd(cluster=empty.scheduler_address).fit(store)
    assert tree_digest(store) == before


def test_a_device_the_workers_lack(store: Path, cluster: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("the workers of this machine have a GPU: --device cuda works on them")
    before = tree_digest(store)
    with pytest.raises(DeviceError, match=r"columns .* on worker tcp://.*no CUDA device"):
        cmd(device="cuda", cluster=cluster).fit(store)
    TrajectoryStore.open(store, mode="r+").close()  # a write still in flight is dropped
    assert tree_digest(store) == before


def test_a_failing_task_publishes_nothing(
    store: Path, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = CMD.load(store, "local")
    labels = previous.labels_

    def boom(start: int, stop: int) -> None:
        if start == 2 * CHUNK:
            raise RuntimeError("boom")

    monkeypatch.setattr(cmdtool.backends.dask, "_before_block", boom)
    with pytest.raises(ClusterError, match=r"columns 1024:1536 on worker .* RuntimeError: boom"):
        CMD(3, n_samples=300, cluster=cluster).fit(store, name="local")
    kept = CMD.load(store, "local")
    assert kept.n_modes_ == 4 and np.array_equal(kept.labels_, labels)
    TrajectoryStore.open(store, mode="r+").close()  # a write still in flight is dropped here
    assert _no_partials(store)


def test_a_worker_lost_once_is_recomputed(
    store: Path, cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "killed-once"

    def die_once(start: int, stop: int) -> None:
        if start == 3 * CHUNK and not marker.exists():
            marker.touch()
            os._exit(1)  # the worker process dies mid-run; its nanny starts a new one

    monkeypatch.setattr(cmdtool.backends.dask, "_before_block", die_once)
    model = cmd(cluster=cluster).fit(store, name="retried")
    assert marker.exists()
    _assert_same_fit(model, CMD.load(store, "local"))
    assert _no_partials(store)


def test_a_worker_lost_mid_run_keeps_the_previous_result(
    store: Path, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = tree_digest(store / "local")

    def die(start: int, stop: int) -> None:
        if start == 4 * CHUNK:
            os._exit(1)  # every worker that runs this block dies

    monkeypatch.setattr(cmdtool.backends.dask, "_before_block", die)
    # usually names 2048:2560; a block queued on the same worker twice may be given up first
    with pytest.raises(ClusterError, match=r"columns \d+:\d+: workers died running it"):
        CMD(3, n_samples=300, cluster=cluster).fit(store, name="local")
    assert tree_digest(store / "local") == previous
    assert "local" in TrajectoryStore.open(store).result_names()
    TrajectoryStore.open(store, mode="r+").close()  # a write still in flight is dropped here
    assert _no_partials(store)


def _rebuilt(version: Path, store: Path) -> np.ndarray:
    """(T, N) float32: every epoch rebuilt from the results group at ``version``, computed
    here with plain zarr (``a * weights[t, ref_index][labels] + b``)."""
    import zarr

    g = zarr.open_group(version, mode="r")
    w = np.asarray(zarr.open_array(store / "weights", mode="r")[:], dtype=np.float64)
    labels = np.asarray(g["labels"][:], dtype=np.int64)
    a, b = (np.asarray(g[k][:], dtype=np.float64) for k in ("a", "b"))
    ref = w[:, np.asarray(g["ref_index"][:], dtype=np.int64)]
    return (a * ref[:, labels] + b).astype(np.float32)


def test_reconstruct_on_the_cluster_starts_again_when_republished_mid_run(
    store: Path, cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers load the decomposition by name: they must use the version the client
    pinned. A republish after the client loaded it, before the workers do, makes the run
    start again, and every file comes from the new version."""
    import shutil

    import zarr
    from safetensors.numpy import load_file

    from cmdtool.reconstruction import EpochWriter

    s = tmp_path / "s.zarr"
    shutil.copytree(store, s)
    CMD(2, n_samples=200, seed=0, device="cpu").fit(s, name="other")
    old, new = _rebuilt(s / "local", s), _rebuilt(s / "other", s)
    meta = zarr.open_group(s, mode="r").attrs["cmdtool"]
    params = sorted(meta["params"], key=lambda p: p["offset"])  # type: ignore[index]
    # normalization statistics have their own --stats treatment (issue 12), not a*r+b
    cols = np.concatenate(
        [np.arange(p["offset"], p["offset"] + int(np.prod(p["shape"]))) for p in params]
    )
    keep = np.concatenate(
        [np.full(int(np.prod(p["shape"])), "running_" not in p["name"]) for p in params]
    )
    assert cols.tolist() == list(range(len(cols))) and 0 < keep.sum() < len(keep)
    shipped: list[str | None] = []
    getstate = EpochWriter.__getstate__

    def ship(self: EpochWriter) -> dict[str, object]:
        if not shipped:  # a decompose publishes a new 'local' as the tasks leave the client
            with TrajectoryStore.open(s, mode="r+") as w:
                group = w.begin_result("local")
                shutil.copytree(s / "other", s / group.path, dirs_exist_ok=True)
                w.publish_result("local")
        shipped.append(self.generation)
        return getstate(self)

    monkeypatch.setattr(EpochWriter, "__getstate__", ship)
    out = tmp_path / "out"
    reconstruct(s, out, epochs="1:6", name="local", cluster=cluster)
    assert len(set(shipped)) == 2  # the first run was refused by the workers, a second ran
    assert sorted(f.name for f in out.iterdir()) == [f"epoch_{t}.safetensors" for t in range(1, 6)]
    for t in range(5):
        tensors = load_file(str(out / f"epoch_{t + 1}.safetensors"))
        flat = np.concatenate([tensors[p["name"]].ravel() for p in params])
        assert np.array_equal(flat[keep], new[t][keep]), t
        assert not np.array_equal(flat[keep], old[t][keep]), t
