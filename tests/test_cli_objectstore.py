"""``cmdtool`` on s3:// stores against the real S3-compatible test server: a killed
ingest (a real process, SIGKILL) resumed exactly, a second writer (a real process)
refused, a network failure mid-ingest, one-line errors that never show the secret,
sweep / watch on a URL, and Dask workers that read the store straight from the bucket.

Commands other than the killed ingest and the second writer run in this process
(``invoke_cli``: the same Typer app, error handling and exit codes)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("obstore")

import obstore
import zarr
import zarr.storage
from obstore.store import from_url

import cmdtool.store.remote
import cmdtool.store.trajectory
from tests.conftest import (
    invoke_cli,
    n_modeled,
    one_line_error,
    planted,
    run_cli,
    state_dicts,
    to_store_order,
    write_run,
)
from tests.s3server import SECRET_KEY, S3Server, create_bucket

T = 4  # epochs of the module's run


def raw_client(bucket: str, prefix: str) -> obstore.store.S3Store:
    return from_url(f"s3://{bucket}/{prefix}", client_options={"allow_http": True})


def root_attrs(bucket: str, prefix: str) -> dict:
    """The root ``zarr.json`` attributes, read with the client library alone."""
    try:
        doc = json.loads(bytes(obstore.get(raw_client(bucket, prefix), "zarr.json").bytes()))
    except FileNotFoundError:
        return {}
    return dict(doc.get("attributes", {}))


def committed(bucket: str, prefix: str) -> int:
    """Epochs committed in the root zarr.json."""
    return len(root_attrs(bucket, prefix).get("cmdtool", {}).get("epochs", []))


def plain_weights(bucket: str, prefix: str) -> np.ndarray:
    group = zarr.open_group(zarr.storage.ObjectStore(raw_client(bucket, prefix)), mode="r")
    return np.asarray(group["weights"][:])


def planted_rows(w: np.ndarray, bucket: str, prefix: str) -> np.ndarray:
    """The planted values in the store's column order (params read with plain zarr)."""
    params = root_attrs(bucket, prefix)["cmdtool"]["params"]
    return to_store_order(w, params).T.astype(np.float32)


def ingest_when_free(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``cmdtool ingest ARGS`` in this process, again while a dead writer's lease has
    not expired yet (exit 6, "being written")."""
    deadline = time.monotonic() + 30
    while True:
        r = invoke_cli("ingest", *args)
        if r.returncode != 6 or "being written" not in r.stderr:
            return r
        assert time.monotonic() < deadline, r.stderr
        time.sleep(0.1)


@pytest.fixture(scope="module")
def built(
    s3_server: S3Server, s3_module_env: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    """A T-epoch run and a 10-epoch run, a bucket, the T-epoch run ingested into it."""
    from cmdtool.ingestion import ingest

    s3_module_env.setattr(cmdtool.store.trajectory, "CHUNK", 512)  # 7 blocks
    tmp = tmp_path_factory.mktemp("s3cli")
    w, _, _ = planted(n_modeled(), T, 3, seed=6)
    write_run(tmp / "run", state_dicts(w))
    w10, _, _ = planted(n_modeled(), 10, 3, seed=5)
    write_run(tmp / "run10", state_dicts(w10))
    bucket = create_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/base"
    ingest(tmp / "run", url)
    return SimpleNamespace(run=tmp / "run", w=w, run10=tmp / "run10", w10=w10,
                           bucket=bucket, url=url, tmp=tmp)


@pytest.fixture(scope="module")
def cluster(built: SimpleNamespace) -> Iterator[str]:
    """A Dask LocalCluster of 2 worker processes, once per module (its scheduler address)."""
    pytest.importorskip("distributed")
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=logging.CRITICAL,
    ) as lc:
        yield lc.scheduler_address


def test_killed_ingest_shows_committed_epochs_and_resumes_exactly(
    built: SimpleNamespace,
) -> None:
    bucket, url = built.bucket, f"s3://{built.bucket}/killed"
    env = {**os.environ, "CMDTOOL_LEASE_TTL": "0.5"}
    proc = subprocess.Popen(  # a real process, killed for real
        [sys.executable, "-m", "cmdtool", "ingest", str(built.run10), url],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while committed(bucket, "killed") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = committed(bucket, "killed")
    assert 2 <= k < 10, k  # killed mid-run, after its first epochs
    r = invoke_cli("info", url, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_epochs"] == k
    r = ingest_when_free(built.run10, url, "--json")  # once the dead writer's lease expired
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["added"] == list(range(k + 1, 11))
    got = plain_weights(bucket, "killed")
    want = planted_rows(built.w10, bucket, "killed")
    assert got.shape == want.shape == (10, n_modeled()) and np.array_equal(got, want)
    assert committed(bucket, "killed") == 10


def test_second_writer_is_refused_naming_the_url_and_holder(built: SimpleNamespace) -> None:
    from cmdtool.ingestion import ingest
    from cmdtool.store import TrajectoryStore

    url = f"s3://{built.bucket}/two"
    ingest(built.run, url, labels=[1, 2])
    with TrajectoryStore.open(url, mode="r+"):  # this process writes
        r = run_cli("ingest", str(built.run), url)  # a real second process
        line = one_line_error(r, 6, url, f"pid {os.getpid()}", "being written")
        assert SECRET_KEY not in r.stderr
        r = invoke_cli("info", url, "--json")  # readers never block
        assert r.returncode == 0 and json.loads(r.stdout)["n_epochs"] == 2
    assert "lease" in line
    assert committed(built.bucket, "two") == 2


def test_errors_are_one_line_name_the_url_and_never_the_secret(
    built: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run, bucket = built.run, built.bucket
    r = invoke_cli("info", "s3://no-such-bucket-cmdtool/run")
    outs = [one_line_error(r, 3, "s3://no-such-bucket-cmdtool/run", "bucket")]
    r = invoke_cli("ingest", str(run), "ftp://host/run")
    one_line_error(r, 2, "ftp://host/run", "unsupported")
    r = invoke_cli("decompose", f"s3://{bucket}/nothing")
    outs.append(one_line_error(r, 3, f"s3://{bucket}/nothing"))
    # missing credentials, and no profile file to fall back on
    with monkeypatch.context() as mp:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                    "AWS_PROFILE"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
        r = invoke_cli("ingest", str(run), f"s3://{bucket}/nocreds")
        outs.append(one_line_error(r, 11, f"s3://{bucket}/nocreds"))
    assert committed(bucket, "nocreds") == 0
    # network: nothing listens at the endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    r = invoke_cli("ingest", str(run), f"s3://{bucket}/net")
    outs.append(one_line_error(r, 11, f"s3://{bucket}/net", "connection refused"))
    for err in outs:
        assert SECRET_KEY not in err


def test_access_denied_is_exit_11(built: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    import moto.settings

    # moto checks signatures against its IAM once INITIAL_NO_AUTH_ACTION_COUNT requests
    # were served: 0 turns it on now, and the test key is no IAM user there
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    r = invoke_cli("ingest", str(built.run), f"s3://{built.bucket}/denied")
    line = one_line_error(r, 11, f"s3://{built.bucket}/denied", "denied")
    assert SECRET_KEY not in r.stderr and "InvalidAccessKeyId" in line


def test_network_failure_mid_ingest_keeps_the_committed_epochs_and_resumes(
    built: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:  # a free port of our own
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("CMDTOOL_OBJECTSTORE_RETRIES", "0")
    monkeypatch.setenv("CMDTOOL_LEASE_TTL", "0.5")
    bucket = create_bucket(endpoint)
    url = f"s3://{bucket}/cut"
    cls = cmdtool.store.remote.RemoteTrajectoryStore
    commit = cls._put_meta

    def cut_after_first_commit(self, meta):  # type: ignore[no-untyped-def]
        commit(self, meta)
        if len(meta.get("epochs", [])) == 1:
            server.stop()  # the network goes away right after epoch 1 is committed

    try:
        monkeypatch.setattr(cls, "_put_meta", cut_after_first_commit)
        r = invoke_cli("ingest", str(built.run), url)
        monkeypatch.setattr(cls, "_put_meta", commit)
        one_line_error(r, 11, url)
        assert SECRET_KEY not in r.stderr and "Traceback" not in r.stderr
        # moto keeps its state in this process: the same port serves the same bucket
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        assert committed(bucket, "cut") == 1  # exactly the epoch committed before
        r = invoke_cli("info", url, "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["n_epochs"] == 1, r.stderr
        r = ingest_when_free(built.run, url, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["added"] == list(range(2, T + 1))
        assert np.array_equal(plain_weights(bucket, "cut"), planted_rows(built.w, bucket, "cut"))
    finally:
        server.stop()


def test_sweep_runs_on_a_url_and_leaves_nothing_and_watch_refuses_it(
    built: SimpleNamespace, tmp_path: Path
) -> None:
    from cmdtool.ingestion import ingest

    url = f"s3://{built.bucket}/sweep"
    ingest(built.run, url)
    ingest(built.run, tmp_path / "local.zarr")
    got = []
    for store in (url, tmp_path / "local.zarr"):
        r = invoke_cli("decompose", store, "--modes", "3", "--samples", "500", "--seed", "2")
        assert r.returncode == 0, r.stderr
        r = invoke_cli("sweep", store, "--modes", "1,2", "--json")
        assert r.returncode == 0, r.stderr
        got.append(json.loads(r.stdout))
    for key in ("modes", "n_modes_found", "mode_sizes", "relative_error"):
        assert got[0][key] == got[1][key], key
    pointer = root_attrs(built.bucket, "sweep")["cmdtool_results"]
    assert list(pointer) == ["cmd"]  # the scratch fits were unpointed ...
    folders = {k.split("/")[0] for b in obstore.list(raw_client(built.bucket, "sweep"))
               for m in b for k in [m["path"]] if k.startswith(".")}
    assert folders == {pointer["cmd"]["folder"]}  # ... and deleted
    r = invoke_cli("watch", str(built.run), url, "--until-idle", "0")
    one_line_error(r, 2, url, "local folder")


def test_dask_workers_read_the_bucket_directly(
    built: SimpleNamespace, cluster: str, tmp_path: Path
) -> None:
    from cmdtool.decomposition import CMD
    from cmdtool.reconstruction import reconstruct

    url = built.url
    local = CMD(3, n_samples=500, seed=2).fit(url, name="local")
    remote = CMD(3, n_samples=500, seed=2, cluster=cluster).fit(url, name="dask")
    a = reconstruct(url, tmp_path / "a", epochs="2,3,4", name="local")
    b = reconstruct(url, tmp_path / "b", epochs="2,3,4", name="local", cluster=cluster)
    for key in ("labels_", "a_", "b_", "ref_index_", "sample_index_"):
        assert np.array_equal(getattr(remote, key), getattr(local, key)), key
    assert remote.relative_error_ == local.relative_error_
    loaded = CMD.load(url, "dask")
    assert np.array_equal(loaded.labels_, local.labels_) and np.array_equal(loaded.a_, local.a_)
    assert len(a.files) == 3
    for fa, fb in zip(a.files, b.files, strict=True):
        assert Path(fa).read_bytes() == Path(fb).read_bytes()
