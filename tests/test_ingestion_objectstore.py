"""ingest from object-store SOURCEs (s3://) against a real S3-compatible server (moto).

The run is uploaded with boto3 (not cmdtool's client), ingested from ``s3://`` and from
the local folder it came from; the two stores must hold the same bytes.  Requests are
counted in moto's own server (a WSGI middleware around the real app), not mocked.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cmdtool.ingestion import ingest
from tests.conftest import LAYOUT, planted, state_dicts, write_run
from tests.s3server import SECRET_KEY
from tests.trainer_layouts import write_dcp_run, write_hf_run

pytest.importorskip("obstore")
boto3 = pytest.importorskip("boto3")


def upload(folder: Path, bucket: str, prefix: str, endpoint: str) -> int:
    """Put every file under ``folder`` at ``s3://bucket/prefix/<relpath>`` with boto3."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    n = 0
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")
            n += 1
    return n


def arrays(store: Path) -> dict[str, bytes]:
    """Every array of a store as raw bytes, by path (plain zarr)."""
    group = zarr.open_group(store, mode="r")
    out: dict[str, bytes] = {}
    for path, arr in group.members(max_depth=None):
        if isinstance(arr, zarr.Array):
            out[path] = np.ascontiguousarray(arr[...]).tobytes() + str(arr.dtype).encode()
    return out


def meta(store: Path) -> dict:
    """The store's cmdtool attribute without what differs by origin (mtime, sha256 and
    the recorded folder): a listed object has its upload time, and is not hashed."""
    m = json.loads(json.dumps(dict(zarr.open_group(store, mode="r").attrs["cmdtool"])))
    m.pop("source_roots", None)
    for e in m.get("epochs", []):
        e.pop("mtime_ns", None)
        e.pop("sha256", None)
    return m


def assert_same_store(a: Path, b: Path) -> None:
    got, want = arrays(a), arrays(b)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k] == want[k], k
    assert meta(a) == meta(b)


@pytest.fixture
def sds() -> list[dict[str, torch.Tensor]]:
    n = sum(int(np.prod(s)) for _, s, dt in LAYOUT if dt.is_floating_point)
    w, _, _ = planted(n, 4, 2, seed=3)
    return state_dicts(w)


def write_sharded_bin_run(root: Path, sds: list[dict[str, torch.Tensor]], n: int) -> None:
    """HF Trainer ``checkpoint-<step>/`` folders of ``n`` ``pytorch_model-*-of-*.bin``
    shards each (``torch.save``) and their ``pytorch_model.bin.index.json``."""
    for e, sd in enumerate(sds, start=1):
        folder = root / f"checkpoint-{e * 5}"
        folder.mkdir(parents=True)
        names = list(sd)
        weight_map = {}
        for i in range(n):
            part = names[i * len(names) // n : (i + 1) * len(names) // n]
            shard = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
            torch.save({k: sd[k].contiguous() for k in part}, folder / shard)
            weight_map.update(dict.fromkeys(part, shard))
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )


@pytest.mark.parametrize(
    "kind", ["safetensors", "pt", "ckpt", "hf", "hf-sharded", "hf-bin", "bin-sharded", "dcp"]
)
def test_ingest_from_s3_equals_local(kind, sds, s3_bucket, s3_server, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"  # skeleton and temporary copies: all removed after
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    run = tmp_path / "run"
    sds = sds if kind == "safetensors" else sds[:2]  # fewer uploads where a run has many files
    if kind == "safetensors":
        write_run(run, sds)
    elif kind in ("pt", "ckpt"):
        write_run(run, sds, name=lambda e: f"epoch_{e}.{kind}")
    elif kind == "bin-sharded":
        write_sharded_bin_run(run, sds, 3)
    elif kind == "dcp":
        write_dcp_run(run, sds)
    else:
        names = sorted(sds[0])
        shards = [names[:3], names[3:]] if kind == "hf-sharded" else None
        write_hf_run(run, sds, shards=shards, bin_format=kind == "hf-bin")
    upload(run, s3_bucket, "runs/a", s3_server.endpoint)
    local, remote = tmp_path / "local.zarr", tmp_path / "remote.zarr"
    want = ingest(run, local)
    got = ingest(f"s3://{s3_bucket}/runs/a", remote)
    assert got.added == want.added and len(got.added) == len(sds)
    assert got.skipped_files == want.skipped_files
    assert_same_store(remote, local)
    attrs = dict(zarr.open_group(remote, mode="r").attrs["cmdtool"])
    assert attrs["source_roots"] == [f"s3://{s3_bucket}/runs/a"]
    assert list(scratch.iterdir()) == []


def test_sharded_bin_is_copied_one_shard_at_a_time(sds, s3_bucket, s3_server, tmp_path,
                                                   monkeypatch):
    """A 3-shard pytorch_model-*.bin checkpoint from s3://: while it is opened and every
    tensor read, at most one shard's copy is on local disk, each shard is copied, the
    tensors are the ones written, and nothing is left after."""
    import tempfile

    from cmdtool.checkpoints.discover import find_checkpoints
    from cmdtool.checkpoints.reader import open_checkpoint
    from cmdtool.checkpoints.remote import mirror

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    write_sharded_bin_run(tmp_path / "run", sds[:1], 3)
    upload(tmp_path / "run", s3_bucket, "bins", s3_server.endpoint)

    def copies() -> list[str]:
        return sorted(f.name for d in scratch.glob("cmdtool-copy-*") for f in d.iterdir())

    seen = []
    got = {}
    with mirror(f"s3://{s3_bucket}/bins") as tree:
        (entry,) = find_checkpoints(tree.root).entries
        with open_checkpoint(entry) as ckpt:
            seen.append(copies())
            for name in ckpt:
                got[name] = ckpt[name].clone()
                seen.append(copies())
        seen.append(copies())
    assert max(len(s) for s in seen) == 1, seen
    assert {s[0] for s in seen if s} == {f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)}
    assert seen[-1] == [] and list(scratch.iterdir()) == []
    assert sorted(got) == sorted(sds[0])
    for name, tensor in sds[0].items():
        assert torch.equal(got[name], tensor), name


class Counting:
    """WSGI middleware counting the GET requests (and Range headers) moto serves."""

    def __init__(self, app):
        self.app = app
        self.gets: list[tuple[str, str | None]] = []

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "GET":
            self.gets.append((environ.get("PATH_INFO", ""), environ.get("HTTP_RANGE")))
        return self.app(environ, start_response)


@pytest.fixture
def counted_server(monkeypatch, s3_server):
    """A second real moto server (own port, own thread) behind a counting middleware."""
    import threading

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    counting = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counting, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    yield endpoint, counting
    server.shutdown()
    thread.join()


def test_safetensors_read_by_ranges(counted_server, tmp_path):
    endpoint, counting = counted_server
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/ranged", method="PUT"))
    n = 512 * 1024  # one 2 MiB tensor per file (past the 1 MiB first read) and a small one
    w, _, _ = planted(n + 40, 3, 2, seed=1)
    run = tmp_path / "run"
    sds = [
        {
            "big": torch.tensor(w[:n, t], dtype=torch.float32),
            "empty": torch.zeros(0, 3),
            "small": torch.tensor(w[n:, t], dtype=torch.float32),
        }
        for t in range(3)
    ]
    files = write_run(run, sds)
    upload(run, "ranged", "r", endpoint)
    counting.gets.clear()
    ingest("s3://ranged/r", tmp_path / "s.zarr")
    ingest(run, tmp_path / "local.zarr")
    assert_same_store(tmp_path / "s.zarr", tmp_path / "local.zarr")
    object_gets = [g for g in counting.gets if g[0].startswith("/ranged/r/")]
    # every object request is a ranged GET; nothing fetched the whole files at once
    assert object_gets and all(rng is not None for _, rng in object_gets)
    fetched = 0
    for _, rng in object_gets:
        lo, hi = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        fetched += hi - lo + 1
    sizes = sum(f.stat().st_size for f in files)
    # the first 1 MiB (header) + the tensors' ranges: each file's bytes at most ~1.5 times
    assert sizes <= fetched <= 1.6 * sizes
    assert len(object_gets) == 2 * 3  # per file: first block (header), the data window
    heads = [g for g in object_gets if g[1].startswith("bytes=0-")]
    assert len(heads) == 3
    # files under 1 MiB: the first block holds header and tensors, one GET per file
    small = [{k: v[:1000].clone() for k, v in sd.items()} for sd in sds]
    write_run(tmp_path / "small", small)
    upload(tmp_path / "small", "ranged", "small", endpoint)
    counting.gets.clear()
    ingest("s3://ranged/small", tmp_path / "small.zarr")
    assert sorted(p for p, _ in counting.gets if p.startswith("/ranged/small/")) == [
        f"/ranged/small/epoch_{e}.safetensors" for e in (1, 2, 3)
    ]


def test_unsupported_scheme_and_missing_bucket(s3_bucket, tmp_path):
    from cmdtool.errors import NotFoundError, UsageError

    with pytest.raises(UsageError, match="ftp://x/y"):
        ingest("ftp://x/y", tmp_path / "s.zarr")
    with pytest.raises(NotFoundError, match="s3://no-such-bucket-here"):
        ingest("s3://no-such-bucket-here/run", tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_network_error_mid_ingest_keeps_committed_epochs_and_resumes(
    sds, s3_server, monkeypatch, tmp_path
):
    """The server goes away after epoch 1 is committed: exit 11 naming the URL, the store
    holds exactly epoch 1, and the next ingest (server back) resumes with 2..4."""
    from moto.server import ThreadedMotoServer

    from cmdtool.errors import ObjectStoreError

    port = _free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CMDTOOL_OBJECTSTORE_RETRIES", "1")
    import urllib.request

    urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{port}/netfail", method="PUT")
    )
    run = tmp_path / "run"
    write_run(run, sds)
    upload(run, "netfail", "r", f"http://127.0.0.1:{port}")
    store = tmp_path / "s.zarr"
    stopped = []

    def stop_after_first(done, total, label):
        if done == 1 and not stopped:
            srv.stop()
            stopped.append(label)

    try:
        with pytest.raises(ObjectStoreError) as info:
            ingest("s3://netfail/r", store, progress=stop_after_first, readers=0)
        assert "s3://netfail/r/epoch_2.safetensors" in str(info.value)
        assert SECRET_KEY not in str(info.value)
        assert info.value.exit_code == 11
        local = tmp_path / "local.zarr"
        ingest(run, local, labels=[1])
        assert_same_store(store, local)  # exactly epoch 1, as committed
    finally:
        srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        srv.start()  # the same process keeps moto's state: the bucket is still there
    try:
        again = ingest("s3://netfail/r", store)
        assert again.added == [2, 3, 4] and again.skipped == [1]
        full = tmp_path / "full.zarr"
        ingest(run, full)
        assert_same_store(store, full)
    finally:
        srv.stop()


def _cli(*args: object):
    from typer.testing import CliRunner

    from cmdtool.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_source_url_errors(s3_bucket, tmp_path):
    """`cmdtool ingest URL STORE`: the URL reaches the library intact; bad ones are one
    line with the documented exit code, never the secret, and no store is left."""
    store = tmp_path / "s.zarr"
    for url, code, says in [
        ("ftp://h/run", 2, "error: SOURCE ftp://h/run: unsupported URL scheme 'ftp'"),
        ("s3://no-such-bucket-y/run", 3, "error: s3://no-such-bucket-y/run: the bucket does"),
        (f"s3://{s3_bucket}/empty", 3, f"checkpoint folder not found: s3://{s3_bucket}/empty"),
    ]:
        r = _cli("ingest", url, store)
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert r.exit_code == code, r.output
        assert len(lines) == 1 and says in lines[0], r.output
        assert SECRET_KEY not in r.output and "Traceback" not in r.output
    assert not store.exists()


def test_torch_copy_removed_and_bad_file_names_url(sds, s3_bucket, s3_server, tmp_path,
                                                   monkeypatch):
    """A .pt is copied to a temporary file for torch.load and the copy is removed after,
    also when the file is refused (exit 4, naming the object's URL); the store is as
    before the failing ingest."""
    import tempfile

    from cmdtool.errors import CheckpointError

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    run = tmp_path / "run"
    paths = write_run(run, sds[:3], name=lambda e: f"epoch_{e}.pt")
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])  # truncated zip
    upload(run, s3_bucket, "t", s3_server.endpoint)
    store = tmp_path / "s.zarr"
    ingest(run, store, labels=[1])
    before = arrays(store), meta(store)
    with pytest.raises(CheckpointError) as info:
        ingest(f"s3://{s3_bucket}/t", store)
    assert f"s3://{s3_bucket}/t/epoch_3.pt" in str(info.value)
    assert str(scratch) not in str(info.value)
    assert info.value.exit_code == 4
    assert (arrays(store), meta(store)) == before
    assert list(scratch.iterdir()) == []  # skeleton and copies gone


def test_cli_watch_refuses_url(tmp_path):
    r = _cli("watch", "s3://bkt/run", tmp_path / "s.zarr", "--until-idle", "1")
    assert r.exit_code == 2, r.output
    assert "watch s3://bkt/run: SOURCE must be a local folder" in r.output
    assert not (tmp_path / "s.zarr").exists()
