"""torch and Lightning files: zip records verified, pickles read weights-only.

* a zip-format torch file must be a complete archive of stored records whose CRC-32
  checksums match, so a flipped bit or a truncated download is an error rather than
  silently different weights;
* pickle-based files are only ever read with ``torch.load(..., weights_only=True)``
  (passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off): a
  file that would need arbitrary code to be unpickled raises
  :class:`~cmdtool.errors.UnsafeCheckpointError` instead of being loaded, unless the
  globals it names are listed in ``allow_globals``, in which case inert placeholders
  stand in for them and none of their code is imported or run;
* the dict of tensors is picked from the loaded object (state selection).
"""

from __future__ import annotations

import mmap as mmap_module
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from cmdtool.checkpoints.limits import ReadLimits, check_layout, check_tensor_count
from cmdtool.checkpoints.torchscan import PickleScan, check_legacy_storages, check_zip_storages
from cmdtool.errors import (
    CheckpointError,
    UnsafeCheckpointError,
)

#: and the averaged ones in ``state_dict``; the raw weights are the trajectory.
_STATE_KEYS = ("current_model_state", "state_dict", "model_state_dict", "model")
#: A global the weights-only unpickler refused, as its error message names it.
_REFUSED_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)")
#: What ``allow_globals`` accepts: a dotted ``module.QualName``.
QUALNAME_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
#: Most distinct refused globals looked for when explaining why a file is unsafe.
_MAX_GLOBALS = 256
_ZIP_MAGIC = b"PK\x03\x04"
#: Local file header of a zip record: signature ... file name length, extra field length.
ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
ZIP_LOCAL_SIGNATURE = 0x04034B50
_CHUNK = 1 << 20
def _is_zip(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == _ZIP_MAGIC
    except OSError:
        return False


def _check_zip_record(fh: Any, size: int, info: zipfile.ZipInfo) -> tuple[str | None, int]:
    """What is wrong with one record of a torch zip archive (or None), and the offset of
    its data in the file."""
    name = info.filename
    if info.flag_bits & 0x1:
        return f"record {name!r} is encrypted", 0
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        return (
            f"record {name!r} is compressed (method {info.compress_type}); torch stores records",
            0,
        )
    fh.seek(info.header_offset)
    local = fh.read(ZIP_LOCAL_HEADER.size)
    if len(local) != ZIP_LOCAL_HEADER.size:
        return f"record {name!r} starts past the end of the file (truncated?)", 0
    fields = ZIP_LOCAL_HEADER.unpack(local)
    if fields[0] != ZIP_LOCAL_SIGNATURE:
        return f"record {name!r} has no local header where the directory puts it", 0
    flags, name_len, extra_len = fields[2], fields[9], fields[10]
    local_name = fh.read(name_len).decode("utf-8" if flags & 0x800 else "cp437")
    if local_name != info.orig_filename:
        return f"record {name!r} is named {local_name!r} in its local header", 0
    start = info.header_offset + ZIP_LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > size:
        return f"record {name!r} runs past the end of the file (truncated?)", start
    if info.CRC == 0:  # written with torch.serialization.set_crc32_options(False)
        return None, start
    fh.seek(start)
    crc, left = 0, info.file_size
    while left:
        chunk = fh.read(min(left, _CHUNK))
        if not chunk:
            return f"record {name!r} runs past the end of the file (truncated?)", start
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    if crc != info.CRC:
        return (
            f"record {name!r} fails its CRC-32 check (its bytes changed since it was written)",
            start,
        )
    return None, start


def _is_torch_archive(infos: list[zipfile.ZipInfo]) -> bool:
    """Whether the records are laid out as torch writes them: one top folder holding
    ``data.pkl`` (checked before any record name is put in a message)."""
    prefix = infos[0].filename.split("/", 1)[0]
    names = {info.filename for info in infos}
    return f"{prefix}/data.pkl" in names and all(n.startswith(prefix + "/") for n in names)


def _verify_zip(path: Path) -> dict[str, tuple[int, int]]:
    """Check a zip-format torch file is a complete archive whose records match their CRC-32.

    ``torch.load`` checks no checksum, so without this a flipped bit in a tensor or in
    the pickle would load as silently different weights (or names). Records written
    without a checksum (CRC 0, see ``torch.serialization.set_crc32_options``) are only
    checked for completeness. Reads the file once in 1 MiB chunks. A zip archive that is
    not laid out as torch writes one is refused without naming any of its records.

    Returns
    -------
    dict
        Record name -> (offset of its data in the file, its size in bytes).
    """
    records: dict[str, tuple[int, int]] = {}
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            with zipfile.ZipFile(fh) as archive:
                infos = archive.infolist()
            if not infos:
                problem: str | None = "the archive holds no records"
            elif not _is_torch_archive(infos):
                raise CheckpointError(
                    f"cannot read checkpoint {path}: not a torch checkpoint (a zip archive "
                    "without the one folder and data.pkl record torch writes)"
                )
            else:
                problem = None
                for info in infos:
                    problem, start = _check_zip_record(fh, size, info)
                    if problem:
                        break
                    records[info.filename] = (start, info.file_size)
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile raises many kinds on a damaged archive
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a valid zip archive (truncated or corrupt?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if problem:
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt zip archive: {problem}")
    return records


def _check_storages(path: Path, is_zip: bool, limits: ReadLimits) -> PickleScan | None:
    """Check the storages a torch file's pickle claims against the bytes behind them
    (:mod:`~cmdtool.checkpoints.torchscan`), before ``torch.load`` trusts them.

    Returns the scan, or None when the pickle cannot be followed (torch's weights-only
    unpickler then refuses it too). A file that is neither a zip archive nor a legacy
    torch pickle is refused without quoting any of its bytes.
    """
    records = _verify_zip(path) if is_zip else {}
    try:
        with path.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
            with mmap_module.mmap(fh.fileno(), 0, access=mmap_module.ACCESS_READ) as buf:
                if is_zip:
                    return check_zip_storages(path, buf, records, limits)
                return check_legacy_storages(path, buf, limits)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc


class _InertObject(dict[str, Any]):
    """Inert stand-in for a global named in ``allow_globals``.

    The weights-only unpickler may create it (``NEWOBJ``), call it (``REDUCE``) with any
    arguments and give it any state (``BUILD``, through :meth:`__setstate__`); it keeps
    that state and runs nothing. Being a dict, it reads as an empty mapping.
    """

    qualname: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _InertObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # not dict.__init__: the arguments are the real class's, not a dict's

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<inert placeholder for {self.qualname}>"


class _InertMapping:
    """Stand-in for an allowed global pickled as a dict subclass (with ``SETITEMS``).

    The unpickler only sets items on exact ``dict``, ``OrderedDict`` and ``Counter``
    objects, so constructing it yields a plain :class:`collections.Counter`, which also
    takes instance state (``BUILD``) as attributes.
    """

    qualname: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Counter[Any]:  # type: ignore[misc]
        return Counter()


class _InertSequence:
    """Stand-in for an allowed global pickled as a list subclass (with ``APPENDS``)."""

    qualname: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> list[Any]:  # type: ignore[misc]
        return []


_InertKind = type[_InertObject] | type[_InertMapping] | type[_InertSequence]


def _inert_class(index: int, qualname: str, base: _InertKind) -> type:
    """A fresh subclass of ``base`` standing in for ``qualname`` during one load."""
    name = f"_Inert{index}"
    return type(name, (base,), {"__module__": __name__, "__qualname__": name, "qualname": qualname})


def _weights_only_load(path: Path, allow_globals: Sequence[str], *, mmap: bool) -> Any:
    """``torch.load(weights_only=True)``, with inert placeholders for ``allow_globals``.

    The placeholders are registered with :func:`torch.serialization.safe_globals` for the
    duration of the load only; the real objects are never imported. A placeholder that
    the file fills with items (a pickled dict or list subclass) is swapped for a mapping
    or sequence stand-in and the load retried, at most once per name.
    """
    names = list(dict.fromkeys(allow_globals))
    kinds: dict[str, _InertKind] = dict.fromkeys(names, _InertObject)
    while True:
        classes = {name: _inert_class(i, name, kinds[name]) for i, name in enumerate(names)}
        try:
            with torch.serialization.safe_globals([(cls, name) for name, cls in classes.items()]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            message = str(exc)
            if "SETITEM" in message:
                swap: _InertKind = _InertMapping
            elif "append to lists" in message or "extend lists" in message:
                swap = _InertSequence
            else:
                raise
            misused = [
                name
                for name, cls in classes.items()
                if kinds[name] is _InertObject and f"'{__name__}.{cls.__qualname__}'" in message
            ]
            if not misused:
                raise
            kinds[misused[0]] = swap


def _refused_globals(message: str) -> set[str]:
    """The globals a weights-only error message says were refused, as full names."""
    # torch prints builtins without their module ("GLOBAL getattr"): put it back.
    return {n if "." in n else f"builtins.{n}" for n in _REFUSED_GLOBAL_RE.findall(message)}


def _torch_safe_globals() -> set[str] | None:
    """The globals torch's weights-only unpickler accepts now, or None if unknown."""
    try:
        from torch import _weights_only_unpickler as unpickler

        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except Exception:  # a private API: fall back to what the refusals say
        return None


def _needed_globals(
    path: Path,
    allow_globals: Sequence[str],
    exc: BaseException,
    *,
    mmap: bool,
    named: set[str] | None = None,
) -> tuple[list[str], str | None]:
    """The globals beyond ``allow_globals`` that ``path`` needs to load.

    ``named`` are the globals the file's pickle names (from the scan): with them, one
    trial load with placeholders for all the unsafe ones decides; without them, each
    trial load can only reveal one more refused global.

    Returns
    -------
    names : list of str
        Sorted; empty if the refusal was not about globals.
    blocker : str or None
        None if allowing ``names`` too makes the file load (checked by loading it with
        placeholders, which runs none of their code); else why it still would not.
    """
    allowed = set(allow_globals)
    found = _refused_globals(str(exc))
    safe = _torch_safe_globals() if named is not None else None
    if named is not None and safe is not None:
        found |= named - safe
    elif mmap:  # zip format: torch can list the globals without unpickling
        try:
            found |= {str(g) for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)}
        except Exception:
            pass
    found -= allowed
    if not found:
        return [], None
    blocker: str | None = None
    for _ in range(_MAX_GLOBALS):
        try:
            _weights_only_load(path, [*allow_globals, *sorted(found)], mmap=mmap)
        except Exception as retry:
            new = _refused_globals(str(retry)) - found - allowed
            blocker = _unpickler_reason(str(retry))
            if not new or len(found) >= _MAX_GLOBALS:
                break
            found |= new
        else:
            blocker = None
            break
    return sorted(found), blocker


def _unpickler_reason(message: str) -> str:
    """The useful sentence of torch's long weights-only error message."""
    for marker in ("WeightsUnpickler error:", "from a trusted source."):
        if marker in message:
            message = message.split(marker, 1)[1]
            break
    reason = message.split("Check the documentation", 1)[0]
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    return " ".join(reason.split()) or "rejected by the weights-only unpickler"


_RESAVE_HINT = (
    "re-save just the weights (e.g. torch.save(model.state_dict(), ...) or safetensors) "
    "in a trusted environment and ingest those"
)


def _unsafe_error(
    path: Path, names: list[str], blocker: str | None, allow_globals: Sequence[str]
) -> UnsafeCheckpointError:
    """The refusal of a file that needs the pickled globals ``names``."""
    listed = ", ".join(names)
    beyond = (
        f" beyond those allowed ({', '.join(sorted(set(allow_globals)))})" if allow_globals else ""
    )
    head = (
        f"refusing to load {path}: unpickling it needs the global(s) {listed}{beyond}, "
        "which could run code, and cmdtool loads pickles with weights_only=True only"
    )
    if blocker is None:
        flags = " ".join(f"--allow-global {name}" for name in names)
        return UnsafeCheckpointError(
            f"{head}. If you trust them, pass --allow-global QUALNAME for each ({flags}): "
            "cmdtool then puts inert placeholders in their place, never imports or runs "
            f"them, and uses only the tensors. Otherwise, {_RESAVE_HINT}"
        )
    return UnsafeCheckpointError(
        f"{head}; even with --allow-global for each it could not be loaded ({blocker}). "
        f"Instead, {_RESAVE_HINT}"
    )


def _load_error(
    path: Path,
    exc: BaseException,
    allow_globals: Sequence[str],
    *,
    mmap: bool,
    named: set[str] | None = None,
) -> CheckpointError:
    """Turn a ``torch.load(weights_only=True)`` failure into the matching error."""
    message = str(exc)
    if not (isinstance(exc, pickle.UnpicklingError) or "weights_only" in message):
        return CheckpointError(
            f"cannot read checkpoint {path} (truncated or corrupt?): "
            f"{message or type(exc).__name__}"
        )
    names, blocker = _needed_globals(path, allow_globals, exc, mmap=mmap, named=named)
    if names:
        return _unsafe_error(path, names, blocker, allow_globals)
    reason = _unpickler_reason(message)
    if "Unsupported operand" in reason:
        return CheckpointError(
            f"cannot read checkpoint {path}: corrupt or not a torch checkpoint ({reason})"
        )
    return UnsafeCheckpointError(
        f"refusing to load {path}: it cannot be loaded with weights_only=True ({reason}). "
        f"Instead, {_RESAVE_HINT}"
    )


def _torch_load(
    path: Path, allow_globals: Sequence[str] = (), limits: ReadLimits | None = None
) -> Any:
    """Load a torch / Lightning file safely; every failure is a :class:`CheckpointError`.

    Zip-format files are verified (:func:`_verify_zip`) and then memory-mapped; legacy
    files (which cannot be mapped) are read whole. Before either is loaded, every storage
    its pickle claims is checked against the bytes behind it and its tensors are counted
    (:func:`_check_storages`). ``weights_only=True`` is always passed explicitly, so
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` has no effect.
    """
    limits = limits or ReadLimits()
    mmap = _is_zip(path)
    scan = _check_storages(path, mmap, limits)
    named = scan.globals if scan is not None else None
    try:
        obj = _weights_only_load(path, allow_globals, mmap=mmap)
    except Exception as exc:
        raise _load_error(path, exc, allow_globals, mmap=mmap, named=named) from exc
    if scan is None:  # torch accepted what the scan could not follow: refuse, unchecked
        raise CheckpointError(
            f"cannot read checkpoint {path}: cmdtool cannot check the storage sizes its pickle "
            "claims (an unusual pickle); re-save it with torch.save"
        )
    return obj


def _tensors_of(value: Any) -> dict[str, torch.Tensor]:
    """The tensor values of a dict under string keys, in insertion order."""
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


#: What ``state="averaged"`` picks first: Lightning's averaged weights, when both exist.
_AVERAGED_KEYS = ("state_dict", "current_model_state", "model_state_dict", "model")
STATES = ("raw", "averaged")


def _select_state(
    obj: Any, path: Path, state: str = "raw"
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the dict of tensors in a loaded torch / Lightning checkpoint (``state``:
    ``"raw"`` prefers ``current_model_state``, ``"averaged"`` ``state_dict``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)"
        )
    # A nested state dict wins over stray top-level tensors (a saved loss or metric);
    # in a flat state dict no value is a dict, so these keys never match there.
    for key in _AVERAGED_KEYS if state == "averaged" else _STATE_KEYS:
        tensors = _tensors_of(obj.get(key))
        if tensors:
            return tensors, key
    if "state_dict" not in obj:
        flat = _tensors_of(obj)
        if flat:
            return flat, None
    seen = ", ".join(sorted(repr(k) if not isinstance(k, str) else k for k in obj)) or "none"
    raise CheckpointError(
        f"found no tensors in {path}: expected a state dict, or one under "
        f"{', '.join(_STATE_KEYS)}; top-level keys: {seen}"
    )


class TorchReader:
    """Reader of one torch / Lightning file; tensors are memory-mapped when possible."""

    def __init__(
        self,
        path: Path,
        allow_globals: Sequence[str] = (),
        state: str = "raw",
        limits: ReadLimits | None = None,
    ) -> None:
        self.path = path
        limits = limits or ReadLimits()
        loaded = _torch_load(path, allow_globals, limits)
        tensors, self.state_key = _select_state(loaded, path, state)
        check_tensor_count(path, len(tensors), limits)
        for name, tensor in tensors.items():
            check_layout(path, name, tensor, limits)
        self._tensors: dict[str, torch.Tensor] | None = tensors

    def _live(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            raise ValueError(f"checkpoint {self.path} is closed")
        return self._tensors

    def names(self) -> list[str]:
        return list(self._live())

    def get(self, name: str) -> torch.Tensor:
        tensor = self._live()[name]
        return tensor.detach() if tensor.requires_grad else tensor

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        tensor = self._live()[name]
        return tuple(tensor.shape), tensor.dtype

    def close(self) -> None:
        self._tensors = None

