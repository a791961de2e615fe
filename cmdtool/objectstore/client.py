"""An obstore store for a URL, configured from the environment, cached per process.

Credentials and the endpoint come the usual way: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL`` (an
S3-compatible server), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ALLOW_HTTP``,
``AWS_SKIP_SIGNATURE`` (public buckets), and where no key is in the environment a
profile (``AWS_PROFILE``, ``~/.aws/credentials``, SSO, instance roles) resolved by boto3
when it is installed.  ``gs://`` and ``az://`` use obstore's own environment variables
(``GOOGLE_*``, ``AZURE_*``).  Nothing here prints or logs any of these values.

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
    "CMDTOOL_OBJECTSTORE_RETRY_TIMEOUT",
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


def _s3_credentials(u: ObjectURL) -> Any:
    """A boto3 credential provider where the environment holds no key, else None.

    Raises
    ------
    ObjectStoreError
        No credentials anywhere (exit 11), naming the URL and the ways to give them.
    """
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SKIP_SIGNATURE", "").lower() in _TRUE:
        return None
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return None  # obstore's own chain (web identity, instance metadata) decides
    import boto3.session

    session = boto3.session.Session()
    try:
        found = session.get_credentials()
    except Exception as exc:
        raise ObjectStoreError(
            f"{u}: cannot read the AWS credentials ({type(exc).__name__})"
        ) from None
    if found is None:
        raise ObjectStoreError(
            f"{u}: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or AWS_SKIP_SIGNATURE=true for a public bucket"
        )
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
    key = (u.root, _env_fingerprint())
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
                    u.root,
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
