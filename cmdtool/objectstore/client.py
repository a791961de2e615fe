"""An obstore store for a URL, configured from the environment, cached per process.

Credentials and the endpoint come the usual way: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` (an
S3-compatible server), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ALLOW_HTTP``,
``AWS_SKIP_SIGNATURE`` (public buckets), and where no key is in the environment a
profile (``AWS_PROFILE``, ``~/.aws/credentials``, SSO), a web-identity token or a
container role resolved by boto3 when it is installed (obstore's own chain otherwise).
``gs://`` and ``az://`` use obstore's own environment variables (``GOOGLE_*``,
``AZURE_*``).  Nothing here prints or logs any of these values.

Missing credentials are found before any request (:func:`_s3_credentials`): the
instance-metadata endpoint (EC2 instance roles) is asked only where something says it
applies -- ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` is set, or the machine's firmware
names it an EC2 instance (:data:`EC2_MARKERS`) -- and never when
``AWS_EC2_METADATA_DISABLED=true``; elsewhere no credentials is a one-line error at
once, not a metadata timeout.

Retries: ``CMDTOOL_OBJECTSTORE_RETRIES`` (default 3) retries of a failed request with
exponential backoff from 100 ms, at most ``CMDTOOL_OBJECTSTORE_RETRY_TIMEOUT`` seconds
(default 20) per request; then the request fails with a one-line error.
"""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import timedelta
from typing import Any

from cmdtool.errors import CmdtoolError, ObjectStoreError, UsageError
from cmdtool.objectstore.url import ObjectURL, parse

_cache: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()
_TRUE = ("1", "true", "yes", "on")
# Environment variables that change which store a URL means (the cache key hashes them).
_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP", "AWS_SKIP_SIGNATURE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "CMDTOOL_OBJECTSTORE_RETRIES",
    "CMDTOOL_OBJECTSTORE_RETRY_TIMEOUT", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED", "AWS_EC2_METADATA_SERVICE_ENDPOINT",
)
#: Role sources the environment names (web identity: EKS IRSA; container: ECS, EKS Pod
#: Identity): resolved by boto3 / obstore without the instance-metadata endpoint.
ROLE_VARS = (
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
#: Files whose contents say this machine is an EC2 instance (Nitro firmware: vendor
#: "Amazon EC2" or an "i-..." asset tag; Xen: a hypervisor uuid starting "ec2"); read
#: locally, no request.
EC2_MARKERS = (
    ("/sys/devices/virtual/dmi/id/sys_vendor", "amazon ec2"),
    ("/sys/devices/virtual/dmi/id/board_asset_tag", "i-"),
    ("/sys/hypervisor/uuid", "ec2"),
)
_NO_CREDENTIALS = (
    "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or AWS_SKIP_SIGNATURE=true for a public bucket"
)


def _env_fingerprint() -> str:
    """A digest of the configuration environment (never the values themselves)."""
    h = hashlib.sha256()
    for k in _ENV_KEYS:
        h.update(f"{k}={os.environ.get(k, '')}\0".encode())
    return h.hexdigest()


def _retry_config() -> dict[str, Any]:
    try:
        retries = int(os.environ.get("CMDTOOL_OBJECTSTORE_RETRIES", "3"))
        timeout = float(os.environ.get("CMDTOOL_OBJECTSTORE_RETRY_TIMEOUT", "20"))
    except ValueError as exc:
        raise UsageError(
            "CMDTOOL_OBJECTSTORE_RETRIES / CMDTOOL_OBJECTSTORE_RETRY_TIMEOUT must be numbers"
        ) from exc
    return {
        "max_retries": max(0, retries),
        "retry_timeout": timedelta(seconds=max(0.1, timeout)),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=2),
            "base": 2,
        },
    }


def instance_metadata_applies() -> bool:
    """Whether EC2 instance-metadata credentials may be asked for (no request made).

    True when ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` is set or a file of
    :data:`EC2_MARKERS` says this is an EC2 instance; always False when
    ``AWS_EC2_METADATA_DISABLED`` is true.
    """
    env = os.environ
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() in _TRUE:
        return False
    if env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        return True
    for path, starts in EC2_MARKERS:
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                if fh.read(64).strip().lower().startswith(starts):
                    return True
        except OSError:
            continue
    return False


def _s3_credentials(u: ObjectURL) -> Any:
    """The credential provider of an ``s3://`` URL: None where obstore reads them itself
    (keys in the environment, unsigned requests, or -- without boto3 -- a role the
    environment names), else a boto3 provider.

    Raises
    ------
    ObjectStoreError
        No credentials anywhere (exit 11), naming the URL and the ways to give them.
    """
    env = os.environ
    if env.get("AWS_SKIP_SIGNATURE", "").lower() in _TRUE:
        return None
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return None
    if key or secret:
        have, lack = (
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if key
            else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        )  # fmt: skip
        raise ObjectStoreError(f"{u}: {have} is set but {lack} is not")
    imds = instance_metadata_applies()
    try:
        import boto3.session
        import botocore.session
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        if imds or any(env.get(v) for v in ROLE_VARS):
            return None  # obstore's own chain: web identity, container, instance role
        if env.get("AWS_PROFILE"):
            raise ObjectStoreError(
                f"{u}: AWS_PROFILE needs boto3 to be resolved: pip install boto3"
            ) from None
        raise ObjectStoreError(f"{u}: {_NO_CREDENTIALS}") from None
    core = botocore.session.get_session()
    if not imds:  # nothing says this is an instance: no metadata request, no timeout
        core.get_component("credential_provider").remove("iam-role")
    session = boto3.session.Session(botocore_session=core)
    try:
        found = session.get_credentials()
    except Exception as exc:
        raise ObjectStoreError(
            f"{u}: cannot read the AWS credentials ({type(exc).__name__})"
        ) from None
    if found is None:
        raise ObjectStoreError(f"{u}: {_NO_CREDENTIALS}")
    return Boto3CredentialProvider(session)


def store_for(url: str | ObjectURL) -> Any:
    """The obstore store of ``url``'s bucket (keys are bucket-relative: use
    :meth:`ObjectURL.key`), built from the environment and cached per process.

    Parameters
    ----------
    url : str or ObjectURL
        ``s3://bucket/...``; ``memory://NAME`` is an in-process store (one per NAME).

    Raises
    ------
    UsageError
        Unsupported scheme or no bucket (exit 2); the ``s3`` extra is missing.
    ObjectStoreError
        No credentials, or the client cannot be configured (exit 11).
    """
    u = parse(url) if isinstance(url, str) else url
    return _cached(u, u.root)


def store_at(url: str | ObjectURL) -> Any:
    """The obstore store rooted at ``url``'s prefix (keys are relative to it), as
    :func:`store_for` builds and caches it (per URL and environment).

    A ``memory://NAME/PREFIX`` URL is an in-process store of its own (memory stores
    have no prefix). Raises as :func:`store_for`.
    """
    u = parse(url) if isinstance(url, str) else url
    return _cached(u, str(u))


def _cached(u: ObjectURL, target: str) -> Any:
    """The store obstore builds for ``target`` (``u``'s bucket or its prefix), cached by
    ``target`` and the configuration environment."""
    key = (target, _env_fingerprint())
    with _lock:
        found = _cache.get(key)
        if found is not None:
            return found
        try:
            from obstore.store import MemoryStore, from_url
        except ImportError as exc:  # pragma: no cover - the s3 extra is missing
            raise UsageError(f"{u}: object stores need obstore: pip install 'cmdtool[s3]'") from exc
        try:
            if u.scheme == "memory":
                store = MemoryStore()
            else:
                options: dict[str, Any] = {}
                if os.environ.get("AWS_ALLOW_HTTP", "").lower() in _TRUE:
                    options["allow_http"] = True
                kwargs: dict[str, Any] = {}
                if u.scheme == "s3":
                    provider = _s3_credentials(u)
                    if provider is not None:
                        kwargs["credential_provider"] = provider
                    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                        "AWS_ENDPOINT_URL"
                    )
                    if endpoint:
                        kwargs["endpoint"] = endpoint
                store = from_url(  # type: ignore[call-overload]
                    target,
                    client_options=options or None,
                    retry_config=_retry_config(),
                    **kwargs,
                )
        except CmdtoolError:
            raise
        except Exception as exc:
            from cmdtool.objectstore.errors import translate

            raise translate(exc, str(u)) from None
        _cache[key] = store
        return store


def clear_cache() -> None:
    """Forget every cached store (tests that change the environment; after fork)."""
    with _lock:
        _cache.clear()
