"""The zarr v3 trajectory store: create, append an epoch, read row blocks.

This module knows rows, columns and bytes; it knows nothing of checkpoints or CMD.

Commit protocol (``docs/design.md``, "Commit protocol"): an epoch's data (its row of
``weights``, ``extras`` and ``pool``) is written first, then the group attribute
``cmdtool`` is rewritten with the epoch appended to ``epochs``. That attribute update
is one file write, so an epoch is visible only once complete; rows beyond
``len(epochs)`` are uncommitted leftovers of an interrupted ingest, ignored by every
reader and dropped by the next writer.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage

from cmdtool.errors import CmdtoolError, StoreError, StoreNotFoundError, UsageError
from cmdtool.store import integrity, pipeline
from cmdtool.store.chunkwrite import RowWriter
from cmdtool.store.cleanup import (
    clear_half_made_store,
    creation_folder,
    recover_upgrade,
    remove_abandoned_creations,
    remove_zarr_temporaries,
)
from cmdtool.store.integrity import CheckedLocalStore, create_array, describe_rows, writable
from cmdtool.store.layout import (
    ATTR,
    CHUNK,
    EXTRAS,
    FORMAT_VERSION,
    POOL,
    POOL_INDEX,
    WEIGHTS,
    EpochInfo,
    ExtraInfo,
    ParamInfo,
    layout_attrs,
)
from cmdtool.store.lock import StoreLock
from cmdtool.store.objects import is_url, remote
from cmdtool.store.results import ResultGroups, ResultPin
from cmdtool.store.validate import validate_result, validate_store


class TrajectoryStore(ResultGroups):
    """A cmdtool trajectory store on the local file system.

    Use :meth:`create` or :meth:`open`; the constructor is internal.
    """

    def __init__(
        self, path: Path, group: zarr.Group, writable: bool, lock: StoreLock | None = None
    ) -> None:
        self.path = path
        self._group = group
        self._writable = writable
        self._lock = lock
        self._writer: RowWriter | None = None
        self._checked_results: set[tuple[Any, ...]] = set()
        self._load_meta()

    def close(self) -> None:
        """Release the write lock (a read-only store holds none)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._writable = False

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        params: Sequence[ParamInfo],
        extras: Sequence[ExtraInfo] = (),
        *,
        filters: dict[str, str | None] | None = None,
        chunk: int | None = None,
        pool_index: np.ndarray | None = None,
        aliases: dict[str, str] | None = None,
        order: Sequence[str] | None = None,
    ) -> TrajectoryStore:
        """Create an empty store (zero epochs) at ``path``, ``chunk`` values per chunk of N
        (default :data:`CHUNK`); ``pool_index`` (sorted int64 columns) makes a sample pool;
        ``aliases`` (``{alias: stored name}``) records tied tensors stored once; ``order``
        (every stored name and alias, in the source file's order) is the key order of
        rebuilt checkpoints."""
        if is_url(path):  # an object store: its own protocol (store/remote.py)
            return remote("store").create_url(  # type: ignore[no-any-return]
                str(path), params, extras, filters=filters, chunk=chunk,
                pool_index=pool_index, aliases=aliases, order=order,
            )
        chunk = chunk or CHUNK
        p = Path(path)
        n = sum(pi.size for pi in params)
        if n == 0:
            raise UsageError("no floating-point tensor to model: the store would be empty")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned_creations(p)
            if p.exists() and (not p.is_dir() or any(p.iterdir())):
                if not clear_half_made_store(p):
                    raise StoreError(
                        f"cannot create store {p}: it exists and is not an empty folder; "
                        "pick a new path or remove it"
                    )
        except OSError as exc:
            if isinstance(exc, CmdtoolError):
                raise
            raise StoreError(f"cannot create store {p}: {exc.strerror or exc}") from exc
        # built complete under a hidden sibling name, then renamed into place: a store
        # appears whole or not at all (a killed creation leaves only the hidden folder,
        # which the next creation of this path removes)
        tmp = creation_folder(p)
        lock = StoreLock(tmp)
        try:
            tmp.mkdir()
            lock.acquire()
            group = zarr.open_group(zarr.storage.LocalStore(tmp), mode="a")
            write_layout(
                group, params, extras, chunk=chunk, pool_index=pool_index,
                filters=filters, aliases=aliases, order=order,
            )  # fmt: skip
            try:
                os.rename(tmp, p)  # onto nothing, or onto an empty folder
            except OSError as exc:
                if p.exists():
                    raise StoreError(
                        f"cannot create store {p}: another process created it meanwhile"
                    ) from exc
                raise
            lock.moved_to(p)
        except BaseException as exc:
            lock.release()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, CmdtoolError):
                raise StoreError(f"cannot write store {p}: {exc.strerror or exc}") from exc
            raise
        group = zarr.open_group(CheckedLocalStore(p), mode="r+")
        return cls(p, group, writable=True, lock=lock)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, mode: str = "r") -> TrajectoryStore:
        """Open an existing store (a folder, or an object-store URL such as
        ``s3://bucket/prefix``); ``mode="r+"`` to append or write results."""
        if is_url(path):
            return remote("store").open_url(str(path), mode=mode)  # type: ignore[no-any-return]
        p = Path(path)
        if not (p / "zarr.json").is_file():
            if p.exists():
                raise StoreError(f"{p} is not a cmdtool store (no zarr.json)")
            raise StoreNotFoundError(f"store not found: {p}")
        writable = mode != "r"
        lock = StoreLock(p) if writable else None
        if lock is not None:
            lock.acquire()
        try:
            if writable:
                recover_upgrade(p)  # before the arrays are checked: an upgrade's swap
            group = zarr.open_group(
                CheckedLocalStore(p, read_only=not writable),
                mode=mode,  # type: ignore[arg-type]
            )
            store = cls(p, group, writable=writable, lock=lock)
            if writable:
                store._recover()
        except BaseException as exc:
            if lock is not None:
                lock.release()
            if isinstance(exc, CmdtoolError):
                raise
            if isinstance(exc, Exception):
                raise StoreError(f"cannot open store {p}: {exc}") from exc
            raise
        return store

    def _load_meta(self) -> None:
        try:
            meta = self._group.attrs.asdict().get(ATTR)
        except Exception as exc:  # zarr parsed the root zarr.json already; defensive
            raise StoreError(f"store {self.path} has corrupt metadata: {exc}") from exc
        if not isinstance(meta, dict):
            raise StoreError(f"{self.path} is not a cmdtool store (no '{ATTR}' attribute)")
        # the attributes against the arrays: the first inconsistency is a StoreError
        validate_store(self.path, meta, self._group)
        self.format_version = int(meta["format_version"])
        try:
            self.params = [
                ParamInfo(d["name"], tuple(d["shape"]), d["dtype"], int(d["offset"]))
                for d in meta["params"]
            ]
            self.extras = [
                ExtraInfo(
                    d["name"], tuple(d["shape"]), d["dtype"], int(d["offset"]), int(d["nbytes"])
                )
                for d in meta.get("extras", [])
            ]
            self.epochs = [EpochInfo.from_json(d) for d in meta["epochs"]]
            self.weights = self._array(WEIGHTS)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"store {self.path} has corrupt metadata: {exc}") from exc
        self.filters: dict[str, str | None] = dict(meta.get("filters", {}))
        #: Tied tensors stored once: ``{alias: stored name}`` (optional, in file order).
        self.aliases: dict[str, str] = dict(meta.get("aliases") or {})
        #: Every tensor name (stored and alias) in the source file's order (optional: a
        #: store made before it has none; rebuilt checkpoints then list modeled tensors,
        #: then the others, then aliases).
        self.order: list[str] = [str(n) for n in meta.get("order") or []]
        self.n_params = int(self.weights.shape[1])
        self.chunk = int(self.weights.chunks[1])
        self._meta = meta
        checked = self._group.store
        if isinstance(checked, CheckedLocalStore):  # damage messages name epoch and columns
            checked.describe = describe_rows(lambda: self.labels, self.n_params)

    def _array(self, name: str) -> zarr.Array:
        """Array ``name``, configured to write every chunk (zeros too: format v2)."""
        node = self._group[name]
        if not isinstance(node, zarr.Array):
            raise StoreError(f"store {self.path} is corrupt: {name!r} is not an array")
        return writable(node)

    def _check_result(self, pin: ResultPin, group: zarr.Group) -> None:
        """Validate a decomposition's arrays against this store (once per version and
        process): a StoreError naming the first inconsistency, or ResultChangedError
        when a writer republished it meanwhile."""
        key = self._result_version(pin)
        if key in self._checked_results:
            return
        try:
            validate_result(
                self.path, pin.name, group, self.n_params, self.n_epochs, self.format_version
            )
        except StoreError:
            if not pin.is_current():
                raise pin.changed() from None
            raise
        self._checked_results.add(key)

    def _result_version(self, pin: ResultPin) -> tuple[object, ...]:
        """What identifies the version of ``pin``'s group that :meth:`_check_result`
        validated (with the epochs it was checked against): its metadata file's identity."""
        try:
            st = (self.path / pin.folder / "zarr.json").stat()
        except OSError:
            raise pin.changed() from None
        return (pin.folder, st.st_ino, st.st_mtime_ns, st.st_size, self.n_epochs)

    # --------------------------------------------------------------- properties
    @property
    def n_epochs(self) -> int:
        """T: the number of committed epochs."""
        return len(self.epochs)

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.epochs]

    @property
    def source_roots(self) -> list[str]:
        """Absolute checkpoint folders this store was ingested from."""
        return list(self._meta.get("source_roots", []))

    @property
    def extras_nbytes(self) -> int:
        return sum(e.nbytes for e in self.extras)

    def row_of(self, label: int) -> int:
        """Row index of the epoch with this label."""
        for i, e in enumerate(self.epochs):
            if e.label == label:
                return i
        from cmdtool.errors import EpochNotFoundError

        raise EpochNotFoundError(
            f"epoch {label} is not in store {self.path} (it has {_label_summary(self.labels)})"
        )

    def disk_bytes(self) -> int:
        """Bytes on disk under the store folder (files a writer renames or removes
        meanwhile, publishing a decomposition, are skipped)."""
        total = 0
        for root, _dirs, files in os.walk(self.path):  # os.walk skips vanished folders
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    continue
        return total

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if not self._writable:
            raise StoreError(f"store {self.path} is open read-only")

    def _recover(self) -> None:
        """Undo what an interrupted writer left: uncommitted rows, temp files, results."""
        self._drop_uncommitted()
        remove_zarr_temporaries(self.path)
        self._recover_results()

    def _drop_uncommitted(self) -> None:
        t = self.n_epochs
        try:
            if self.weights.shape[0] > t:
                self.weights.resize((t, self.n_params))
            for name in (EXTRAS, POOL):
                if name in self._group and self._array(name).shape[0] > t:
                    arr = self._array(name)
                    arr.resize((t, arr.shape[1]))
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc

    def begin_epoch(self) -> int:
        """Make room for one more (uncommitted) row; return its row index."""
        self._require_writable()
        t = self.n_epochs
        try:
            self.weights.resize((t + 1, self.n_params))
            for name in (EXTRAS, POOL):
                if name in self._group:
                    arr = self._array(name)
                    arr.resize((t + 1, arr.shape[1]))
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc
        return t

    def write_row_block(self, row: int, start: int, values: np.ndarray) -> None:
        """Write ``values`` (float32, (n,)) at columns ``start : start + n`` of ``row``.

        Chunks are written concurrently (``store/chunkwrite.py``), and all of them have
        finished (written or failed) when this returns or raises.
        """
        self._row_writer().write(row, start, values)

    def _row_writer(self) -> RowWriter:
        if self._writer is None:
            self._writer = RowWriter(self.weights, str(self.path))
        return self._writer

    def write_extras_row(self, row: int, data: np.ndarray) -> None:
        """Write one epoch's non-modeled tensors as raw bytes (uint8, (B,))."""
        if not self.extras:
            return
        try:
            self._array(EXTRAS)[row, :] = data
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc

    @property
    def pool_index(self) -> np.ndarray | None:
        """Columns of the sample pool, sorted int64; None for a store without one."""
        if POOL_INDEX not in self._group:
            return None
        return np.asarray(self._array(POOL_INDEX)[:], dtype=np.int64)

    def has_pool(self) -> bool:
        """True when every committed epoch has its pool row (a store appended by an older
        cmdtool may lack them)."""
        return POOL in self._group and self._array(POOL).shape[0] >= self.n_epochs

    def write_pool_row(self, row: int, values: np.ndarray) -> None:
        """One epoch's values at the pool columns (float32, (P,))."""
        if POOL not in self._group:
            return
        try:
            self._array(POOL)[row, :] = values
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc

    def read_pool(self, rows: np.ndarray) -> np.ndarray:
        """Pool values of the given committed rows: float32, (len(rows), P)."""
        return np.asarray(self._array(POOL).oindex[np.asarray(rows, dtype=np.int64), :])

    def _put_meta(self, meta: dict[str, Any]) -> None:
        """Rewrite the root attribute ``cmdtool`` (the commit: one atomic write of the root
        ``zarr.json``; an object store overrides it with a conditional put)."""
        self._group.attrs.put({**self._group.attrs.asdict(), ATTR: meta})

    def commit_epoch(self, epoch: EpochInfo, source_root: str | None = None) -> None:
        """Make the row written since :meth:`begin_epoch` visible, atomically.

        ``source_root`` (the absolute checkpoint folder) is recorded in ``source_roots``.
        """
        self._require_writable()
        meta = dict(self._meta)
        meta["epochs"] = [e.to_json() for e in self.epochs] + [epoch.to_json()]
        roots = list(meta.get("source_roots", []))
        if source_root is not None and source_root not in roots:
            meta["source_roots"] = [*roots, source_root]
        try:
            self._put_meta(meta)
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc
        self._meta = meta
        self.epochs = [*self.epochs, epoch]

    def append_epoch(
        self,
        blocks: Iterable[tuple[int, np.ndarray]],
        epoch: EpochInfo,
        *,
        extras: np.ndarray | None = None,
        source_root: str | None = None,
    ) -> None:
        """Append one epoch and commit it; on any failure the uncommitted row is dropped.

        Parameters
        ----------
        blocks : iterable of (int, ndarray)
            ``(start, values)`` pieces of the row in column order, together covering
            columns ``0 : N``; ``values`` float32, shape (n,). A piece may reuse the
            previous one's buffer: it is written (and its pool columns copied) before
            the next is drawn.
        epoch : EpochInfo
            What :meth:`commit_epoch` records.
        extras : ndarray, uint8, shape (B,), optional
            The epoch's non-modeled tensors as raw bytes (stores with ``extras``).
        source_root : str, optional
            As for :meth:`commit_epoch`.
        """
        pool_index = self.pool_index
        pool = np.empty(0 if pool_index is None else len(pool_index), dtype=np.float32)
        writer = self._row_writer()
        try:
            row = self.begin_epoch()
            for start, values in blocks:  # the next block is built while this one is written
                writer.submit(row, start, values)
                if pool_index is not None:
                    lo, hi = np.searchsorted(pool_index, [start, start + len(values)])
                    pool[lo:hi] = values[pool_index[lo:hi] - start]
            writer.wait()  # the whole row is on disk before anything refers to it
            self.write_pool_row(row, pool)
            if extras is not None:
                self.write_extras_row(row, extras)
            self.commit_epoch(epoch, source_root)
        except BaseException:
            writer.drain()  # no chunk write may land after the row is dropped
            self.abort_epoch()
            raise

    def snapshot(self) -> dict[str, Any]:
        """The committed metadata as it is now, for :meth:`rollback`."""
        return json.loads(json.dumps(self._meta))

    def rollback(self, snapshot: dict[str, Any]) -> None:
        """Forget the epochs committed since ``snapshot`` was taken: one atomic rewrite of
        the metadata back to it, then their rows are dropped."""
        self._require_writable()
        try:
            self._put_meta(snapshot)
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc
        self._meta = snapshot
        self.epochs = [EpochInfo.from_json(d) for d in snapshot["epochs"]]
        self._drop_uncommitted()

    def abort_epoch(self) -> None:
        """Drop the uncommitted row, if any (after a failure mid-epoch)."""
        self._drop_uncommitted()

    # ------------------------------------------------------------------ reading
    def read_block(self, rows: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Columns ``start:stop`` of the given committed rows (contiguous rows through the
        zarrs codec pipeline when it is used, ``store/pipeline.py``; checked alike).

        Returns
        -------
        ndarray, float32, shape (len(rows), stop - start)
        """
        rows = np.asarray(rows, dtype=np.int64)
        t = rows.shape[0]
        if t and rows[-1] - rows[0] == t - 1 and np.all(np.diff(rows) == 1):

            def checked(r: np.ndarray) -> np.ndarray:
                return np.asarray(self.weights[int(r[0]) : int(r[-1]) + 1, start:stop])

            fast = pipeline.reader_for(self)
            return checked(rows) if fast is None else fast.read(rows, start, stop, checked)
        return np.asarray(self.weights.oindex[rows, start:stop])

    def read_columns(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Values at ``rows`` x ``cols`` (int64 index arrays; cols in any order, repeats
        allowed), read from the sample pool when it holds every column, else from
        ``weights`` one whole chunk-column at a time.

        Returns
        -------
        ndarray, float32, shape (len(rows), len(cols))
        """
        rows = np.asarray(rows, dtype=np.int64)
        uniq, inverse = np.unique(np.asarray(cols, dtype=np.int64), return_inverse=True)
        pool = self.pool_index if self.has_pool() else None
        if pool is not None and np.isin(uniq, pool).all():
            return self.read_pool(rows)[:, np.searchsorted(pool, uniq)][:, inverse]
        return self._read_sorted_columns(rows, uniq)[:, inverse]

    def _read_sorted_columns(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), len(cols)), dtype=np.float32)
        chunk_ids = cols // self.chunk
        bounds = np.flatnonzero(np.diff(chunk_ids)) + 1
        for sel in np.split(np.arange(len(cols)), bounds):
            if sel.size == 0:
                continue
            c0 = int(chunk_ids[sel[0]]) * self.chunk
            c1 = min(c0 + self.chunk, self.n_params)
            block = self.read_block(rows, c0, c1)
            out[:, sel] = block[:, cols[sel] - c0]
        return out

    def read_extras(self, row: int) -> bytes:
        """One committed epoch's non-modeled tensors, as raw bytes."""
        if not self.extras:
            return b""
        return bytes(np.asarray(self._array(EXTRAS)[row, :]).tobytes())

    def column_blocks(self, width: int | None = None) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` column ranges aligned to chunks, ``width`` a multiple of the chunk."""
        w = width or self.chunk
        for start in range(0, self.n_params, w):
            yield start, min(start + w, self.n_params)


def as_store(store: TrajectoryStore | str | os.PathLike[str], mode: str = "r") -> TrajectoryStore:
    """``store`` itself when already open, else :meth:`TrajectoryStore.open` in ``mode``
    (the caller closes what it opened: ``if st is not store: st.close()``)."""
    if isinstance(store, TrajectoryStore):
        return store
    return TrajectoryStore.open(store, mode=mode)


def _label_summary(labels: Sequence[int]) -> str:
    if not labels:
        return "no epochs"
    if len(labels) <= 6:
        return "epochs " + ", ".join(map(str, labels))
    return f"{len(labels)} epochs, {labels[0]}..{labels[-1]}"


def write_layout(
    group: zarr.Group,
    params: Sequence[ParamInfo],
    extras: Sequence[ExtraInfo],
    *,
    chunk: int,
    pool_index: np.ndarray | None,
    filters: dict[str, str | None] | None,
    aliases: dict[str, str] | None,
    order: Sequence[str] | None,
) -> None:
    """Create a new store's empty arrays in ``group``, then put its root attributes.

    The root put comes last: on an object store it is the write that makes the store
    exist (a local store is built in a hidden folder and renamed instead).
    """
    n = sum(pi.size for pi in params)
    nbytes = sum(e.nbytes for e in extras)
    create_array(group, WEIGHTS, shape=(0, n), chunks=(1, min(chunk, n)), dtype="float32")
    if pool_index is not None and len(pool_index):
        create_array(group, POOL_INDEX, data=np.asarray(pool_index, dtype=np.int64))
        create_array(
            group, POOL, shape=(0, len(pool_index)), chunks=(1, len(pool_index)),
            dtype="float32",
        )  # fmt: skip
    if nbytes:
        create_array(group, EXTRAS, shape=(0, nbytes), chunks=(1, nbytes), dtype="uint8")
    meta = {
        # integrity.CHECKSUM off (a benchmark switch) writes a format-v1 store
        "format_version": FORMAT_VERSION if integrity.CHECKSUM else 1,
        **layout_attrs(params, extras),
        "filters": filters or {},
        **({"aliases": dict(aliases)} if aliases else {}),
        **({"order": list(order)} if order else {}),
        "source_roots": [],
        "epochs": [],
    }
    group.attrs.put({ATTR: meta})
