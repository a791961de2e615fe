"""Checkpoint SOURCEs at object-store URLs (``s3://bucket/run``).

Nothing of a run is downloaded up front. :func:`mirror` lists the prefix and builds a
local *skeleton*: one sparse placeholder per object (its size and last-modified time; the
small ``*.json`` files — shard indexes, ``trainer_state.json`` — with their contents),
down to the depth discovery looks at (SOURCE's entries and one folder level below), so
:func:`~cmdtool.checkpoints.discover.find_checkpoints` applies the local rules unchanged.
Then each file is read when its checkpoint is opened:

* safetensors by range requests (:class:`RemoteSafetensorsReader`): the header with the
  local reader's own validation, then the tensors' byte ranges, in windows of up to
  :data:`WINDOW_BYTES` fetched concurrently (:func:`cmdtool.objectstore.ops.get_ranges`);
* torch zip / pickle files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) are copied to a local
  temporary file, one file at a time (the shards of a ``pytorch_model-*.bin`` checkpoint
  take turns: :class:`RemoteTorchReader`), read by the local reader (``torch.load`` with
  ``weights_only=True``), and the copy is removed on close, or at once on failure;
* ``torch.distributed.checkpoint`` folders are copied to a local temporary folder, one
  checkpoint folder at a time (``.metadata`` and the ``*.distcp`` files), read by the
  local :class:`~cmdtool.checkpoints.dcp.DCPReader`, and removed on close, or at once on
  failure (:func:`refuse_remote_dcp` checks first that the copy fits).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

from cmdtool.checkpoints.bytesource import (
    WINDOW_BYTES,
    RemoteFile,
    cached,
    download,
    register,
    remote_of,
    unregister,
)
from cmdtool.checkpoints.limits import ReadLimits
from cmdtool.checkpoints.safetensors import _read_safetensors_header
from cmdtool.checkpoints.torchfile import TorchReader
from cmdtool.errors import CheckpointError, CmdtoolError, SourceNotFoundError, UsageError
from cmdtool.objectstore import ops
from cmdtool.objectstore.url import ObjectURL, parse

#: JSON files up to this size are fetched into the skeleton (shard indexes, trainer state).
JSON_BYTES = 16 << 20


def _safe_parts(key: str) -> list[str] | None:
    """The path segments of an object key, or None when it cannot be a local name."""
    parts = key.split("/")
    if any(p in ("", ".", "..") or "\x00" in p or "\\" in p for p in parts):
        return None
    return parts


class RemoteTree:
    """The skeleton of a listed prefix; a context manager that removes it on exit.

    Attributes
    ----------
    url : ObjectURL
        The SOURCE prefix.
    root : pathlib.Path
        The local skeleton folder standing for ``url``.
    """

    def __init__(self, url: ObjectURL, root: Path) -> None:
        self.url = url
        self.root = root

    def local(self, message: str) -> str:
        """``message`` with the skeleton folder replaced by the URL."""
        return message.replace(str(self.root), str(self.url))

    def rename_error(self, exc: BaseException) -> None:
        """Make a cmdtool error's message name the URL instead of the skeleton."""
        if isinstance(exc, CmdtoolError) and exc.args and isinstance(exc.args[0], str):
            exc.args = (self.local(exc.args[0]), *exc.args[1:])

    def close(self) -> None:
        unregister(self.root)
        shutil.rmtree(self.root.parent, ignore_errors=True)

    def __enter__(self) -> RemoteTree:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def mirror(url: str) -> RemoteTree:
    """List ``url`` and build its local skeleton (see the module docstring).

    Raises
    ------
    UsageError
        Unsupported URL scheme (exit 2).
    SourceNotFoundError
        Nothing is stored under the prefix (exit 3).
    NotFoundError, ObjectStoreError
        The bucket does not exist (exit 3); credentials, access, network (exit 11).
    """
    u = parse(url, what="SOURCE")
    listed = ops.list_objects(u)
    if not listed:
        raise SourceNotFoundError(f"checkpoint folder not found: {u} holds no object")
    top = Path(tempfile.mkdtemp(prefix="cmdtool-source-"))
    root = top / (u.prefix.rsplit("/", 1)[-1] or u.bucket or "source")
    tree = RemoteTree(u, root)
    try:
        root.mkdir()
        for obj in listed:
            parts = _safe_parts(obj.key)
            if parts is None or len(parts) > 2:
                continue  # discovery never looks deeper than one folder level
            path = root.joinpath(*parts)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.is_dir():
                    continue
                if obj.key.lower().endswith(".json") and obj.size <= JSON_BYTES:
                    path.write_bytes(ops.get(u.child(obj.key)))
                else:
                    with path.open("wb") as fh:
                        fh.truncate(obj.size)  # sparse: no byte of the object is fetched
                if obj.mtime_ns:
                    os.utime(path, ns=(obj.mtime_ns, obj.mtime_ns))
            except (NotADirectoryError, FileExistsError):
                continue  # "a" and "a/b" both exist: an object beside a folder of that name
            except CmdtoolError:
                raise
            except OSError:
                continue  # a key no local file can be named (too long ...): never a match
        register(root, u)
    except BaseException:
        tree.close()
        raise
    return tree


class RemoteSafetensorsReader:
    """A safetensors object read by range requests; the same header validation as the
    local :class:`~cmdtool.checkpoints.safetensors.SafetensorsReader`."""

    state_key: str | None = None

    def __init__(self, path: Path, remote: RemoteFile, max_tensors: int | None = None) -> None:
        self.path = path
        self._remote = remote
        self._infos = _read_safetensors_header(path, max_tensors)
        data_size = max((i.end for i in self._infos.values()), default=0)
        self._base = remote.size - data_size
        self._order = sorted(self._infos, key=lambda n: (self._infos[n].begin, n))
        self._rank = {n: i for i, n in enumerate(self._order)}
        self._ready: dict[str, bytes | memoryview] = {}
        self._open = True

    def names(self) -> list[str]:
        return list(self._order)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        info = self._infos[name]
        return info.shape, info.dtype

    def _fetch_window(self, name: str) -> None:
        """Fetch ``name`` and the tensors after it in file order, up to WINDOW_BYTES."""
        picked: list[str] = []
        total = 0
        for other in self._order[self._rank[name] :]:
            span = self._infos[other].end - self._infos[other].begin
            if picked and total + span > WINDOW_BYTES:
                break
            if other not in self._ready:
                picked.append(other)
                total += span
        fetch = []
        for n in picked:  # a small file's tensors may all be in its first block already
            lo, hi = self._base + self._infos[n].begin, self._base + self._infos[n].end
            got = cached(self.path, lo, hi)
            if got is None:
                fetch.append(n)
            else:
                self._ready[n] = got
        starts = [self._base + self._infos[n].begin for n in fetch]
        ends = [self._base + self._infos[n].end for n in fetch]
        for n, buf in zip(fetch, ops.get_ranges(self._remote.url, starts, ends), strict=True):
            self._ready[n] = buf

    def get(self, name: str) -> torch.Tensor:
        if not self._open:
            raise ValueError(f"checkpoint {self.path} is closed")
        info = self._infos[name]
        if name not in self._ready:
            self._fetch_window(name)
        buf = self._ready.pop(name)
        if len(buf) != info.end - info.begin:
            raise CheckpointError(
                f"cannot read tensor {name!r} from {self.path}: got {len(buf)} bytes of "
                f"{info.end - info.begin} (the object changed while read?)"
            )
        if not len(buf):
            return torch.empty(info.shape, dtype=info.dtype)
        # safetensors data are little-endian, as on every platform torch supports here
        return torch.frombuffer(bytearray(buf), dtype=info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._open = False
        self._ready.clear()


#: The local copy each checkpoint folder holds: at most one torch file at a time.
_resident: dict[Path, RemoteTorchReader] = {}
_resident_lock = threading.Lock()


class RemoteTorchReader:
    """A torch / Lightning object read through a local temporary copy by the local
    :class:`~cmdtool.checkpoints.torchfile.TorchReader`, one file of a checkpoint
    folder at a time.

    Opening copies the object, loads it (all the local checks) and keeps its names and
    specs; the copy stays while no other file of the same folder needs one (a
    single-file checkpoint is copied once). A sharded ``pytorch_model-*.bin``
    checkpoint's shards take turns: loading a tensor of another shard removes the
    current copy first and copies that shard again, so at most one shard lies on local
    disk (each shard is fetched twice: once when opened, once when read). Tensors
    already returned stay valid (an unlinked file stays mapped). The copy is removed on
    close, or at once if the file is refused.
    """

    def __init__(
        self,
        path: Path,
        remote: RemoteFile,
        allow_globals: Sequence[str] = (),
        state: str = "raw",
        limits: ReadLimits | None = None,
    ) -> None:
        self.path = path
        self._remote = remote
        self._args = (tuple(allow_globals), state, limits)
        self._local: TorchReader | None = None
        self._tmpdir: Path | None = None
        self._closed = False
        reader = self._load()
        self.state_key = reader.state_key
        self._specs = {name: reader.spec(name) for name in reader.names()}

    def _load(self) -> TorchReader:
        """The local reader of this file, copying it first (and removing the copy of
        any other file of the folder) when it is not on disk."""
        if self._local is not None:
            return self._local
        with _resident_lock:
            other = _resident.get(self.path.parent)
            _resident[self.path.parent] = self
        if other is not None and other is not self:
            other._evict()
        self._tmpdir = Path(tempfile.mkdtemp(prefix="cmdtool-copy-"))
        copy = self._tmpdir / self.path.name
        try:
            download(self._remote, copy)
            self._local = TorchReader(copy, *self._args)
        except BaseException as exc:
            self._evict()
            if isinstance(exc, CmdtoolError) and exc.args and isinstance(exc.args[0], str):
                exc.args = (exc.args[0].replace(str(copy), str(self.path)), *exc.args[1:])
            raise
        return self._local

    def _evict(self) -> None:
        """Drop the local reader and remove the copy (tensors returned stay valid)."""
        if self._local is not None:
            self._local.close()
            self._local = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        with _resident_lock:
            if _resident.get(self.path.parent) is self:
                del _resident[self.path.parent]

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._specs[name]

    def get(self, name: str) -> torch.Tensor:
        if self._closed:
            raise ValueError(f"checkpoint {self.path} is closed")
        self._specs[name]  # KeyError for a name this file does not hold
        fresh = self._local is None
        reader = self._load()
        if fresh and {n: reader.spec(n) for n in reader.names()} != self._specs:
            self._evict()
            raise CheckpointError(
                f"{self.path} changed while it was read (its tensors are not the ones it "
                "held when opened)"
            )
        return reader.get(name)

    def close(self) -> None:
        self._closed = True
        self._evict()


def open_remote_file(
    path: Path,
    allow_globals: Sequence[str] = (),
    state: str = "raw",
    limits: ReadLimits | None = None,
) -> RemoteSafetensorsReader | RemoteTorchReader | None:
    """The reader for a skeleton placeholder ``path``, or None for a local file."""
    remote = remote_of(path)
    if remote is None:
        return None
    limits = limits or ReadLimits()
    if path.suffix.lower() == ".safetensors":
        return RemoteSafetensorsReader(path, remote, max_tensors=limits.max_tensors)
    return RemoteTorchReader(path, remote, allow_globals, state, limits)


def refuse_remote_dcp(folder: Path) -> None:
    """Refuse an object-store DCP folder too big for the local temporary directory.

    :class:`~cmdtool.checkpoints.dcp.DCPReader` reads such a folder from a temporary
    local copy of its ``.metadata`` and ``*.distcp`` files (one checkpoint folder at a
    time, removed on close); this checks first that the copy fits, so that a full disk
    is a one-line usage error naming the folder rather than a failure mid-copy.
    """
    if remote_of(folder / ".metadata") is None:
        return
    need = sum(
        f.stat().st_size for f in folder.iterdir()
        if f.is_file() and (f.name == ".metadata" or f.name.endswith(".distcp"))
    )  # fmt: skip
    where = tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    if need > free:
        raise UsageError(
            f"{folder}: reading this torch.distributed.checkpoint folder from object "
            f"storage needs {need} bytes of local temporary space and {where} has {free} "
            "free; set TMPDIR to a folder on a larger disk"
        )


__all__ = ["ObjectURL", "RemoteTree", "mirror", "open_remote_file", "refuse_remote_dcp"]
