"""The object-store operations cmdtool needs, each turning client failures into
one-line cmdtool errors (:func:`cmdtool.objectstore.errors.translate`).

Every function takes a URL (``str`` or :class:`~cmdtool.objectstore.url.ObjectURL`);
keys are the URL's prefix plus the given relative path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cmdtool.errors import CmdtoolError, ObjectStoreError
from cmdtool.objectstore.client import store_for
from cmdtool.objectstore.errors import translate
from cmdtool.objectstore.url import ObjectURL, parse

#: Largest span fetched in one ranged GET by :func:`get_ranges` (measured: 8 MiB parts
#: with 4-16 requests in flight saturate the local server; /tmp/briefs/s3choice.md).
PART_BYTES = 8 << 20
#: Ranged GETs :func:`get_ranges` keeps in flight.
CONCURRENCY = 8


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object.

    Attributes
    ----------
    key : str
        Path relative to the listed URL's prefix (``"a/b.safetensors"``).
    size : int
        Bytes.
    e_tag : str or None
        The object's entity tag.
    mtime_ns : int
        Last-modified time, nanoseconds since the epoch (0 when unknown).
    """

    key: str
    size: int
    e_tag: str | None
    mtime_ns: int = 0


def _ns(when: Any) -> int:
    return int(when.timestamp() * 1e9) if when is not None else 0


def _u(url: str | ObjectURL) -> ObjectURL:
    return parse(url) if isinstance(url, str) else url


def _call(u: ObjectURL, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(store_for(u), *args, **kwargs)
    except CmdtoolError:
        raise
    except Exception as exc:
        raise translate(exc, str(u)) from None


def list_objects(url: str | ObjectURL) -> list[ObjectInfo]:
    """Every object below ``url`` (recursively), sorted by key.

    Raises
    ------
    NotFoundError
        The bucket does not exist (exit 3).
    ObjectStoreError
        Credentials, access or network failure (exit 11).
    """
    import obstore

    u = _u(url)
    base = u.prefix + "/" if u.prefix else ""

    def run(store: Any) -> list[ObjectInfo]:
        out = []
        for batch in obstore.list(store, base or None):
            for meta in batch:
                path = meta["path"]
                if base and not path.startswith(base):
                    continue
                out.append(ObjectInfo(path[len(base):], int(meta["size"]), meta.get("e_tag"),
                                      _ns(meta.get("last_modified"))))
        return sorted(out, key=lambda o: o.key)

    return _call(u, run)  # type: ignore[no-any-return]


def head(url: str | ObjectURL) -> ObjectInfo:
    """Size and etag of the object at ``url`` (NotFoundError when absent)."""
    import obstore

    u = _u(url)
    meta = _call(u, obstore.head, u.prefix)
    return ObjectInfo(
        u.prefix, int(meta["size"]), meta.get("e_tag"), _ns(meta.get("last_modified"))
    )


def get(url: str | ObjectURL) -> bytes:
    """The whole object at ``url``."""
    import obstore

    u = _u(url)
    return _call(u, lambda s: bytes(obstore.get(s, u.prefix).bytes()))  # type: ignore[no-any-return]


def get_range(url: str | ObjectURL, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the object at ``url`` (one ranged GET)."""
    import obstore

    u = _u(url)
    if end <= start:
        return b""
    return bytes(_call(u, obstore.get_range, u.prefix, start=start, end=end))


def get_ranges(
    url: str | ObjectURL, starts: Sequence[int], ends: Sequence[int]
) -> list[memoryview]:
    """Bytes ``[starts[i], ends[i])`` of the object at ``url``, fetched concurrently.

    Ranges longer than :data:`PART_BYTES` are split into parts; up to
    :data:`CONCURRENCY` ranged GETs are in flight (obstore coalesces adjacent small
    ranges).  Returns one buffer per range, in order.
    """
    import obstore

    u = _u(url)
    parts_s: list[int] = []
    parts_e: list[int] = []
    owner: list[int] = []
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        if e < s:
            raise ValueError(f"range {s}..{e} of {u} is reversed")
        for pos in range(s, e, PART_BYTES):  # an empty range needs no request
            parts_s.append(pos)
            parts_e.append(min(e, pos + PART_BYTES))
            owner.append(i)
    got: list[Any] = []
    for lo in range(0, len(parts_s), CONCURRENCY * 4):
        hi = lo + CONCURRENCY * 4
        got.extend(
            _call(u, obstore.get_ranges, u.prefix, starts=parts_s[lo:hi], ends=parts_e[lo:hi])
        )
    pieces: list[list[Any]] = [[] for _ in starts]
    for i, buf in zip(owner, got, strict=True):
        pieces[i].append(buf)
    return [memoryview(p[0]) if len(p) == 1 else memoryview(b"".join(p)) for p in pieces]


def put(
    url: str | ObjectURL,
    data: bytes,
    *,
    mode: str | None = None,
    if_match: str | None = None,
) -> str | None:
    """Write ``data`` at ``url``; returns the new etag.

    Parameters
    ----------
    mode : {None, "create"}
        ``"create"``: only if no object is there (else :class:`PreconditionFailed`).
    if_match : str, optional
        Only if the object's current etag is this (else :class:`PreconditionFailed`).
    """
    import obstore

    u = _u(url)
    put_mode: Any = "overwrite"
    if mode == "create":
        put_mode = "create"
    elif if_match is not None:
        put_mode = {"e_tag": if_match}
    try:
        result = obstore.put(store_for(u), u.prefix, data, mode=put_mode)
    except CmdtoolError:
        raise
    except Exception as exc:
        if type(exc).__name__ in ("AlreadyExistsError", "PreconditionError"):
            raise PreconditionFailed(f"{u}: changed by another writer") from None
        raise translate(exc, str(u)) from None
    return result.get("e_tag")  # type: ignore[no-any-return]


def delete(url: str | ObjectURL) -> None:
    """Delete the object at ``url`` (absent is fine)."""
    import obstore

    u = _u(url)
    try:
        _call(u, obstore.delete, u.prefix)
    except FileNotFoundError:
        pass


class PreconditionFailed(ObjectStoreError):
    """A conditional put lost: the object exists (create) or its etag changed."""
