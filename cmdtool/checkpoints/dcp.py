"""``torch.distributed.checkpoint`` (DCP) folders, read in one process, safely.

A DCP checkpoint is a folder (``step-100/``) holding ``.metadata``, a pickle of
``torch.distributed.checkpoint.metadata.Metadata``, and ``__<rank>_<n>.distcp`` files in
which every tensor chunk is one ``torch.save`` archive at a byte range the metadata
records (``storage_data``: file, offset, length).

* ``.metadata`` is read by :class:`_MetadataUnpickler`, which admits only the names a
  DCP metadata pickle uses (the metadata dataclasses, ``_StorageInfo``, ``torch.Size``,
  torch dtypes and layouts, ``pathlib`` paths) and maps each to an inert stand-in of
  this module: no torch code (no ``__setstate__``, no constructor) runs while it loads,
  and any other global is refused, naming it, before anything is constructed.
* Tensors are read one at a time (:meth:`DCPReader.get`): each chunk's byte range is
  checked against its file, its zip records against their CRC-32, and loaded with
  ``torch.load(weights_only=True)`` from a window onto the file, so a checkpoint is
  never materialised whole. No process group is needed.
* Only the model's tensors are used: those under a ``model`` / ``state_dict`` /
  ``model_state_dict`` / ``module`` group when the state dict was nested, else every
  tensor except training state (``optimizer.*``, ``lr_scheduler.*``, ``dataloader.*``,
  ``train_state`` ...). Non-tensor entries (``BytesStorageMetadata``) are ignored.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import torch

from cmdtool.checkpoints.bytesource import copy_folder
from cmdtool.errors import CheckpointError, UnsafeCheckpointError

METADATA = ".metadata"
#: Bytes read at a time when checking a chunk's CRC-32.
_READ = 1 << 20
#: Largest ``.metadata`` read (a 1B-parameter model's is a few hundred KiB).
MAX_METADATA = 1 << 30
#: Groups of a nested state dict that hold the model, by priority.
MODEL_GROUPS = ("model", "state_dict", "model_state_dict", "module")
#: First path elements of training state that is not the model.
TRAINING_STATE = (
    "optimizer",
    "optim",
    "lr_scheduler",
    "scheduler",
    "dataloader",
    "train_state",
    "rng",
    "scaler",
)


# ------------------------------------------------------------------ stand-ins


class _Record:
    """Inert stand-in for a metadata dataclass: keeps the state pickle gives it."""

    kind: str = "record"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | None):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) form
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})
        else:
            self.__dict__["state"] = state

    def field(self, name: str, default: Any = None) -> Any:
        return self.__dict__.get(name, default)


def _record(kind: str) -> type[_Record]:
    return type(f"_{kind}", (_Record,), {"kind": kind, "__module__": __name__})


class _Properties(_Record):
    """Stand-in for ``TensorProperties``, pickled as a tuple whose first item is the dtype."""

    kind = "TensorProperties"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and state:
            self.__dict__["dtype"] = state[0]
        else:
            super().__setstate__(state)


def _size(dims: Any = ()) -> tuple[int, ...]:
    """Stand-in for ``torch.Size(dims)``: a tuple of non-negative ints, else refused."""
    if not isinstance(dims, tuple | list) or not all(type(d) is int and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"torch.Size of {dims!r}, not of non-negative integers")
    return tuple(dims)


def _text(*args: Any) -> str:
    """Stand-in for a path or a layout looked up by name: its text, nothing opened."""
    return "/".join(str(a) for a in args)


def _number(value: Any = 0) -> int:
    """Stand-in for the ``_MEM_FORMAT_ENCODING`` enum: the member's value."""
    return value if type(value) is int else 0


def _allowed() -> dict[tuple[str, str], Any]:
    metadata = "torch.distributed.checkpoint.metadata"
    allowed: dict[tuple[str, str], Any] = {
        (metadata, "Metadata"): _record("Metadata"),
        (metadata, "TensorStorageMetadata"): _record("TensorStorageMetadata"),
        (metadata, "BytesStorageMetadata"): _record("BytesStorageMetadata"),
        (metadata, "ChunkStorageMetadata"): _record("ChunkStorageMetadata"),
        (metadata, "MetadataIndex"): _record("MetadataIndex"),
        (metadata, "StorageMeta"): _record("StorageMeta"),
        (metadata, "TensorProperties"): _Properties,
        (metadata, "_MEM_FORMAT_ENCODING"): _number,
        # torch < 2.1 kept TensorProperties with the sharded tensor
        ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"): _Properties,
        ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"): _number,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _record("_StorageInfo"),
        ("torch", "Size"): _size,
        ("torch.serialization", "_get_layout"): _text,
        ("collections", "OrderedDict"): dict,
    }
    for cls in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        allowed[("pathlib", cls)] = _text
    for attr in dir(torch):
        value = getattr(torch, attr, None)
        if isinstance(value, torch.dtype):
            allowed[("torch", attr)] = value
        elif isinstance(value, torch.layout):
            allowed[("torch", attr)] = value
    return allowed


_ALLOWED = _allowed()


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler admitting only the names of :data:`_ALLOWED`, each an inert stand-in."""

    def __init__(self, fh: BinaryIO, path: Path) -> None:
        super().__init__(fh)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"refusing to load {self.path}: its pickle names {module}.{name}, which is "
                "not one of the classes a torch.distributed.checkpoint .metadata holds "
                "(unpickling it could run code); nothing was executed"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            f"refusing to load {self.path}: it holds persistent ids, which a "
            "torch.distributed.checkpoint .metadata never does"
        )


# ------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int


@dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[_Chunk, ...]


def _load_metadata(path: Path) -> _Record:
    try:
        size = path.stat().st_size
        if size > MAX_METADATA:
            raise CheckpointError(
                f"invalid DCP metadata {path}: {size} bytes, more than the {MAX_METADATA} "
                "a .metadata file holds (corrupt?)"
            )
        with path.open("rb") as fh:
            meta = _MetadataUnpickler(fh, path).load()
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read DCP metadata {path}: {exc}") from exc
    except Exception as exc:  # any unpickling failure: truncated, garbage, bad calls
        raise CheckpointError(
            f"invalid DCP metadata {path}: not a torch.distributed.checkpoint .metadata "
            f"pickle ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(meta, _Record) or meta.kind != "Metadata":
        raise CheckpointError(
            f"invalid DCP metadata {path}: it holds a {type(meta).__name__}, not a "
            "torch.distributed.checkpoint Metadata"
        )
    return meta


def _plain_file(name: Any) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and name not in {".", ".."}
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
    )


def _chunks_tile(shape: tuple[int, ...], chunks: list[_Chunk]) -> str | None:
    """Why ``chunks`` do not tile a tensor of ``shape`` exactly, or None."""
    total = 0
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            return f"a chunk of {len(c.sizes)} dimensions in a tensor of {len(shape)}"
        if any(o + s > d for o, s, d in zip(c.offsets, c.sizes, shape, strict=True)):
            return f"a chunk at {list(c.offsets)} of size {list(c.sizes)} outside {list(shape)}"
        volume = 1
        for s in c.sizes:
            volume *= s
        total += volume
    numel = 1
    for d in shape:
        numel *= d
    if total != numel:
        return f"chunks of {total} elements in all for a tensor of {numel}"
    for i, a in enumerate(chunks):
        for b in chunks[i + 1 :]:
            if (
                all(
                    ao < bo + bs and bo < ao + as_
                    for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True)
                )
                and all(a.sizes)
                and all(b.sizes)
            ):
                return f"chunks at {list(a.offsets)} and {list(b.offsets)} that overlap"
    return None


def _parse(meta: _Record, folder: Path) -> dict[str, _TensorMeta]:
    """Every tensor entry of the metadata, validated, in state-dict order."""
    where = folder / METADATA
    entries = meta.field("state_dict_metadata")
    storage = meta.field("storage_data")
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointError(
            f"invalid DCP metadata {where}: no state_dict_metadata / storage_data dicts "
            "(written by a custom storage writer?)"
        )
    located: dict[tuple[str, tuple[int, ...]], _Record] = {}
    for key, info in storage.items():
        if not (isinstance(key, _Record) and key.kind == "MetadataIndex"):
            raise CheckpointError(f"invalid DCP metadata {where}: a storage key is not an index")
        fqn, offset = key.field("fqn"), key.field("offset")
        if not isinstance(fqn, str) or not isinstance(offset, tuple | None):
            raise CheckpointError(f"invalid DCP metadata {where}: a malformed storage key")
        if not (isinstance(info, _Record) and info.kind == "_StorageInfo"):
            raise CheckpointError(
                f"invalid DCP metadata {where}: storage of {fqn!r} is not a file range"
            )
        located[(fqn, offset or ())] = info
    out: dict[str, _TensorMeta] = {}
    for name, entry in entries.items():
        if not isinstance(name, str) or not isinstance(entry, _Record):
            raise CheckpointError(f"invalid DCP metadata {where}: a malformed entry {name!r}")
        if entry.kind == "BytesStorageMetadata":
            continue
        props, shape, chunk_list = (
            entry.field("properties"),
            entry.field("size"),
            entry.field("chunks"),
        )
        dtype = props.field("dtype") if isinstance(props, _Record) else None
        if (
            entry.kind != "TensorStorageMetadata"
            or not isinstance(dtype, torch.dtype)
            or not isinstance(shape, tuple)
            or not isinstance(chunk_list, list)
        ):
            raise CheckpointError(
                f"invalid DCP metadata {where}: entry {name!r} is not a tensor description"
            )
        chunks = []
        for c in chunk_list:
            offsets = c.field("offsets") if isinstance(c, _Record) else None
            sizes = c.field("sizes") if isinstance(c, _Record) else None
            if not isinstance(offsets, tuple) or not isinstance(sizes, tuple):
                raise CheckpointError(
                    f"invalid DCP metadata {where}: a chunk of {name!r} has no offsets/sizes"
                )
            info = located.get((name, offsets))
            if info is None:
                raise CheckpointError(
                    f"invalid DCP metadata {where}: the chunk of {name!r} at {list(offsets)} "
                    "is stored nowhere"
                )
            file, start, length = (
                info.field("relative_path"),
                info.field("offset"),
                info.field("length"),
            )
            if not _plain_file(file) or type(start) is not int or type(length) is not int:
                raise CheckpointError(
                    f"invalid DCP metadata {where}: {name!r} is stored at {file!r}, not a "
                    "file inside the checkpoint folder"
                )
            if start < 0 or length <= 0:
                raise CheckpointError(
                    f"invalid DCP metadata {where}: {name!r} has the byte range "
                    f"{start}+{length} in {file}"
                )
            if info.field("transform_descriptors"):
                raise CheckpointError(
                    f"{where}: {name!r} is stored with transforms "
                    f"{info.field('transform_descriptors')!r} (compression?), which cmdtool "
                    "does not read; save without storage extensions"
                )
            chunks.append(_Chunk(offsets, sizes, file, start, length))
        problem = _chunks_tile(shape, chunks)
        if problem:
            raise CheckpointError(f"invalid DCP metadata {where}: {name!r} has {problem}")
        out[name] = _TensorMeta(shape, dtype, tuple(chunks))
    return out


def _select(meta: _Record, tensors: dict[str, _TensorMeta]) -> tuple[list[str], str | None]:
    """The model's tensor names (state-dict order) and the group they sit under."""
    planner = meta.field("planner_data")
    paths: dict[str, tuple[Any, ...]] = {}
    for name in tensors:
        path = planner.get(name) if isinstance(planner, dict) else None
        paths[name] = (
            tuple(path) if isinstance(path, tuple | list) and path else tuple(name.split("."))
        )
    for group in MODEL_GROUPS:
        names = [n for n, p in paths.items() if len(p) > 1 and p[0] == group]
        if names:
            return names, group
    names = [n for n, p in paths.items() if str(p[0]).lower() not in TRAINING_STATE]
    return names, None


# -------------------------------------------------------------------- reading


class _Window(io.RawIOBase):
    """Read-only, seekable view of ``length`` bytes of an open file from ``start``."""

    def __init__(self, fh: io.BufferedReader, start: int, length: int) -> None:
        super().__init__()
        self._fh, self._start, self._length, self._pos = fh, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._length - self._pos)
        if want <= 0:
            return 0
        self._fh.seek(self._start + self._pos)
        got = self._fh.readinto(view[:want]) or 0
        self._pos += got
        return got


def _verify_archive(window: _Window) -> str | None:
    """What is wrong with the ``torch.save`` archive of one chunk, or None: every record
    must be stored uncompressed, lie inside the window and match its CRC-32 (zipfile
    checks it on reading a record to its end; records written without one are only read)."""
    try:
        with zipfile.ZipFile(window) as archive:
            infos = archive.infolist()
            if not infos:
                return "the archive holds no records"
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                    return f"record {info.filename!r} is compressed or encrypted"
                if info.CRC == 0:
                    continue
                with archive.open(info) as record:
                    while record.read(_READ):
                        pass
    except Exception as exc:  # zipfile raises many kinds on a damaged archive
        return f"{type(exc).__name__}: {exc}"
    return None


class DCPReader:
    """Reader of one DCP folder; tensors are read from their byte ranges on demand.

    Parameters
    ----------
    folder : pathlib.Path
        The checkpoint folder, holding ``.metadata`` and the ``*.distcp`` files.

    Raises
    ------
    UnsafeCheckpointError
        ``.metadata`` names a global outside the metadata classes (nothing is run).
    CheckpointError
        ``.metadata`` is missing, not a DCP metadata pickle, malformed (chunks that do
        not tile their tensor, storage outside the folder, transforms), points at
        ``.distcp`` files that are missing or too short, or holds no model tensor.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder)
        # an object-store SOURCE's folder is read from a temporary local copy (removed
        # on close, or at once on failure); messages name the folder, not the copy
        self._copy = copy_folder(self.path, lambda n: n == METADATA or n.endswith(".distcp"))
        try:
            self._open()
        except BaseException as exc:
            self.close()
            if self._copy is not None and isinstance(exc, CheckpointError) and exc.args:
                exc.args = (str(exc.args[0]).replace(str(self._copy), str(self.path)),)
            raise

    def _file(self, name: str) -> Path:
        """Where the bytes of the folder's file ``name`` are read from."""
        return (self._copy or self.path) / name

    def _open(self) -> None:
        metadata_file = self._file(METADATA)
        if not metadata_file.is_file():
            raise CheckpointError(f"{self.path} is not a DCP checkpoint: no {METADATA} file")
        meta = _load_metadata(metadata_file)
        tensors = _parse(meta, self.path)
        names, self.state_key = _select(meta, tensors)
        if not names:
            raise CheckpointError(
                f"found no model tensors in DCP checkpoint {self.path} "
                f"({len(tensors)} tensors, all training state)"
            )
        self._tensors: dict[str, _TensorMeta] | None = {n: tensors[n] for n in names}
        self._check_files()

    def _check_files(self) -> None:
        sizes: dict[str, int] = {}
        for name, meta in self._live().items():
            for c in meta.chunks:
                if c.file not in sizes:
                    try:
                        sizes[c.file] = self._file(c.file).stat().st_size
                    except FileNotFoundError:
                        raise CheckpointError(
                            f"DCP checkpoint {self.path}: {c.file}, which {METADATA} names "
                            f"for {name!r}, is missing"
                        ) from None
                    except OSError as exc:
                        raise CheckpointError(
                            f"DCP checkpoint {self.path}: cannot use {c.file}: {exc}"
                        ) from exc
                if c.start + c.length > sizes[c.file]:
                    raise CheckpointError(
                        f"DCP checkpoint {self.path}: {name!r} lies at bytes {c.start}.."
                        f"{c.start + c.length} of {c.file}, which has {sizes[c.file]} "
                        "(truncated?)"
                    )

    def _live(self) -> dict[str, _TensorMeta]:
        if self._tensors is None:
            raise ValueError(f"checkpoint {self.path} is closed")
        return self._tensors

    def names(self) -> list[str]:
        return list(self._live())

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        meta = self._live()[name]
        return meta.shape, meta.dtype

    def _chunk(self, name: str, meta: _TensorMeta, chunk: _Chunk) -> torch.Tensor:
        file = self.path / chunk.file
        where = f"{name!r} in {file} (bytes {chunk.start}..{chunk.start + chunk.length})"
        try:
            with self._file(chunk.file).open("rb") as fh:
                window = _Window(fh, chunk.start, chunk.length)
                problem = _verify_archive(window)
                if problem:
                    raise CheckpointError(f"cannot read {where}: corrupt chunk: {problem}")
                window.seek(0)
                value = torch.load(cast(IO[bytes], window), map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refusing to load {where}: it cannot be loaded with weights_only=True "
                f"({str(exc).splitlines()[0] if str(exc) else 'unpickling error'})"
            ) from exc
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {where} (truncated or corrupt?): {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"cannot read {where}: it holds a {type(value).__name__}")
        if value.dtype != meta.dtype or tuple(value.shape) != chunk.sizes:
            raise CheckpointError(
                f"cannot read {where}: it holds {value.dtype} {list(value.shape)}, the "
                f"metadata says {meta.dtype} {list(chunk.sizes)}"
            )
        return value

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor, chunk by chunk (only its own byte ranges)."""
        meta = self._live()[name]
        if len(meta.chunks) == 1 and meta.chunks[0].sizes == meta.shape:
            return self._chunk(name, meta, meta.chunks[0])
        out = torch.empty(meta.shape, dtype=meta.dtype)
        for chunk in meta.chunks:
            view = out
            for dim, (o, s) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                view = view.narrow(dim, o, s)
            view.copy_(self._chunk(name, meta, chunk))
        return out

    def close(self) -> None:
        self._tensors = None
        copy = getattr(self, "_copy", None)
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)


def save_dcp(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Write ``state`` as a DCP checkpoint in ``folder``, in this process (no process group).

    Parameters
    ----------
    state : dict of str to Tensor
        Flat state dict (names may contain dots; they are kept as the DCP keys).
    folder : pathlib.Path
        The checkpoint folder to create (``torch.distributed.checkpoint.save`` writes
        ``.metadata`` and ``__0_0.distcp`` into it).
    """
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        save: Callable[..., Any] = dcp.save
        save(dict(state), checkpoint_id=os.fspath(folder), no_dist=True)
