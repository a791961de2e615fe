"""Stores at object-store URLs: recognising a URL, opening it, one-line errors.

A STORE argument may be ``s3://bucket/prefix`` (or ``gs://``, ``az://``, ``memory://``):
the store is the zarr v3 hierarchy under that prefix, reached through obstore (the Rust
``object_store`` crate) and zarr's ``zarr.storage.ObjectStore``. URL parsing, the client
(credentials and endpoint from the environment, cached per URL and environment) and the
error mapping are :mod:`cmdtool.objectstore`'s; what is the store's own here is that a
missing bucket or object means a missing *store* (exit 3).
"""

from __future__ import annotations

from typing import Any

from cmdtool import errors
from cmdtool.errors import CmdtoolError, StoreNotFoundError
from cmdtool.objectstore.client import store_at
from cmdtool.objectstore.errors import translate as _translate
from cmdtool.objectstore.url import SCHEMES, is_url, parse

#: What store/remote.py registers on import (``store``: RemoteTrajectoryStore, ``exists``,
#: ``remove``), so that trajectory.py and cleanup.py reach it without importing it.
REMOTE: dict[str, Any] = {}


def normalize(url: str) -> str:
    """``url`` parsed and written back (lower-case scheme, ``s3a://`` as ``s3://``, no
    trailing slash).

    Raises
    ------
    UsageError
        Not a supported URL, or one naming no bucket (exit 2), naming the URL.
    """
    return str(parse(url, what="STORE"))


def obstore_for(url: str) -> Any:
    """The obstore store whose root is the prefix ``url`` (cached per process and
    environment: one connection pool per URL). ``memory://NAME`` is an in-process store.

    Raises
    ------
    UsageError
        Unsupported URL (exit 2).
    ObjectStoreError
        No credentials, or the client cannot be configured (exit 11).
    """
    return store_at(parse(url, what="STORE"))


def translate(exc: BaseException, url: str) -> CmdtoolError:
    """A cmdtool error (one line, naming ``url``, never a secret) for an object-store
    failure (:func:`cmdtool.objectstore.errors.translate`), except that a missing bucket
    or object is a :class:`~cmdtool.errors.StoreNotFoundError` (exit 3)."""
    mapped = _translate(exc, url)
    if type(mapped) is errors.NotFoundError:  # here: the store is what is missing
        return StoreNotFoundError(f"store not found: {mapped}")
    return mapped


def join(url: str, *keys: str) -> str:
    """``url`` with ``keys`` appended as path segments."""
    return "/".join([url.rstrip("/"), *(k.strip("/") for k in keys if k)])


def remote(what: str) -> Any:
    """The object-store implementation ``what`` registered by ``cmdtool.store.remote``."""
    if what not in REMOTE:
        import importlib

        importlib.import_module("cmdtool.store")  # its __init__ imports store/remote.py
    return REMOTE[what]


__all__ = ["REMOTE", "SCHEMES", "is_url", "join", "normalize", "obstore_for", "remote", "translate"]
