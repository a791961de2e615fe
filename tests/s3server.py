"""A real S3-compatible server (moto's) on 127.0.0.1 for the object-storage tests.

Real HTTP and real request signing: the client libraries talk to it exactly as they
talk to S3.  Started once per test session, stopped after; each test gets its own
bucket.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ACCESS_KEY = "cmdtool-test-key"
SECRET_KEY = "cmdtool-test-secret-do-not-log"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """Where the server listens and how to reach it."""

    endpoint: str
    server: object

    def env(self) -> dict[str, str]:
        """Environment variables that point the AWS clients at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
            "AWS_EC2_METADATA_DISABLED": "true",
        }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's threaded S3 server on 127.0.0.1 at a free port."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint=f"http://{host}:{port}", server=server)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty bucket; the environment points the clients at the server.

    Returns the bucket name.  Subprocesses started by the test inherit the
    environment (``os.environ``), so ``cmdtool`` run as a process reaches it too.
    """
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return create_bucket(s3_server.endpoint)


def create_bucket(endpoint: str) -> str:
    """Create a fresh, empty bucket at ``endpoint``; returns its name.

    CreateBucket goes through plain HTTP: moto accepts unsigned requests, and this keeps
    the fixtures independent of the client library under test.
    """
    import urllib.request

    name = f"cmdtool-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(f"{endpoint}/{name}", method="PUT")
    with urllib.request.urlopen(request) as response:  # a local test server
        assert response.status == 200
    return name


@pytest.fixture(scope="module")
def s3_module_env(s3_server: S3Server) -> Iterator[pytest.MonkeyPatch]:
    """The environment pointed at the server for a whole test module (module-scoped
    fixtures build their stores under it); yields the MonkeyPatch to add to."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        yield mp
