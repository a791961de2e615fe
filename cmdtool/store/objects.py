"""Stores at object-store URLs: recognising a URL, opening it, one-line errors.

A STORE argument may be ``s3://bucket/prefix`` (or ``gs://``, ``az://``, ``memory://``):
the store is the zarr v3 hierarchy under that prefix, reached through obstore (the Rust
``object_store`` crate) and zarr's ``zarr.storage.ObjectStore``. Credentials and the
endpoint come from the environment the usual way (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ALLOW_HTTP``, ...);
nothing here prints them. When ``cmdtool.objectstore`` (the shared client package)
is there, its URL parsing, client and error mapping are used.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

from cmdtool import errors
from cmdtool.errors import CmdtoolError, StoreError, StoreNotFoundError, UsageError

_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://(?P<rest>.*)$")
#: Schemes a store may live at (obstore's own URL forms).
SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "memory")
_cache: dict[str, Any] = {}
#: What store/remote.py registers on import (``store``: RemoteTrajectoryStore, ``exists``,
#: ``remove``), so that trajectory.py and cleanup.py reach it without importing it.
REMOTE: dict[str, Any] = {}
_cache_lock = threading.Lock()


def is_url(path: object) -> bool:
    """Whether ``path`` (a str) is an object-store URL (``scheme://...``), not a path."""
    return isinstance(path, str) and _URL_RE.match(path) is not None


def normalize(url: str) -> str:
    """``url`` with its scheme checked and trailing slashes removed.

    Raises
    ------
    UsageError
        A scheme no object store here supports (naming the URL).
    """
    m = _URL_RE.match(url)
    if m is None or m["scheme"].lower() not in SCHEMES:
        raise UsageError(
            f"STORE {url}: unsupported URL scheme; use a local path or one of "
            + ", ".join(f"{s}://" for s in SCHEMES if s not in ("s3a", "abfs", "abfss"))
        )
    rest = m["rest"].rstrip("/")
    if m["scheme"].lower() != "memory" and not rest.split("/", 1)[0]:
        raise UsageError(f"STORE {url}: the URL names no bucket")
    return f"{m['scheme'].lower()}://{rest}"


def obstore_for(url: str) -> Any:
    """The obstore store whose root is the prefix ``url`` (cached per process: one
    connection pool per URL). ``memory://NAME`` is an in-process store (tests)."""
    url = normalize(url)
    with _cache_lock:
        found = _cache.get(url)
        if found is not None:
            return found
        try:
            from obstore.store import MemoryStore, from_url
        except ImportError as exc:  # pragma: no cover - the s3 extra is missing
            raise UsageError(
                f"STORE {url}: object stores need obstore: pip install 'cmdtool[s3]'"
            ) from exc
        try:
            store: Any
            if url.startswith("memory://"):
                store = MemoryStore()
            else:
                options: dict[str, Any] = {}
                if os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true", "yes"):
                    options["allow_http"] = True
                extra: dict[str, Any] = {}
                try:  # the shared client's retry settings (CMDTOOL_OBJECTSTORE_RETRIES)
                    from cmdtool.objectstore.client import _retry_config

                    extra["retry_config"] = _retry_config()
                except ImportError:  # pragma: no cover
                    pass
                store = from_url(url, client_options=options or None, **extra)  # type: ignore[call-overload,arg-type]
        except CmdtoolError:
            raise
        except Exception as exc:
            raise translate(exc, url) from exc
        _cache[url] = store
        return store


def _one_line(exc: BaseException) -> str:
    """A short reason from an obstore error (its text spans lines and XML)."""
    text = str(exc)
    code = re.search(r"<Code>([^<]+)</Code>", text)
    status = re.search(r"status(?: code)?:? (\d{3})", text)
    if code is not None:
        return f"{code[1]}" + (f" (HTTP {status[1]})" if status else "")
    low = text.lower()
    for needle, said in (
        ("connection refused", "connection refused"),
        ("error sending request", "the server cannot be reached"),
        ("timed out", "timed out"),
        ("dns error", "the host name cannot be resolved"),
    ):
        if needle in low:
            return said
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def translate(exc: BaseException, url: str) -> CmdtoolError:
    """A cmdtool error (one line, naming ``url``, never a secret) for an object-store
    failure: a missing bucket or object is a :class:`~cmdtool.errors.StoreNotFoundError`
    (exit 3); denied access, missing credentials and network failures an
    ``ObjectStoreError`` (exit 11; a StoreError where that class is absent)."""
    if isinstance(exc, CmdtoolError):
        return exc
    try:  # the shared client package's mapping (cmdtool/objectstore/errors.py)
        from cmdtool.objectstore.errors import translate as shared
    except ImportError:  # pragma: no cover - fall back to ours below
        shared = None  # type: ignore[assignment]
    if shared is not None:
        mapped = shared(exc, url)
        if type(mapped) is errors.NotFoundError:  # here: the store is what is missing
            return StoreNotFoundError(f"store not found: {mapped}")
        return mapped
    reason = _one_line(exc)
    denied = getattr(errors, "ObjectStoreError", StoreError)
    name = type(exc).__name__
    if "NoSuchBucket" in str(exc):
        return StoreNotFoundError(f"store not found: {url} (the bucket does not exist)")
    if name in ("PermissionDeniedError", "UnauthenticatedError") or any(
        c in reason for c in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
    ):
        return denied(f"access to {url} denied: {reason}")  # type: ignore[no-any-return]
    if isinstance(exc, FileNotFoundError) or name == "NotFoundError":
        return StoreNotFoundError(f"store not found: {url}")
    if name in ("GenericError", "NotSupportedError", "UnknownConfigurationKeyError") or (
        isinstance(exc, OSError | ConnectionError | TimeoutError)
    ):
        return denied(f"cannot reach {url}: {reason}")  # type: ignore[no-any-return]
    return denied(f"object store error at {url}: {reason}")  # type: ignore[no-any-return]


def join(url: str, *keys: str) -> str:
    """``url`` with ``keys`` appended as path segments."""
    return "/".join([url.rstrip("/"), *(k.strip("/") for k in keys if k)])



def remote(what: str) -> Any:
    """The object-store implementation ``what`` registered by ``cmdtool.store.remote``."""
    if what not in REMOTE:
        import importlib

        importlib.import_module("cmdtool.store")  # its __init__ imports store/remote.py
    return REMOTE[what]
