"""cmdtool.objectstore against a real S3-compatible server (moto, real HTTP + signing):
URL parsing, the operations, and the one-line errors (exit codes, URL named, no secret)."""

from __future__ import annotations

import re
import socket
from types import SimpleNamespace

import pytest

pytest.importorskip("obstore")

from cmdtool.errors import NotFoundError, ObjectStoreError, UsageError
from cmdtool.objectstore import client, ops
from cmdtool.objectstore.url import ObjectURL, is_url, parse
from tests.s3server import SECRET_KEY


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("s3://bkt/runs/a/", ObjectURL("s3", "bkt", "runs/a")),
        ("S3A://bkt", ObjectURL("s3", "bkt", "")),
        ("gs://b/x.safetensors", ObjectURL("gs", "b", "x.safetensors")),
        ("abfss://c/p", ObjectURL("az", "c", "p")),
        ("memory://t/p", ObjectURL("memory", "t", "p")),
    ],
)
def test_parse(url, want):
    assert parse(url) == want
    assert is_url(url)


def test_parse_refuses(tmp_path):
    assert not is_url(str(tmp_path)) and not is_url("C:\\run") and not is_url("run")
    with pytest.raises(UsageError, match=r"^SOURCE ftp://h/r: unsupported URL scheme 'ftp'"):
        parse("ftp://h/r", what="SOURCE")
    with pytest.raises(UsageError, match="names no bucket"):
        parse("s3:///r")
    with pytest.raises(UsageError, match=re.escape("'..'")):
        parse("s3://b/a/../c")


def test_operations_round_trip(s3_bucket, monkeypatch):
    base = f"s3://{s3_bucket}/p"
    data = bytes(range(256)) * 41  # 10,496 bytes
    etag = ops.put(f"{base}/d/obj.bin", data)
    ops.put(f"{base}/top.json", b"{}")
    listed = ops.list_objects(base)
    assert [(o.key, o.size) for o in listed] == [("d/obj.bin", len(data)), ("top.json", 2)]
    assert listed[0].e_tag == etag and listed[0].mtime_ns > 0
    assert ops.head(f"{base}/d/obj.bin").size == len(data)
    assert ops.get(f"{base}/d/obj.bin") == data
    assert ops.get_range(f"{base}/d/obj.bin", 100, 355) == data[100:355]
    monkeypatch.setattr(ops, "PART_BYTES", 1000)  # long ranges split into parts
    got = ops.get_ranges(f"{base}/d/obj.bin", [0, 5000, 7], [4321, 10496, 7])
    assert [bytes(g) for g in got] == [data[:4321], data[5000:], b""]
    ops.delete(f"{base}/top.json")
    ops.delete(f"{base}/top.json")  # absent is fine
    assert [o.key for o in ops.list_objects(base)] == ["d/obj.bin"]


def test_conditional_puts(s3_bucket):
    url = f"s3://{s3_bucket}/lease"
    first = ops.put(url, b"writer-1 #1", mode="create")
    with pytest.raises(ops.PreconditionFailed, match="lease: changed by another writer"):
        ops.put(url, b"writer-2 #1", mode="create")
    second = ops.put(url, b"writer-1 #2", if_match=first)
    with pytest.raises(ops.PreconditionFailed):
        ops.put(url, b"writer-2 #2", if_match=first)  # stale etag
    assert ops.get(url) == b"writer-1 #2" and ops.head(url).e_tag == second


def test_missing_bucket_and_key(s3_bucket):
    with pytest.raises(NotFoundError, match=r"^s3://no-such-bucket-x/r: the bucket does not"):
        ops.list_objects("s3://no-such-bucket-x/r")
    with pytest.raises(NotFoundError, match=rf"^s3://{s3_bucket}/nope: no such object$") as e:
        ops.get(f"s3://{s3_bucket}/nope")
    assert e.value.exit_code == 3


def test_network_error_is_one_line(s3_bucket, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CMDTOOL_OBJECTSTORE_RETRIES", "0")
    with pytest.raises(ObjectStoreError) as e:
        ops.get(f"s3://{s3_bucket}/x")
    assert str(e.value) == f"s3://{s3_bucket}/x: network error: connection refused"
    assert e.value.exit_code == 11


def test_access_denied(s3_bucket, monkeypatch):
    """moto enforcing authentication (its IAM check): the test key is unknown to it."""
    import moto.settings

    ops.put(f"s3://{s3_bucket}/x", b"1")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(ObjectStoreError) as e:
        ops.get(f"s3://{s3_bucket}/x")
    msg = str(e.value)
    assert msg.startswith(f"s3://{s3_bucket}/x: access denied (InvalidAccessKeyId")
    assert "\n" not in msg and SECRET_KEY not in msg and e.value.exit_code == 11


def test_missing_credentials(s3_bucket, monkeypatch, tmp_path):
    pytest.importorskip("boto3")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ObjectStoreError, match=rf"^s3://{s3_bucket}/x: no credentials found: set"):
        ops.get(f"s3://{s3_bucket}/x")


def test_profile_credentials(s3_bucket, monkeypatch, tmp_path):
    """A named profile in a credentials file, no key in the environment (boto3 resolves)."""
    pytest.importorskip("boto3")
    from tests.s3server import ACCESS_KEY

    creds = tmp_path / "credentials"
    creds.write_text(
        f"[lab]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    ops.put(f"s3://{s3_bucket}/x", b"via env")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    assert ops.get(f"s3://{s3_bucket}/x") == b"via env"


def test_store_cached_per_environment(s3_bucket, monkeypatch):
    a = client.store_for(f"s3://{s3_bucket}/a")
    assert client.store_for(f"s3://{s3_bucket}/b") is a  # one client per bucket
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert client.store_for(f"s3://{s3_bucket}/a") is not a


def test_url_helpers():
    u = parse("s3://b/run")
    assert u.key("x", "/y/") == "run/x/y" and str(u.child("x")) == "s3://b/run/x"
    assert str(parse("s3://b")) == "s3://b" and u.root == "s3://b"


class FakeCredentialServer:
    """A stand-in for the EC2 instance-metadata service (IMDSv2) and the container
    credentials endpoint on 127.0.0.1 (real HTTP, answered by boto3's own providers);
    records every request path. The credentials it hands out are the test server's."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        from tests.s3server import ACCESS_KEY

        creds = json.dumps({
            "Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": ACCESS_KEY,
            "SecretAccessKey": SECRET_KEY, "Token": "tok", "Expiration": "2099-01-01T00:00:00Z",
        }).encode()  # fmt: skip
        paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, body: bytes) -> None:
                paths.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:  # IMDSv2 session token
                self._reply(b"imds-token")

            def do_GET(self) -> None:
                if self.path.endswith("/security-credentials/"):
                    self._reply(b"the-role")
                else:
                    self._reply(creds)

            def log_message(self, *args: object) -> None:
                pass

        self.paths = paths
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def no_credentials(s3_bucket, monkeypatch, tmp_path):
    """The test server's environment without any credential source; the metadata
    endpoint (in the AWS config file, as boto3 reads it) is a local stand-in, and this
    machine's firmware marker is a file the test writes (``client.EC2_MARKERS``)."""
    pytest.importorskip("boto3")
    for key in (
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
        "AWS_EC2_METADATA_DISABLED", "AWS_EC2_METADATA_SERVICE_ENDPOINT", *client.ROLE_VARS,
    ):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    fake = FakeCredentialServer()
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\nec2_metadata_service_endpoint = {fake.url}/\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    vendor = tmp_path / "sys_vendor"
    vendor.write_text("QEMU\n")  # not an EC2 instance, whatever machine runs the test
    monkeypatch.setattr(client, "EC2_MARKERS", ((str(vendor), "amazon ec2"),))
    yield SimpleNamespace(bucket=s3_bucket, fake=fake, vendor=vendor)
    fake.server.shutdown()


def test_no_credentials_is_one_fast_line_for_store_and_source(no_credentials, tmp_path):
    """No key, profile or role anywhere: a STORE and a SOURCE URL each fail at once with
    one line naming the URL and the ways to give credentials (exit 11); the metadata
    endpoint is never asked (nothing says this is an instance)."""
    import time

    from cmdtool.ingestion import ingest
    from tests.conftest import (
        invoke_cli,
        n_modeled,
        one_line_error,
        planted,
        state_dicts,
        write_run,
    )

    bucket = no_credentials.bucket
    write_run(tmp_path / "run", state_dicts(planted(n_modeled(), 2, 1, seed=0)[0]))
    how = (
        "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        "AWS_PROFILE, or AWS_SKIP_SIGNATURE=true for a public bucket"
    )
    began = time.monotonic()
    with pytest.raises(ObjectStoreError) as store_err:
        ingest(tmp_path / "run", f"s3://{bucket}/store")
    with pytest.raises(ObjectStoreError) as source_err:
        ingest(f"s3://{bucket}/run", tmp_path / "s.zarr")
    r = invoke_cli("ingest", f"s3://{bucket}/run", tmp_path / "s.zarr")
    elapsed = time.monotonic() - began
    assert str(store_err.value) == f"s3://{bucket}/store: {how}"
    assert str(source_err.value) == f"s3://{bucket}/run: {how}"
    assert store_err.value.exit_code == source_err.value.exit_code == 11
    one_line_error(r, 11, f"s3://{bucket}/run: {how}")
    assert elapsed < 30, elapsed  # loose: a metadata timeout is what it must not wait for
    assert no_credentials.fake.paths == []
    assert not (tmp_path / "s.zarr").exists()


def test_instance_and_container_roles_still_apply(no_credentials):
    """Where the firmware says EC2 the instance role is asked (IMDSv2); a container
    endpoint the environment names is used without asking the instance metadata."""
    bucket = no_credentials.bucket
    no_credentials.vendor.write_text("Amazon EC2\n")
    ops.put(f"s3://{bucket}/via-instance-role", b"1")
    asked = list(no_credentials.fake.paths)
    assert "PUT /latest/api/token" in asked
    assert "GET /latest/meta-data/iam/security-credentials/the-role" in asked
    no_credentials.vendor.write_text("QEMU\n")
    no_credentials.fake.paths.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{no_credentials.fake.url}/container")
        assert ops.get(f"s3://{bucket}/via-instance-role") == b"1"
    assert no_credentials.fake.paths == ["GET /container"]
