"""A trajectory store on an object store (issue 17), against a real S3-compatible server
(moto's, tests/s3server.py): the same values as a local run, read by plain zarr, the
commit / publish / lease protocol without rename or flock, damage found, not zeroed.

One 4-epoch run and one s3 store (+ its local twin) are built per module; tests that
only read share them, tests that change a store work on a server-side copy."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("obstore")

import obstore
import zarr
import zarr.storage
from obstore.store import from_url

import cmdtool.store.trajectory
from cmdtool.decomposition import CMD
from cmdtool.errors import StoreError, StoreNotFoundError
from cmdtool.ingestion import ingest
from cmdtool.reconstruction import reconstruct
from cmdtool.store import TrajectoryStore
from cmdtool.store.layout import EpochInfo
from cmdtool.store.lease import LEASE_NAME
from tests.conftest import (
    invoke_cli,
    n_modeled,
    one_line_error,
    planted,
    state_dicts,
    store_params,
    to_store_order,
    write_run,
)
from tests.s3server import SECRET_KEY, S3Server, create_bucket

CHUNK = 512  # 7 column blocks of N = 3224
T = 4  # epochs of the module's run


def raw_client(bucket: str, prefix: str) -> obstore.store.S3Store:
    """An obstore client of the test's own (not cmdtool's cached one)."""
    return from_url(f"s3://{bucket}/{prefix}", client_options={"allow_http": True})


def plain_weights(bucket: str, prefix: str) -> np.ndarray:
    """``weights`` read with plain zarr over the client library, no cmdtool."""
    group = zarr.open_group(zarr.storage.ObjectStore(raw_client(bucket, prefix)), mode="r")
    return np.asarray(group["weights"][:])


def keys(bucket: str, prefix: str) -> list[str]:
    return sorted(m["path"] for b in obstore.list(raw_client(bucket, prefix)) for m in b)


def copy_store(bucket: str, src: str, dst: str) -> str:
    """A server-side copy of every object under ``src`` to ``dst``; returns its URL."""
    whole = raw_client(bucket, "")
    for key in keys(bucket, src):
        if key != LEASE_NAME:
            obstore.copy(whole, f"{src}/{key}", f"{dst}/{key}")
    return f"s3://{bucket}/{dst}"


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def built(
    s3_server: S3Server, s3_module_env: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    """The module's run (T epochs), its s3 store (ingested in two parts: append) and the
    same run ingested into a local store."""
    s3_module_env.setattr(cmdtool.store.trajectory, "CHUNK", CHUNK)
    tmp = tmp_path_factory.mktemp("s3store")
    w, _, _ = planted(n_modeled(), T, 3, seed=3)
    write_run(tmp / "run", state_dicts(w))
    bucket = create_bucket(s3_server.endpoint)
    url = f"s3://{bucket}/runs/a"
    first = ingest(tmp / "run", url, labels=[1, 2])
    second = ingest(tmp / "run", url)
    ingest(tmp / "run", tmp / "local.zarr")
    return SimpleNamespace(
        run=tmp / "run", w=w, bucket=bucket, url=url, local=tmp / "local.zarr",
        first=first, second=second, tmp=tmp,
    )


def test_s3_store_equals_the_local_run(built: SimpleNamespace, tmp_path: Path) -> None:
    url = built.url
    assert built.first.created and built.first.added == [1, 2]
    assert not built.second.created and built.second.added == [3, 4]
    # plain zarr over the client library reads the same rows as the planted values
    got = plain_weights(built.bucket, "runs/a")
    want = to_store_order(built.w, store_params(built.local)).T.astype(np.float32)
    assert got.shape == (T, n_modeled()) and np.array_equal(got, want)
    with TrajectoryStore.open(url) as st:
        assert st.labels == list(range(1, T + 1)) and st.chunk == CHUNK
    # decompose: the same labels, a, b and errors as the local run
    remote = CMD(3, n_samples=500, seed=2).fit(url, name="eq")
    local = CMD(3, n_samples=500, seed=2).fit(built.local, name="eq")
    for key in ("labels_", "a_", "b_", "ref_index_", "sample_index_"):
        assert np.array_equal(getattr(remote, key), getattr(local, key)), key
    assert remote.relative_error_ == local.relative_error_
    # reconstruct from the s3 store into a local folder: the local run's files
    a = reconstruct(url, tmp_path / "out-s3", epochs="all", name="eq")
    b = reconstruct(built.local, tmp_path / "out-local", epochs="all", name="eq")
    assert [Path(f).name for f in a.files] == [Path(f).name for f in b.files]
    assert len(a.files) == T
    for fa, fb in zip(a.files, b.files, strict=True):
        ta, tb = load_file(fa), load_file(fb)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_update_and_compare_on_s3_equal_the_local_run(
    built: SimpleNamespace, tmp_path: Path
) -> None:
    # update: decompose the first 3 epochs, ingest the 4th, fold it in; as locally
    url = f"s3://{built.bucket}/upd"
    ingest(built.run, url, labels=[1, 2, 3])
    ingest(built.run, tmp_path / "upd.zarr", labels=[1, 2, 3])
    for store in (url, tmp_path / "upd.zarr"):
        r = invoke_cli("decompose", store, "--modes", "3", "--samples", "500", "--seed", "2",
                       "--json")
        assert r.returncode == 0, r.stderr
        ingest(built.run, store)
        r = invoke_cli("update", store, "--json")
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["added"] == [4] and summary["n_epochs"] == T, summary
    remote, local = CMD.load(url), CMD.load(tmp_path / "upd.zarr")
    for key in ("labels_", "a_", "b_", "ref_index_"):
        assert np.array_equal(getattr(remote, key), getattr(local, key)), key
    # compare: the same JSON figures and the same written checkpoints
    outs = []
    for store, out in ((url, tmp_path / "cmp-s3"), (tmp_path / "upd.zarr", tmp_path / "cmp-local")):
        r = invoke_cli("compare", store, "--methods", "pca,ema", "--ranks", "1,2",
                       "--write", out, "--json")
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        for key in ("store", "created", "seconds"):
            result.pop(key, None)
        for row in result["methods"]:  # timings differ; every value must not
            for key in [k for k in row if "second" in k]:
                row.pop(key)
        outs.append((result, out))
    assert outs[0][0] == outs[1][0]
    files_a = sorted(p.relative_to(outs[0][1]) for p in outs[0][1].rglob("*.safetensors"))
    files_b = sorted(p.relative_to(outs[1][1]) for p in outs[1][1].rglob("*.safetensors"))
    assert files_a == files_b and files_a
    for f in files_a:
        assert (outs[0][1] / f).read_bytes() == (outs[1][1] / f).read_bytes(), f


def test_missing_chunk_is_reported_and_never_read_as_zeros(built: SimpleNamespace) -> None:
    url = copy_store(built.bucket, "runs/a", "holed")
    victim = "weights/c/2/3"  # epoch 3, columns 1536:2048
    assert victim in keys(built.bucket, "holed")
    obstore.delete(raw_client(built.bucket, "holed"), victim)
    r = invoke_cli("verify", url, "--json")
    assert r.returncode == 6, (r.stdout, r.stderr)
    problems = json.loads(r.stdout)["problems"]
    assert len(problems) == 1 and "epoch 3" in problems[0], problems
    r = invoke_cli("decompose", url, "--modes", "3", "--samples", "500")
    one_line_error(r, 6, url, "epoch 3")
    assert SECRET_KEY not in r.stderr


def test_commit_is_one_conditional_put_and_rows_beyond_it_are_invisible(
    built: SimpleNamespace,
) -> None:
    bucket = built.bucket
    url = f"s3://{bucket}/st"
    ingest(built.run, url, labels=[1, 2])
    n = n_modeled()
    with TrajectoryStore.open(url, mode="r+") as st:
        row = st.begin_epoch()  # rows written, never committed: a killed ingest
        st.write_row_block(row, 0, np.ones(n, dtype=np.float32))
        partial = st.begin_result("cmd")  # a decomposition never published
        partial.create_array("labels", shape=(4,), dtype="int32")
        st._lock.release()  # type: ignore[union-attr]  # the writer dies here
        st._lock = None
    with TrajectoryStore.open(url) as reader:  # readers see the committed prefix only
        assert reader.labels == [1, 2] and reader.result_names() == []
        assert reader.read_block(np.arange(2), 0, 3).shape == (2, 3)
    assert plain_weights(bucket, "st").shape[0] == 3
    with TrajectoryStore.open(url, mode="r+") as writer:  # the next writer cleans up
        assert writer.weights.shape[0] == 2
    left = keys(bucket, "st")
    assert not [k for k in left if k.startswith(".version-")]
    assert not [k for k in left if k.startswith("weights/c/2/")]
    assert LEASE_NAME not in left  # released on close
    # a root changed behind the writer's back (another writer took over): no commit
    with TrajectoryStore.open(url, mode="r+") as st:
        row = st.begin_epoch()
        st.write_row_block(row, 0, np.zeros(n, dtype=np.float32))
        root = raw_client(bucket, "st")
        doc = json.loads(bytes(obstore.get(root, "zarr.json").bytes()))
        doc["attributes"]["someone"] = "else"
        obstore.put(root, "zarr.json", json.dumps(doc).encode())  # another writer's put
        with pytest.raises(StoreError, match="changed by another writer"):
            st.commit_epoch(EpochInfo(label=3, source="epoch_3.safetensors"))
    with TrajectoryStore.open(url) as reader:
        assert reader.labels == [1, 2]


def test_publish_moves_the_pointer_and_pins_see_the_switch(built: SimpleNamespace) -> None:
    url = copy_store(built.bucket, "runs/a", "pub")
    first = CMD(3, n_samples=500, seed=2).fit(url)
    pin = first.pin_
    assert pin is not None and pin.is_current()
    attrs = zarr.open_group(zarr.storage.ObjectStore(raw_client(built.bucket, "pub"))).attrs
    pointer = attrs["cmdtool_results"]["cmd"]
    assert pointer == {"folder": pin.folder, "generation": pin.generation}
    second = CMD(2, n_samples=500, seed=2).fit(url)
    assert not pin.is_current() and second.pin_ is not None and second.pin_.is_current()
    folders = {
        k.split("/")[0] for k in keys(built.bucket, "pub")
        if k.startswith(".version-cmd-")
    }
    assert folders == {second.pin_.folder}  # the old version was deleted after
    loaded = CMD.load(url)
    assert loaded.n_modes_ == second.n_modes_ and np.array_equal(loaded.labels_, second.labels_)


def test_lease_refuses_a_live_holder_and_takes_over_an_expired_one(
    built: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{built.bucket}/lease"
    ingest(built.run, url, labels=[1])
    other = {"owner": "another-process", "pid": 4242, "host": "elsewhere",
             "command": "cmdtool ingest", "since": "now", "ttl_s": 1.5}
    client = raw_client(built.bucket, "lease")
    obstore.put(client, LEASE_NAME, json.dumps(other).encode(), mode="create")
    with pytest.raises(StoreError) as info:
        TrajectoryStore.open(url, mode="r+")
    assert url in str(info.value) and "pid 4242 on elsewhere" in str(info.value)
    with TrajectoryStore.open(url) as reader:  # readers never block
        assert reader.labels == [1]
    monkeypatch.setenv("CMDTOOL_LEASE_TTL", "0.3")
    deadline = time.monotonic() + 10
    while True:  # the holder stopped renewing: expired after its ttl_s
        try:
            st = TrajectoryStore.open(url, mode="r+")
            break
        except StoreError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with st:
        held = json.loads(bytes(obstore.get(client, LEASE_NAME).bytes()))
        assert held["owner"] != "another-process" and held["ttl_s"] == 0.3
        before = obstore.head(client, LEASE_NAME)["e_tag"]
        wait_for(lambda: obstore.head(client, LEASE_NAME)["e_tag"] != before)  # renewed
        # taken over behind its back: the renewal fails and nothing more is committed
        obstore.put(client, LEASE_NAME, json.dumps(other).encode())
        wait_for(lambda: st._lock.lost)  # type: ignore[union-attr]
        row = st.begin_epoch()
        st.write_row_block(row, 0, np.zeros(st.n_params, dtype=np.float32))
        with pytest.raises(StoreError, match="lease"):
            st.commit_epoch(EpochInfo(label=2, source="epoch_2.safetensors"))
    # the lost writer did not delete the other's lease
    assert json.loads(bytes(obstore.get(client, LEASE_NAME).bytes()))["pid"] == 4242


def test_missing_bucket_and_store(built: SimpleNamespace) -> None:
    with pytest.raises(StoreNotFoundError, match="s3://no-such-bucket-x/run"):
        TrajectoryStore.open("s3://no-such-bucket-x/run")
    with pytest.raises(StoreNotFoundError, match=f"s3://{built.bucket}/nothing"):
        TrajectoryStore.open(f"s3://{built.bucket}/nothing")
