"""What a torch file's pickle says it holds, read without unpickling anything.

``torch.load`` trusts the sizes the pickle claims: a zip-format file whose pickle claims a
storage of 64 floats for a record of 4 loads the 60 floats that follow the record (the
zip's own bytes) as weights, and a legacy file allocates whatever it claims before it
reads a byte of data. :func:`scan_pickle` follows a pickle opcode by opcode, over exactly
the opcodes torch's weights-only unpickler accepts, building only literals, tuples and
lists (never calling, importing or constructing anything), and collects:

* every storage's persistent id: its key, dtype and claimed element count, and the name of
  a tensor that uses it;
* every global the pickle names (for the unsafe-globals report, without loading it);
* the number of tensors it rebuilds (so that a file of a million tensors is refused before
  torch spends minutes building them).

:func:`check_zip_storages` and :func:`check_legacy_storages` then compare each claim with
the bytes that back it: the zip record ``<archive>/data/<key>`` must be exactly as long as
claimed, and a legacy file's data section must hold, in the order the file lists them,
each storage's 8-byte element count (equal to the claim) and its bytes, up to the end of
the file. Any disagreement is a :class:`~cmdtool.errors.CheckpointError` naming the tensor
and both sizes.
"""

from __future__ import annotations

import functools
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch._utils import IMPORT_MAPPING, NAME_MAPPING

from cmdtool.checkpoints.limits import ReadLimits, check_tensor_count
from cmdtool.errors import CheckpointError

#: The first pickle of a legacy torch file holds this number (torch.serialization.MAGIC_NUMBER).
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: The second holds the serialization protocol version.
LEGACY_PROTOCOL = 1001
_NOT_TORCH = "not a torch checkpoint (neither a zip archive nor a pickle-based torch file)"


class ScanError(Exception):
    """The pickle uses something the scan does not follow (so torch's weights-only
    unpickler refuses it too), or is truncated."""


class _TooManyTensors(Exception):
    pass


@dataclass
class Claim:
    """One storage as the pickle claims it.

    Attributes
    ----------
    key : str
        Its record name under ``data/`` (zip) or its key (legacy).
    dtype : torch.dtype
    numel : int
        Elements claimed.
    tensor : str or None
        The name of a tensor that uses it, when the pickle stores one under a string key.
    """

    key: str
    dtype: torch.dtype
    numel: int
    tensor: str | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def what(self) -> str:
        name = f"tensor {self.tensor!r}" if self.tensor is not None else f"storage {self.key!r}"
        return (
            f"{name}: the pickle claims {self.numel:,} {str(self.dtype).removeprefix('torch.')} "
            f"elements ({self.nbytes:,} bytes)"
        )


@dataclass
class PickleScan:
    """What :func:`scan_pickle` found (``value``: the pickled object when it is made of
    literals, tuples and lists only; ``end``: the offset after its STOP opcode)."""

    globals: set[str] = field(default_factory=set)
    claims: dict[str, Claim] = field(default_factory=dict)
    views: list[tuple[str, int, int]] = field(default_factory=list)  # legacy: key, offset, size
    n_tensors: int = 0
    value: Any = None
    end: int = 0


class _Global:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Storage:
    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


class _Tensor:
    __slots__ = ("key",)

    def __init__(self, key: str | None) -> None:
        self.key = key


_OPAQUE = object()  # anything the scan does not model
_MARK = object()
_BINPUT, _LONG_BINPUT = pickle.BINPUT[0], pickle.LONG_BINPUT[0]
_BINGET, _LONG_BINGET = pickle.BINGET[0], pickle.LONG_BINGET[0]
_MARK_OP, _STOP, _PROTO = pickle.MARK[0], pickle.STOP[0], pickle.PROTO[0]
_TUPLE, _TUPLE1, _TUPLE2, _TUPLE3 = (
    op[0] for op in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)
)
_EMPTY_TUPLE, _EMPTY_LIST = pickle.EMPTY_TUPLE[0], pickle.EMPTY_LIST[0]
_EMPTY_DICT, _EMPTY_SET = pickle.EMPTY_DICT[0], pickle.EMPTY_SET[0]
_NONE, _NEWTRUE, _NEWFALSE = pickle.NONE[0], pickle.NEWTRUE[0], pickle.NEWFALSE[0]
_BININT, _BININT1, _BININT2 = pickle.BININT[0], pickle.BININT1[0], pickle.BININT2[0]
_BINFLOAT, _LONG1 = pickle.BINFLOAT[0], pickle.LONG1[0]
_BINUNICODE, _SHORT_BINSTRING = pickle.BINUNICODE[0], pickle.SHORT_BINSTRING[0]
_GLOBAL, _REDUCE, _NEWOBJ, _BUILD = (
    op[0] for op in (pickle.GLOBAL, pickle.REDUCE, pickle.NEWOBJ, pickle.BUILD)
)
_APPEND, _APPENDS, _SETITEM, _SETITEMS = (
    op[0] for op in (pickle.APPEND, pickle.APPENDS, pickle.SETITEM, pickle.SETITEMS)
)
_BINPERSID = pickle.BINPERSID[0]
_PARAMETER_REBUILDS = (
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
)


@functools.lru_cache(maxsize=64)
def _storage_dtype(type_name: str) -> torch.dtype:
    module, _, cls = type_name.rpartition(".")
    if cls == "UntypedStorage":
        return torch.uint8
    if module != "torch":
        raise ScanError(f"storage type {type_name} is not a torch storage")
    try:
        return torch.serialization.StorageType(cls).dtype
    except (KeyError, AttributeError) as exc:
        raise ScanError(f"unknown storage type {type_name}") from exc


class _Scanner:
    """One pass over one pickle; see :func:`scan_pickle`."""

    def __init__(self, buf: Any, pos: int, stop: int, max_tensors: int | None) -> None:
        self.buf = buf
        self.pos = pos
        self.stop = stop
        self.max_tensors = max_tensors
        self.out = PickleScan()

    def line(self) -> str:
        end = self.buf.find(b"\n", self.pos, self.stop)
        if end < 0:
            raise ScanError("the pickle is truncated")
        text = bytes(self.buf[self.pos : end])
        self.pos = end + 1
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ScanError("a global's name is not UTF-8") from exc

    def persistent(self, pid: Any) -> Any:
        """A persistent id: ``('storage', type, key, location, numel[, view])``."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6)):
            raise ScanError("a persistent id that is not a storage")
        kind, stype, key, _location, numel = pid[:5]
        if isinstance(kind, bytes):
            kind = kind.decode("ascii", "replace")
        if kind != "storage" or not isinstance(stype, _Global) or not isinstance(key, str):
            raise ScanError("a persistent id that is not a storage")
        if type(numel) is not int or numel < 0:
            raise ScanError("a storage with an invalid element count")
        dtype = _storage_dtype(stype.name)
        claims = self.out.claims
        old = claims.get(key)
        if old is None:
            claims[key] = Claim(key, dtype, numel)
        elif old.numel * old.dtype.itemsize != numel * dtype.itemsize:
            raise CheckpointError(
                f"{old.what()} but also {numel:,} {str(dtype).removeprefix('torch.')} elements "
                "elsewhere (corrupt or crafted file)"
            )
        if len(pid) == 6 and pid[5] is not None:  # legacy view of a root storage
            view = pid[5]
            if not (
                isinstance(view, tuple)
                and len(view) == 3
                and isinstance(view[0], str)
                and all(type(v) is int and v >= 0 for v in view[1:])
            ):
                raise ScanError("a storage view of an invalid form")
            self.out.views.append((key, view[1], view[2]))
            return _Storage(key)
        return _Storage(key)

    def reduce(self, func: Any, args: Any) -> Any:
        if not isinstance(func, _Global) or not isinstance(args, tuple):
            return _OPAQUE
        name = func.name
        if name in _PARAMETER_REBUILDS:
            return args[0] if args and isinstance(args[0], _Tensor) else _OPAQUE
        inner: Any = None
        if name.startswith("torch._utils._rebuild"):
            inner = args[0] if args else None
        elif name == "torch._tensor._rebuild_from_type_v2":
            sub = args[2] if len(args) > 2 else None
            inner = sub[0] if isinstance(sub, tuple) and sub else None
        else:
            return _OPAQUE
        self.out.n_tensors += 1
        if self.max_tensors is not None and self.out.n_tensors > self.max_tensors:
            raise _TooManyTensors
        if isinstance(inner, _Tensor):
            return inner
        return _Tensor(inner.key if isinstance(inner, _Storage) else None)

    def name_tensor(self, key: Any, value: Any) -> None:
        if isinstance(value, _Tensor) and value.key is not None and isinstance(key, str):
            claim = self.out.claims.get(value.key)
            if claim is not None and claim.tensor is None:
                claim.tensor = key

    def run(self) -> PickleScan:
        """The opcode loop: locals only, the most frequent opcodes first (a file of a
        million tensors is twenty million opcodes)."""
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        memo: dict[int, Any] = {}
        out = self.out
        buf, pos, stop = self.buf, self.pos, self.stop
        unpack = struct.unpack_from
        try:
            while True:
                if pos >= stop:
                    raise ScanError("the pickle is truncated")
                op = buf[pos]
                pos += 1
                if op == _BINGET:
                    stack.append(memo[buf[pos]])
                    pos += 1
                elif op == _MARK_OP:
                    metastack.append(stack)
                    stack = []
                elif op == _BININT1:
                    stack.append(buf[pos])
                    pos += 1
                elif op == _TUPLE1:
                    stack[-1] = (stack[-1],)
                elif op == _REDUCE:
                    args = stack.pop()
                    stack[-1] = self.reduce(stack[-1], args)
                elif op == _TUPLE:
                    items = stack
                    stack = metastack.pop()
                    stack.append(tuple(items))
                elif op == _BINUNICODE:
                    (n,) = unpack("<I", buf, pos)
                    pos += 4
                    if pos + n > stop:
                        raise ScanError("the pickle is truncated")
                    stack.append(str(buf[pos : pos + n], "utf-8", "surrogatepass"))
                    pos += n
                elif op == _BINPUT:
                    memo[buf[pos]] = stack[-1]
                    pos += 1
                elif op == _BININT:
                    stack.append(unpack("<i", buf, pos)[0])
                    pos += 4
                elif op == _NEWFALSE:
                    stack.append(False)
                elif op == _EMPTY_TUPLE:
                    stack.append(())
                elif op == _BINPERSID:
                    stack.append(self.persistent(stack.pop()))
                elif op == _LONG_BINGET:
                    stack.append(memo[unpack("<I", buf, pos)[0]])
                    pos += 4
                elif op == _LONG_BINPUT:
                    memo[unpack("<I", buf, pos)[0]] = stack[-1]
                    pos += 4
                elif op == _SETITEMS:
                    items = stack
                    stack = metastack.pop()
                    if not stack:
                        raise ScanError("the pickle is malformed")
                    for i in range(0, len(items) - 1, 2):
                        self.name_tensor(items[i], items[i + 1])
                elif op == _SETITEM:
                    value, key = stack.pop(), stack.pop()
                    if not stack:
                        raise ScanError("the pickle is malformed")
                    self.name_tensor(key, value)
                elif op == _TUPLE2:
                    stack[-2:] = [(stack[-2], stack[-1])]
                elif op == _TUPLE3:
                    stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
                elif op == _NEWTRUE:
                    stack.append(True)
                elif op == _NONE:
                    stack.append(None)
                elif op == _EMPTY_LIST:
                    stack.append([])
                elif op == _EMPTY_DICT or op == _EMPTY_SET:
                    stack.append(_OPAQUE)
                elif op == _GLOBAL:
                    self.pos = pos
                    module, name = self.line(), self.line()
                    pos = self.pos
                    if (module, name) in NAME_MAPPING:
                        module, name = NAME_MAPPING[(module, name)]
                    elif module in IMPORT_MAPPING:
                        module = IMPORT_MAPPING[module]
                    out.globals.add(f"{module}.{name}")
                    stack.append(_Global(f"{module}.{name}"))
                elif op == _NEWOBJ:
                    args = stack.pop()
                    stack.pop()
                    keep = isinstance(args, tuple) and args and isinstance(args[0], _Tensor)
                    stack.append(args[0] if keep else _OPAQUE)
                elif op == _BUILD:
                    stack.pop()
                    if not stack:
                        raise ScanError("the pickle is malformed")
                elif op == _APPEND:
                    item = stack.pop()
                    if isinstance(stack[-1], list):
                        stack[-1].append(item)
                elif op == _APPENDS:
                    items = stack
                    stack = metastack.pop()
                    if isinstance(stack[-1], list):
                        stack[-1].extend(items)
                elif op == _BININT2:
                    stack.append(unpack("<H", buf, pos)[0])
                    pos += 2
                elif op == _BINFLOAT:
                    stack.append(unpack(">d", buf, pos)[0])
                    pos += 8
                elif op == _LONG1 or op == _SHORT_BINSTRING:
                    n = buf[pos]
                    pos += 1
                    if pos + n > stop:
                        raise ScanError("the pickle is truncated")
                    raw = bytes(buf[pos : pos + n])
                    pos += n
                    if op == _LONG1:
                        stack.append(int.from_bytes(raw, "little", signed=True))
                    else:
                        stack.append(raw.decode("utf-8"))
                elif op == _PROTO:
                    pos += 1
                elif op == _STOP:
                    if pos > stop:
                        raise ScanError("the pickle is truncated")
                    out.value = stack.pop()
                    out.end = pos
                    return out
                else:
                    raise ScanError("an opcode torch's weights-only unpickler does not accept")
        except (IndexError, KeyError, struct.error, UnicodeDecodeError) as exc:
            raise ScanError("the pickle is malformed or truncated") from exc


def scan_pickle(
    buf: Any, pos: int = 0, stop: int | None = None, *, max_tensors: int | None = None
) -> PickleScan:
    """Follow one pickle in ``buf[pos:stop]`` without executing anything.

    Parameters
    ----------
    buf : bytes or mmap.mmap
    pos, stop : int
        Where the pickle starts, and the end of the bytes it may use (default: all).
    max_tensors : int, optional
        Stop with ``_TooManyTensors`` once more tensors than this are rebuilt.

    Returns
    -------
    PickleScan

    Raises
    ------
    ScanError
        Not a pickle this scan (and torch's weights-only unpickler) follows.
    CheckpointError
        A storage is claimed with two different sizes.
    """
    return _Scanner(buf, pos, len(buf) if stop is None else stop, max_tensors).run()


def _scan_limited(path: Path, buf: Any, pos: int, stop: int, limits: ReadLimits) -> PickleScan:
    try:
        scan = scan_pickle(buf, pos, stop, max_tensors=limits.max_tensors)
    except _TooManyTensors:
        check_tensor_count(path, limits.max_tensors + 1, limits, at_least=True)
        raise AssertionError("unreachable") from None
    if len(scan.claims) > limits.max_tensors:
        check_tensor_count(path, len(scan.claims), limits, at_least=True)
    return scan


def check_zip_storages(
    path: Path, buf: Any, records: dict[str, tuple[int, int]], limits: ReadLimits
) -> PickleScan | None:
    """Check every storage a torch zip's pickle claims against its record.

    Parameters
    ----------
    path : pathlib.Path
    buf : mmap.mmap
        The whole file.
    records : dict
        Record name -> (offset of its data in the file, its size), of a verified archive.
    limits : ReadLimits

    Returns
    -------
    PickleScan or None
        None when the pickle cannot be followed (torch then refuses it too).

    Raises
    ------
    CheckpointError
        No ``data.pkl`` record (not a torch file), a claim that does not match its record
        exactly or has none, or more tensors than ``limits.max_tensors``.
    """
    prefix = next(iter(records)).split("/", 1)[0]
    pkl = records.get(f"{prefix}/data.pkl")
    if pkl is None or any(not name.startswith(prefix + "/") for name in records):
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a torch checkpoint (a zip archive without "
            "the one folder and data.pkl record torch writes)"
        )
    start, size = pkl
    try:
        scan = _scan_limited(path, buf, start, start + size, limits)
    except ScanError:
        return None
    for key, claim in scan.claims.items():
        name = f"{prefix}/data/{key}"
        record = records.get(name)
        if record is None:
            raise CheckpointError(
                f"cannot read checkpoint {path}: {claim.what()} in record {name!r}, which the "
                "archive lacks (corrupt or crafted file)"
            )
        if record[1] != claim.nbytes:
            raise CheckpointError(
                f"cannot read checkpoint {path}: {claim.what()} but its record {name!r} holds "
                f"{record[1]:,} bytes (corrupt or crafted file)"
            )
    return scan


def _legacy_header(path: Path, buf: Any) -> int:
    """Skip a legacy file's magic number, protocol and system-info pickles; return the
    offset of the main pickle. Raise CheckpointError if the file is not a torch file."""
    try:
        magic = scan_pickle(buf, 0, max_tensors=0)
    except (ScanError, _TooManyTensors):
        magic = None
    if magic is None or magic.value != LEGACY_MAGIC:
        raise CheckpointError(f"cannot read checkpoint {path}: {_NOT_TORCH}")
    try:
        protocol = scan_pickle(buf, magic.end, max_tensors=0)
        if protocol.value != LEGACY_PROTOCOL:
            raise CheckpointError(
                f"cannot read checkpoint {path}: a legacy torch file of an unknown protocol "
                "version (corrupt?)"
            )
        return scan_pickle(buf, protocol.end, max_tensors=0).end
    except (ScanError, _TooManyTensors) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: a legacy torch file whose header is corrupt"
        ) from exc


def check_legacy_storages(path: Path, buf: Any, limits: ReadLimits) -> PickleScan | None:
    """Check a legacy (non-zip) torch file's storages against its data section.

    After the main pickle come the list of storage keys (a pickle) and, for each key in
    that order, an int64 element count and the storage's bytes, to the end of the file.

    Parameters
    ----------
    path : pathlib.Path
    buf : mmap.mmap or bytes
        The whole file.
    limits : ReadLimits

    Returns
    -------
    PickleScan or None
        None when the main pickle cannot be followed (torch then refuses it too).

    Raises
    ------
    CheckpointError
        Not a torch file; a storage without data, data without a claim, or a claim that
        differs from the data's own count; data running past the end of the file or bytes
        after it; more tensors than ``limits.max_tensors``.
    """
    size = len(buf)
    main_at = _legacy_header(path, buf)
    try:
        scan = _scan_limited(path, buf, main_at, size, limits)
        keys = scan_pickle(buf, scan.end, max_tensors=0)
    except (ScanError, _TooManyTensors):
        return None
    if not isinstance(keys.value, list) or not all(isinstance(k, str) for k in keys.value):
        return None
    where = f"cannot read checkpoint {path}"
    offset = keys.end
    for key in keys.value:
        claim = scan.claims.get(key)
        if claim is None:
            raise CheckpointError(
                f"{where}: it holds data for storage {key!r}, which its pickle never names "
                "(corrupt or crafted file)"
            )
        if offset + 8 > size:
            raise CheckpointError(f"{where}: {claim.what()}, but the file ends before its data")
        count = int.from_bytes(bytes(buf[offset : offset + 8]), "little", signed=True)
        if count != claim.numel:
            raise CheckpointError(
                f"{where}: {claim.what()} but its data holds {max(count, 0):,} elements "
                "(corrupt or crafted file)"
            )
        offset += 8 + claim.nbytes
        if offset > size:
            raise CheckpointError(
                f"{where}: {claim.what()} but the file ends {offset - size:,} bytes before "
                "its data does (truncated?)"
            )
    listed = set(keys.value)
    unbacked = [c for k, c in scan.claims.items() if k not in listed]
    if unbacked:
        raise CheckpointError(
            f"{where}: {unbacked[0].what()} but the file holds no data for it "
            "(corrupt or crafted file)"
        )
    if offset != size:
        raise CheckpointError(
            f"{where}: {size - offset:,} bytes follow the last storage's data (corrupt?)"
        )
    for key, start, length in scan.views:
        root = scan.claims[key]
        if start + length > root.numel:
            raise CheckpointError(
                f"{where}: a view of elements {start:,}..{start + length:,} of {root.what()}"
            )
    return scan
