"""A trajectory store at an object-store URL (``s3://bucket/prefix``, ``gs://``, ...).

The layout is the local one (zarr v3, format 2: ``weights``, ``pool``, ``extras``,
``pool_index`` and the root attribute ``cmdtool``), so plain zarr reads it with
``zarr.storage.ObjectStore``. What differs is the protocol, because an object store has
no rename and no ``flock`` (``docs/design.md``, "Object stores"):

- **commit**: the epoch's chunks are put first, then the root ``zarr.json`` is put once
  with the epoch appended; that put is conditional on the root's etag as this writer
  last wrote it (``If-Match``), so a writer whose lease was taken over cannot commit;
- **one writer**: the lease object ``.cmdtool-lease`` (:mod:`cmdtool.store.lease`);
- **results**: a decomposition is written under a unique prefix ``.version-<name>-<gen>``
  and made current by one put of the root ``zarr.json`` whose attribute
  ``cmdtool_results`` maps ``name`` to that folder and its generation; the old folder is
  deleted after. A reader's pin is the pointer entry: it holds while the root still
  points at that folder;
- **recovery**: the next writer drops rows past the committed epochs (as locally),
  deletes ``.version-*`` folders the pointer does not name, and a store whose root has
  no ``cmdtool`` attribute yet (a killed creation) is created anew.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import zarr

from cmdtool.errors import (
    CmdtoolError,
    DecompositionNotFoundError,
    StoreError,
    StoreNotFoundError,
    UsageError,
)
from cmdtool.store import trajectory as _trajectory
from cmdtool.store.integrity import describe_rows
from cmdtool.store.layout import (
    ATTR,
    CHUNK,
    EXTRAS,
    GENERATION_ATTR,
    POOL,
    POOL_INDEX,
    RESULT_ATTR,
    SCRATCH_PREFIX,
    WEIGHTS,
    ExtraInfo,
    ParamInfo,
    check_result_name,
)
from cmdtool.store.lease import LEASE_NAME, ObjectLease
from cmdtool.store.objcheck import zarr_store
from cmdtool.store.objects import REMOTE, join, normalize, obstore_for, translate
from cmdtool.store.results import ResultPin, new_generation
from cmdtool.store.trajectory import TrajectoryStore, write_layout

#: Root attribute: ``{name: {"folder": ..., "generation": ...}}``, the current version of
#: each decomposition of a store on an object store.
RESULTS_ATTR = "cmdtool_results"
#: Prefix of the folder of one version of a decomposition.
VERSION_PREFIX = ".version-"
_OWN_NAMES = {WEIGHTS, POOL, POOL_INDEX, EXTRAS, "zarr.json", LEASE_NAME}


def _failed_open(exc: BaseException, url: str, lease: ObjectLease | None) -> NoReturn:
    """Opening or creating the store at ``url`` failed with ``exc``: give the lease back
    and raise it as a one-line cmdtool error (a KeyboardInterrupt as it is)."""
    if lease is not None:
        lease.release()
    if isinstance(exc, Exception) and not isinstance(exc, CmdtoolError):
        raise translate(exc, url) from exc
    raise exc


class StoreURL(str):
    """The URL of a store or of a key inside it, usable where a store's ``path`` is: it
    joins with ``/``, ``resolve()`` is itself, and ``is_file`` / ``read_bytes`` ask the
    object store (so the shared checks that look at ``path / ... / "zarr.json"`` work)."""

    root: str
    key: str

    def __new__(cls, root: str, key: str = "") -> StoreURL:
        self = super().__new__(cls, join(root, key) if key else root)
        self.root = root
        self.key = key
        return self

    def __truediv__(self, other: object) -> StoreURL:
        return StoreURL(self.root, "/".join(p for p in (self.key, str(other)) if p))

    @property
    def name(self) -> str:
        return self.rsplit("/", 1)[-1]

    def resolve(self) -> StoreURL:
        return self

    def is_file(self) -> bool:
        import obstore

        try:
            obstore.head(obstore_for(self.root), self.key)
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise translate(exc, self.root) from exc
        return True

    @property
    def parents(self) -> tuple[()]:
        """No local folder holds a URL."""
        return ()

    def exists(self) -> bool:
        return self.is_file()

    def read_bytes(self) -> bytes:
        import obstore

        try:
            return bytes(obstore.get(obstore_for(self.root), self.key).bytes())
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise translate(exc, self.root) from exc


def _root_attrs(url: str) -> dict[str, Any] | None:
    """The root group's attributes as they are now (one GET); None if it has none."""
    try:
        meta = json.loads((StoreURL(url) / "zarr.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else None


def _pointer(attrs: dict[str, Any] | None) -> dict[str, dict[str, str]]:
    found = (attrs or {}).get(RESULTS_ATTR)
    return dict(found) if isinstance(found, dict) else {}


@dataclass(frozen=True)
class ObjectResultPin(ResultPin):
    """A pin on a store at a URL: the pointer entry ``name -> (folder, generation)``."""

    def is_current(self) -> bool:
        entry = _pointer(_root_attrs(str(self.root))).get(self.name)
        return isinstance(entry, dict) and entry.get("folder") == self.folder and (
            entry.get("generation") == self.generation
        )


def store_exists(url: str) -> bool:
    """Whether a complete store (root ``zarr.json`` with the ``cmdtool`` attribute) is at
    ``url``."""
    attrs = _root_attrs(normalize(url))
    return attrs is not None and ATTR in attrs


class RemoteTrajectoryStore(TrajectoryStore):
    """:class:`TrajectoryStore` on an object store; open with :meth:`open_url`."""

    def __init__(
        self, url: str, group: zarr.Group, writable: bool, lock: ObjectLease | None
    ) -> None:
        self.url = url
        self.objects = obstore_for(url)
        self._root_etag: str | None = None
        self._partials: dict[str, tuple[str, str]] = {}
        super().__init__(StoreURL(url), group, writable, lock)  # type: ignore[arg-type]
        checked = self._group.store
        if hasattr(checked, "describe"):  # damage messages name epoch and columns
            checked.describe = describe_rows(lambda: self.labels, self.n_params)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_url(cls, url: str, *, mode: str = "r") -> RemoteTrajectoryStore:
        url = normalize(url)
        attrs = _root_attrs(url)
        if attrs is None:
            raise StoreNotFoundError(f"store not found: {url}")
        if ATTR not in attrs:
            raise StoreError(f"{url} is not a cmdtool store (no '{ATTR}' attribute)")
        writable = mode != "r"
        lease = ObjectLease(obstore_for(url), url) if writable else None
        if lease is not None:
            lease.acquire()
        try:
            etag = cls._head_etag(url)
            group = zarr.open_group(zarr_store(url, read_only=not writable), mode=mode)  # type: ignore[arg-type]
            store = cls(url, group, writable, lease)
            store._root_etag = etag
            if writable:
                store._recover()
        except BaseException as exc:
            _failed_open(exc, url, lease)
        return store

    @staticmethod
    def _head_etag(url: str) -> str:
        import obstore

        return str(obstore.head(obstore_for(url), "zarr.json")["e_tag"])

    @classmethod
    def create_url(
        cls,
        url: str,
        params: Sequence[ParamInfo],
        extras: Sequence[ExtraInfo] = (),
        *,
        filters: dict[str, str | None] | None = None,
        chunk: int | None = None,
        pool_index: np.ndarray | None = None,
        aliases: dict[str, str] | None = None,
        order: Sequence[str] | None = None,
    ) -> RemoteTrajectoryStore:
        """As :meth:`TrajectoryStore.create`: the arrays are put first, the root's
        ``cmdtool`` attribute last (one put: before it, the store does not exist)."""
        url = normalize(url)
        chunk = chunk or _trajectory.CHUNK or CHUNK  # (tests patch trajectory's)
        n = sum(pi.size for pi in params)
        if n == 0:
            raise UsageError("no floating-point tensor to model: the store would be empty")
        objects = obstore_for(url)
        lease = ObjectLease(objects, url)
        lease.acquire()
        try:
            attrs = _root_attrs(url)
            if attrs is not None and ATTR in attrs:
                raise StoreError(f"cannot create store {url}: a store exists there")
            _clear_half_made(objects, url)
            group = zarr.open_group(zarr_store(url, read_only=False), mode="a")
            # the arrays, then the store appears: one put of the root
            write_layout(
                group, params, extras, chunk=chunk, pool_index=pool_index,
                filters=filters, aliases=aliases, order=order,
            )  # fmt: skip
            etag = cls._head_etag(url)
            store = cls(url, zarr.open_group(zarr_store(url, read_only=False), mode="r+"),
                        True, lease)
            store._root_etag = etag
        except BaseException as exc:
            _failed_open(exc, url, lease)
        return store

    # ------------------------------------------------------------------ commits
    def _put_root_attrs(self, attrs: dict[str, Any]) -> None:
        """One conditional put of the root ``zarr.json`` with ``attrs``: refused when
        the root changed since this writer last wrote it, or its lease was lost."""
        import obstore
        from obstore.exceptions import PreconditionError

        if isinstance(self._lock, ObjectLease):
            self._lock.check()
        doc = self._group.metadata.to_dict()
        doc["attributes"] = attrs
        body = json.dumps(doc, indent=2, allow_nan=False).encode()
        try:
            got = obstore.put(self.objects, "zarr.json", body, mode={"e_tag": self._root_etag})
        except PreconditionError as exc:
            raise StoreError(
                f"store {self.url} was changed by another writer since this one opened it "
                "(its lease expired and was taken over); nothing more is committed"
            ) from exc
        except Exception as exc:
            raise translate(exc, self.url) from exc
        self._root_etag = str(got["e_tag"])
        self._group = zarr.open_group(self._group.store, mode="r+")  # the new attributes

    def _put_meta(self, meta: dict[str, Any]) -> None:
        self._put_root_attrs({**self._group.attrs.asdict(), ATTR: meta})

    def _recover(self) -> None:
        self._drop_uncommitted()
        self._recover_results()

    def disk_bytes(self) -> int:
        """Bytes of every object under the store's prefix."""
        import obstore

        return sum(int(m["size"]) for batch in obstore.list(self.objects) for m in batch)

    def _delete_prefix(self, folder: str) -> None:
        import obstore

        keys = [m["path"] for batch in obstore.list(self.objects, prefix=folder + "/")
                for m in batch]
        for i in range(0, len(keys), 500):
            obstore.delete(self.objects, keys[i : i + 500])

    def _result_version(self, pin: ResultPin) -> tuple[object, ...]:
        # a version folder is written once under its generation: no metadata to stat
        return (pin.folder, pin.generation, self.n_epochs)

    # ------------------------------------------------------------------ results
    def _recover_results(self) -> None:
        """Delete version folders the pointer does not name (a killed writer's partial
        group, or an old version not yet deleted) and scratch groups."""
        import obstore

        named = {e.get("folder") for e in _pointer(self._group.attrs.asdict()).values()}
        listing = obstore.list_with_delimiter(self.objects)
        for prefix in listing["common_prefixes"]:
            folder = prefix.rstrip("/").rsplit("/", 1)[-1]
            if folder.startswith(SCRATCH_PREFIX) or (
                folder.startswith(VERSION_PREFIX) and folder not in named
            ):
                self._delete_prefix(folder)

    def result_names(self) -> list[str]:
        return sorted(
            n for n in _pointer(_root_attrs(self.url)) if not n.startswith(".")
        )

    def pin_result(self, name: str) -> tuple[ResultPin, zarr.Group]:
        switched = None
        for _ in range(3):
            entry = _pointer(_root_attrs(self.url)).get(name)
            if not isinstance(entry, dict):
                break
            folder, generation = str(entry.get("folder")), entry.get("generation")
            pin = ObjectResultPin(self.path, name, folder, generation)  # type: ignore[arg-type]
            try:
                with pin.guard():
                    group = self._group[folder]
                    if not isinstance(group, zarr.Group):
                        raise StoreError(f"store {self.url}: {folder} is not a group")
                    self._check_result(pin, group)
            except (KeyError, FileNotFoundError) as exc:
                raise StoreError(
                    f"store {self.url} is damaged: decomposition {name!r} points at "
                    f"{folder}, which is missing"
                ) from exc
            except DecompositionNotFoundError:
                raise
            except StoreError as exc:
                from cmdtool.errors import ResultChangedError

                if isinstance(exc, ResultChangedError):
                    switched = exc
                    continue
                raise
            return pin, group
        if switched is not None:
            raise switched
        have = ", ".join(self.result_names()) or "none"
        raise DecompositionNotFoundError(
            f"store {self.url} has no decomposition named {name!r} (it has: {have}); "
            "run 'cmdtool decompose' first"
        )

    def begin_result(self, name: str) -> zarr.Group:
        self._require_writable()
        check_result_name(name)
        generation = new_generation()
        folder = f"{VERSION_PREFIX}{name}-{generation}"
        self._partials[name] = (folder, generation)
        try:
            return self._group.create_group(folder)
        except Exception as exc:
            raise translate(exc, self.url) from exc

    def publish_result(self, name: str) -> ResultPin:
        folder, generation = self._partials.pop(name)
        try:
            self._group[folder].attrs.update({GENERATION_ATTR: generation})
        except Exception as exc:
            raise translate(exc, self.url) from exc
        attrs = self._group.attrs.asdict()
        pointer = _pointer(attrs)
        old = pointer.get(name)
        pointer[name] = {"folder": folder, "generation": generation}
        self._put_root_attrs({**attrs, RESULTS_ATTR: pointer})  # now current
        if isinstance(old, dict) and old.get("folder") and old["folder"] != folder:
            try:
                self._delete_prefix(str(old["folder"]))
            except Exception:
                pass
        return ObjectResultPin(self.path, name, folder, generation)  # type: ignore[arg-type]

    def discard_result(self, name: str) -> None:
        found = self._partials.pop(name, None)
        if found is not None:
            try:
                self._delete_prefix(found[0])
            except Exception:
                pass

    def result_attr(self, name: str, key: str) -> Any:
        return self.open_result(name).attrs.asdict().get(key)

    def _remove(self, folder: Any) -> None:
        """Remove the decomposition ``folder`` names (``path / name``, as the local
        store's ``_remove`` is called): its pointer entry goes first (one conditional put
        of the root, so a reader that pinned it sees a change), its version folder
        after. A name the pointer does not hold is a no-op."""
        self._require_writable()
        name = str(getattr(folder, "key", folder)).rsplit("/", 1)[-1]
        attrs = self._group.attrs.asdict()
        pointer = _pointer(attrs)
        entry = pointer.pop(name, None)
        if not isinstance(entry, dict):
            return
        self._put_root_attrs({**attrs, RESULTS_ATTR: pointer})
        if entry.get("folder"):
            try:
                self._delete_prefix(str(entry["folder"]))
            except Exception:
                pass  # the next writer's recovery deletes folders the pointer lost


def _clear_half_made(objects: Any, url: str) -> None:
    """Delete what a killed creation left under ``url`` (only cmdtool's own names and
    the lease); refuse a prefix holding anything else."""
    import obstore

    listing = obstore.list_with_delimiter(objects)
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"]]
    names += [m["path"].rsplit("/", 1)[-1] for m in listing["objects"]]
    others = [n for n in names if n not in _OWN_NAMES]
    if others:
        raise StoreError(
            f"cannot create store {url}: the prefix holds other objects ({others[0]}, ...); "
            "pick a new prefix or remove them"
        )
    keys = [m["path"] for batch in obstore.list(objects) for m in batch
            if m["path"] != LEASE_NAME]
    for i in range(0, len(keys), 500):
        obstore.delete(objects, keys[i : i + 500])


def remove_remote_store(url: str) -> None:
    """Delete every object under ``url`` but the lease (a store a failed ingest created)."""
    _clear_half_made(obstore_for(normalize(url)), normalize(url))


REMOTE.update(store=RemoteTrajectoryStore, exists=store_exists, remove=remove_remote_store)

__all__ = ["RESULTS_ATTR", "RESULT_ATTR", "RemoteTrajectoryStore", "StoreURL", "store_exists"]
