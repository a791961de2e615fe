"""Find checkpoint files in a folder, order them by epoch, and read each format safely.

Recognised layouts, directly inside the SOURCE folder:

* ``*.safetensors`` files (kind ``"safetensors"``);
* Hugging Face Trainer folders ``checkpoint-<step>/`` (kind ``"hf"``) holding
  ``model.safetensors``, shards listed by ``model.safetensors.index.json``,
  ``pytorch_model.bin`` or shards listed by ``pytorch_model.bin.index.json``;
* torch state dicts ``*.pt``, ``*.pth``, ``*.bin`` (kind ``"torch"``);
* Lightning checkpoints ``*.ckpt`` (kind ``"lightning"``).

Training by-products (optimizer, scheduler, scaler and RNG states, ``training_args.bin``)
are recognised by name and never opened.

Every file is checked before it is decoded:

* a safetensors file's header is validated with plain reads (size limits, JSON layout,
  dtypes, shapes, and data offsets that tile the rest of the file exactly) before
  :func:`safetensors.safe_open` sees it;
* a zip-format torch file must be a complete archive of stored records whose CRC-32
  checksums match, so a flipped bit or a truncated download is an error rather than
  silently different weights;
* pickle-based files are only ever read with ``torch.load(..., weights_only=True)``
  (passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off): a
  file that would need arbitrary code to be unpickled raises
  :class:`~cmdtool.errors.UnsafeCheckpointError` instead of being loaded, unless the
  globals it names are listed in ``allow_globals``, in which case inert placeholders
  stand in for them and none of their code is imported or run.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from typing import Any, ClassVar, Protocol

import torch
from safetensors import safe_open

from cmdtool.errors import (
    CheckpointError,
    SourceNotFoundError,
    UnsafeCheckpointError,
    UsageError,
)

__all__ = [
    "Checkpoint",
    "CheckpointEntry",
    "canonical_name",
    "discover",
    "natural_label",
    "open_checkpoint",
]

#: File suffix (lower case) -> entry kind, for files directly inside SOURCE.
_SUFFIX_KINDS: dict[str, str] = {
    ".safetensors": "safetensors",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "lightning",
}
#: Files that hold training state rather than model weights; never opened.
_NON_WEIGHT_NAMES = frozenset(
    {
        "optimizer.pt",
        "optimizer.bin",
        "scheduler.pt",
        "scaler.pt",
        "training_args.bin",
        "trainer_state.json",
    }
)
_NON_WEIGHT_PREFIXES = ("optimizer", "scheduler", "rng_state", "training_args", "scaler")
#: Folders picked up as Hugging Face Trainer checkpoints without a ``pattern``.
_HF_DIR_GLOB = "checkpoint-*"
#: Weight files of a Hugging Face checkpoint folder, in order of preference:
#: (file name, is an index of shards).
_HF_WEIGHTS: tuple[tuple[str, bool], ...] = (
    ("model.safetensors", False),
    ("model.safetensors.index.json", True),
    ("pytorch_model.bin", False),
    ("pytorch_model.bin.index.json", True),
)
_HF_SINGLE_FILES = frozenset(name for name, is_index in _HF_WEIGHTS if not is_index)
#: Keys of a torch / Lightning checkpoint dict that may hold the state dict, by priority.
#: Lightning's weight-averaging callback keeps the raw weights in ``current_model_state``
#: and the averaged ones in ``state_dict``; the raw weights are the trajectory.
_STATE_KEYS = ("current_model_state", "state_dict", "model_state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_LOOKED_FOR = (
    "*.safetensors, *.pt, *.pth, *.bin and *.ckpt files, and checkpoint-<step>/ folders "
    "holding model.safetensors, model.safetensors.index.json or pytorch_model.bin"
)

_EPOCH_RE = re.compile(r"epoch[=_-]*(\d+)", re.IGNORECASE)
_STEP_RE = re.compile(r"(?:checkpoint-|step[=_-])(\d+)", re.IGNORECASE)
_DIGITS_RE = re.compile(r"\d+")
#: A global the weights-only unpickler refused, as its error message names it.
_REFUSED_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)")
#: What ``allow_globals`` accepts: a dotted ``module.QualName``.
_QUALNAME_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
#: Most distinct refused globals looked for when explaining why a file is unsafe.
_MAX_GLOBALS = 256
_ZIP_MAGIC = b"PK\x03\x04"
#: Local file header of a zip record: signature ... file name length, extra field length.
_ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_ZIP_LOCAL_SIGNATURE = 0x04034B50
_CHUNK = 1 << 20
#: safetensors refuses headers longer than this (``MAX_HEADER_SIZE``); so does cmdtool.
_ST_MAX_HEADER = 100_000_000
#: Bytes per element of each safetensors dtype code.
_ST_ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
#: safetensors dtype codes of fewer than 8 bits per element, which cmdtool refuses.
_ST_SUBBYTE = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
#: Element counts must fit torch's int64 sizes (offsets are bounded by the file size).
_INT64_MAX = 2**63 - 1


def _safetensors_dtypes() -> dict[str, torch.dtype]:
    """Map safetensors dtype names to the torch dtypes this torch build has."""
    names = {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "I16": "int16",
        "U16": "uint16",
        "I32": "int32",
        "U32": "uint32",
        "I64": "int64",
        "U64": "uint64",
        "F16": "float16",
        "BF16": "bfloat16",
        "F32": "float32",
        "F64": "float64",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
    }
    found = {code: getattr(torch, attr, None) for code, attr in names.items()}
    return {code: dtype for code, dtype in found.items() if isinstance(dtype, torch.dtype)}


_ST_DTYPES = _safetensors_dtypes()


# --------------------------------------------------------------------------- names


def natural_label(name: str) -> int | None:
    """Return the epoch number encoded in a checkpoint's file or folder name.

    Parameters
    ----------
    name : str
        The file or folder name (not a path), e.g. ``"epoch=3-step=99.ckpt"``.

    Returns
    -------
    int or None
        In order of precedence: the digits after ``epoch`` (optionally followed by
        ``=``, ``_`` or ``-``; case-insensitive); else those of ``checkpoint-<n>`` or
        ``step=<n>`` / ``step_<n>`` / ``step-<n>``; else the last run of digits in the
        name without its weight-file suffix; else ``None``.

    Examples
    --------
    >>> natural_label("epoch=3-step=99.ckpt")
    3
    >>> natural_label("checkpoint-500")
    500
    >>> natural_label("weights_v12.pt")
    12
    >>> natural_label("final.safetensors") is None
    True
    """
    stem = name
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in _SUFFIX_KINDS:
        stem = name[: -len(suffix)]
    for regex in (_EPOCH_RE, _STEP_RE):
        match = regex.search(stem)
        if match:
            return int(match.group(1))
    runs = _DIGITS_RE.findall(stem)
    return int(runs[-1]) if runs else None


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes from a tensor name.

    Removes any leading sequence of ``module.`` (DataParallel / DDP), ``_orig_mod.``
    (``torch.compile``) and ``model.`` (Lightning), so names can be matched across
    epochs whose checkpoints were written by differently wrapped models.

    Parameters
    ----------
    name : str
        A tensor name as found in a checkpoint.

    Returns
    -------
    str
        The name without its wrapper prefixes. A name that is nothing but prefixes is
        returned unchanged, so the result is never empty.

    Examples
    --------
    >>> canonical_name("module._orig_mod.model.fc.weight")
    'fc.weight'
    >>> canonical_name("encoder.model.weight")
    'encoder.model.weight'
    """
    out = name
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if out.startswith(prefix) and len(out) > len(prefix):
                out = out[len(prefix) :]
                stripped = True
    return out


# ----------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class CheckpointEntry:
    """One epoch's checkpoint as found by :func:`discover`.

    Attributes
    ----------
    label : int
        The epoch number taken from the name (see :func:`natural_label`).
    path : pathlib.Path
        The checkpoint file, or the Hugging Face ``checkpoint-<step>/`` folder.
    files : tuple of pathlib.Path
        The weight files to read: one, or the shards in sorted order.
    kind : str
        ``"safetensors"``, ``"hf"``, ``"torch"`` or ``"lightning"``.
    """

    label: int
    path: Path
    files: tuple[Path, ...]
    kind: str

    def relpath(self, root: Path) -> str:
        """Return :attr:`path` relative to ``root``, with ``/`` separators.

        Parameters
        ----------
        root : pathlib.Path
            The folder to express the path against (usually the SOURCE folder).

        Returns
        -------
        str
            The relative path, e.g. ``"checkpoint-500"`` or ``"epoch_3.pt"``.
        """
        try:
            rel = self.path.relative_to(root)
        except ValueError:
            rel = Path(os.path.relpath(self.path, root))
        return rel.as_posix()


def _is_non_weight(name: str) -> bool:
    lower = name.lower()
    if lower in _NON_WEIGHT_NAMES:
        return True
    return PurePosixPath(lower).stem.startswith(_NON_WEIGHT_PREFIXES)


def _is_plain_name(name: str) -> bool:
    """Whether ``name`` is a bare file name that cannot leave its folder."""
    if not name or name in {".", ".."} or "\x00" in name:
        return False
    if "/" in name or "\\" in name:
        return False
    return not (PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive)


def _read_index(index: Path) -> dict[str, str]:
    """Read and validate the ``weight_map`` of a Hugging Face shard index."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"cannot read shard index {index}: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"shard index {index} has no 'weight_map' of tensor names")
    want_suffix = ".safetensors" if index.name.startswith("model.safetensors") else ".bin"
    for tensor, shard in weight_map.items():
        if not isinstance(tensor, str) or not isinstance(shard, str):
            raise CheckpointError(f"shard index {index}: 'weight_map' must map names to files")
        if not _is_plain_name(shard):
            raise CheckpointError(
                f"shard index {index} names shard {shard!r} for {tensor!r}: shards must be "
                "plain file names inside the checkpoint folder"
            )
        if not shard.lower().endswith(want_suffix):
            raise CheckpointError(
                f"shard index {index} names shard {shard!r}: expected a {want_suffix} file"
            )
    return weight_map


def _index_shards(index: Path) -> tuple[Path, ...]:
    shards = sorted(set(_read_index(index).values()))
    files = tuple(index.parent / shard for shard in shards)
    try:
        missing = [f.name for f in files if not f.is_file()]
    except OSError as exc:  # e.g. a shard name too long for the file system
        raise CheckpointError(
            f"shard index {index} names a shard that cannot be used: {exc}"
        ) from exc
    if missing:
        raise CheckpointError(
            f"shard index {index} lists shard(s) that are missing: {', '.join(missing)}"
        )
    return files


def _hf_files(folder: Path) -> tuple[Path, ...] | None:
    """Weight files of a Hugging Face checkpoint folder, or None if it holds none."""
    for name, is_index in _HF_WEIGHTS:
        candidate = folder / name
        if candidate.is_file():
            return _index_shards(candidate) if is_index else (candidate,)
    return None


def discover(source: Path, *, pattern: str | None = None) -> list[CheckpointEntry]:
    """Find the checkpoints directly inside ``source`` and order them by epoch.

    Parameters
    ----------
    source : pathlib.Path
        The folder holding one checkpoint per epoch.
    pattern : str, optional
        A glob matched (case-sensitively) against each entry's name, e.g.
        ``"epoch_*.safetensors"`` or ``"checkpoint-*"``; only matching entries are
        picked. A folder whose name matches ``pattern`` is read as a Hugging Face
        checkpoint folder even if it is not named ``checkpoint-<step>``. Non-weight
        files (optimizer, scheduler, scaler, RNG states, training arguments) are never
        picked, whatever the pattern.

    Returns
    -------
    list of CheckpointEntry
        Sorted by :attr:`CheckpointEntry.label`. No file is opened except Hugging Face
        shard indexes (JSON).

    Raises
    ------
    SourceNotFoundError
        ``source`` is missing or not a folder, holds no recognisable checkpoint, or
        ``pattern`` matches none of them.
    UsageError
        ``pattern`` is empty or contains a path separator.
    CheckpointError
        An entry's name carries no epoch number, two entries share one, a
        ``checkpoint-<step>/`` folder holds no model weights, or a shard index is
        invalid (unreadable, shards outside the folder, missing shards).
    """
    source = Path(source)
    if not source.exists():
        raise SourceNotFoundError(f"checkpoint folder not found: {source}")
    if not source.is_dir():
        raise SourceNotFoundError(f"checkpoint folder not found: {source} is not a folder")
    if pattern is not None and (not pattern or "/" in pattern or os.sep in pattern):
        raise UsageError(
            f"--pattern {pattern!r} is invalid: give a glob matched against the names of "
            "the entries inside the checkpoint folder, e.g. 'epoch_*.pt'"
        )
    try:
        children = sorted(source.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise SourceNotFoundError(f"cannot list checkpoint folder {source}: {exc}") from exc

    found: list[tuple[Path, str]] = []  # (path, kind) of recognisable entries
    for child in children:
        name = child.name
        if name.startswith("."):
            continue
        if child.is_dir():
            if fnmatchcase(name, _HF_DIR_GLOB):
                found.append((child, "hf"))
            elif pattern is not None and fnmatchcase(name, pattern):
                if any((child / hf_name).is_file() for hf_name, _ in _HF_WEIGHTS):
                    found.append((child, "hf"))
        elif child.is_file():
            kind = _SUFFIX_KINDS.get(child.suffix.lower())
            if kind is not None and not _is_non_weight(name):
                found.append((child, kind))
    if not found:
        raise SourceNotFoundError(f"no checkpoint found in {source}: looked for {_LOOKED_FOR}")

    picked = found
    if pattern is not None:
        picked = [(p, kind) for p, kind in found if fnmatchcase(p.name, pattern)]
        if not picked:
            names = [p.name for p, _ in found]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise SourceNotFoundError(
                f"--pattern {pattern!r} matched no checkpoint in {source} (found: {shown})"
            )

    unlabeled = [p.name for p, _ in picked if natural_label(p.name) is None]
    if unlabeled:
        raise CheckpointError(
            f"cannot tell which epoch {', '.join(unlabeled)} in {source} belongs to: its name "
            "holds no number; rename it (e.g. epoch_3.pt) or use --pattern to leave it out"
        )

    entries: list[CheckpointEntry] = []
    by_label: dict[int, Path] = {}
    for path, kind in picked:
        label = natural_label(path.name)
        assert label is not None  # checked above
        if label in by_label:
            raise CheckpointError(
                f"{by_label[label].name} and {path.name} in {source} both look like epoch "
                f"{label}; rename one or use --pattern to pick one of them"
            )
        by_label[label] = path
        if kind == "hf":
            files = _hf_files(path)
            if files is None:
                raise CheckpointError(
                    f"checkpoint folder {path} holds no model weights: looked for "
                    + ", ".join(name for name, _ in _HF_WEIGHTS)
                    + "; use --pattern to leave it out"
                )
        else:
            files = (path,)
        entries.append(CheckpointEntry(label=label, path=path, files=files, kind=kind))
    entries.sort(key=lambda e: e.label)
    return entries


# ------------------------------------------------------------------------- readers


class _Reader(Protocol):
    path: Path
    state_key: str | None

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- safetensors header


@dataclass(frozen=True)
class _TensorInfo:
    """One tensor of a validated safetensors header."""

    code: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return _ST_DTYPES[self.code]


class _DuplicateKeyError(ValueError):
    """A JSON object names the same key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing duplicate keys (which readers resolve differently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    """``parse_constant`` refusing ``NaN`` and ``Infinity``, which JSON does not have."""
    raise ValueError(f"{name} is not valid JSON")


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, not float


def _element_count(shape: list[int], limit: int) -> int | None:
    """``prod(shape)``, or None once a partial product (in order) exceeds ``limit``."""
    count = 1
    for dim in shape:
        count *= dim
        if count > limit:
            return None
    return count


def _tensor_info(name: str, entry: object, data_size: int) -> _TensorInfo:
    """Validate one tensor entry of a safetensors header; raise ValueError if invalid."""
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is described by a {type(entry).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise ValueError(f"{where} has no {key!r}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str):
        raise ValueError(f"{where} has dtype {code!r}, not a dtype code")
    if code in _ST_SUBBYTE:
        raise ValueError(f"{where} has the sub-byte dtype {code}, which cmdtool does not read")
    if code not in _ST_ITEMSIZE:
        raise ValueError(f"{where} has the unknown dtype {code!r}")
    if code not in _ST_DTYPES:
        raise ValueError(f"{where} has dtype {code}, which this torch build does not support")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{where} has shape {shape!r}, not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise ValueError(
            f"{where} has data_offsets {offsets!r}, not a pair of non-negative integers"
        )
    begin, end = offsets
    if begin > end:
        raise ValueError(f"{where} has data_offsets [{begin}, {end}] that end before they begin")
    if end > data_size:
        raise ValueError(
            f"{where} ends at byte {end} of the data, but the file holds only {data_size} "
            "bytes of data (truncated?)"
        )
    count = _element_count(shape, _INT64_MAX)
    if count is None:
        raise ValueError(f"{where} has shape {shape}, too many elements for a tensor")
    claimed = count * _ST_ITEMSIZE[code]
    if claimed != end - begin:
        raise ValueError(
            f"{where} claims {claimed} bytes (shape {shape} of {code}) but its offsets "
            f"span {end - begin}"
        )
    return _TensorInfo(code=code, shape=tuple(shape), begin=begin, end=end)


def _parse_safetensors_header(raw: bytes, data_size: int) -> dict[str, _TensorInfo]:
    """Validate a safetensors JSON header against the data size; raise ValueError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"its header is not UTF-8 ({exc})") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        # JSON may escape lone surrogates, which are no text: names must be real strings.
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ValueError("its header is nested too deeply to be a safetensors header") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, surrogates, huge ints
        raise ValueError(f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    infos: dict[str, _TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":  # optional; null reads as absent, as in safetensors
            if entry is not None and (
                not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values())
            ):
                raise ValueError("its '__metadata__' is not an object of strings to strings")
            continue
        infos[name] = _tensor_info(name, entry, data_size)
    position = 0
    for name, info in sorted(infos.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            what = "a gap of" if info.begin > position else "an overlap of"
            raise ValueError(
                f"tensor {name!r} starts at byte {info.begin} of the data, leaving "
                f"{what} {abs(info.begin - position)} bytes after the previous tensor"
            )
        position = info.end
    if position != data_size:
        raise ValueError(
            f"its tensors cover {position} bytes of data but the file holds {data_size} "
            f"({data_size - position} trailing bytes)"
        )
    return infos


def _read_safetensors_header(path: Path) -> dict[str, _TensorInfo]:
    """Validate a safetensors file with plain reads, before any library maps it.

    Reads the 8-byte header length and then the header itself (at most
    :data:`_ST_MAX_HEADER` bytes, and never more than the file holds); nothing is
    allocated in proportion to a size the file merely claims.
    """
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"invalid safetensors file {path}: it is {size} bytes long, too short "
                    "for the 8-byte header length (truncated?)"
                )
            length = int.from_bytes(prefix, "little")
            if length > _ST_MAX_HEADER:
                raise CheckpointError(
                    f"invalid safetensors file {path}: its header claims {length} bytes, "
                    f"more than the {_ST_MAX_HEADER} safetensors allows (corrupt?)"
                )
            if length > size - 8:
                raise CheckpointError(
                    f"invalid safetensors file {path}: its header claims {length} bytes but "
                    f"only {size - 8} follow the header length (truncated?)"
                )
            raw = fh.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    if len(raw) != length:
        raise CheckpointError(f"cannot read safetensors file {path}: it shrank while read")
    try:
        return _parse_safetensors_header(raw, size - 8 - length)
    except ValueError as exc:
        raise CheckpointError(f"invalid safetensors file {path}: {exc}") from None


class _SafetensorsReader:
    """Lazy reader of one validated safetensors file (memory-mapped by safetensors)."""

    state_key: str | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self._infos = _read_safetensors_header(path)
        self._handle: Any = None
        try:
            self._handle = safe_open(str(path), framework="pt")
            keys = getattr(self._handle, "offset_keys", self._handle.keys)()
            self._names: list[str] = [str(key) for key in keys]
        except Exception as exc:
            self.close()
            raise CheckpointError(
                f"cannot read safetensors file {path} (truncated or corrupt?): {exc}"
            ) from exc
        if len(self._names) != len(self._infos) or set(self._names) != set(self._infos):
            self.close()
            raise CheckpointError(
                f"cannot read safetensors file {path}: safetensors lists other tensors than "
                "its header does (corrupt?)"
            )

    def names(self) -> list[str]:
        return self._names

    def _live(self) -> Any:
        if self._handle is None:
            raise ValueError(f"checkpoint {self.path} is closed")
        return self._handle

    def get(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        handle = self._live()
        try:
            tensor = handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path}: {exc}") from exc
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"tensor {name!r} of {self.path} did not load as a tensor")
        if tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise CheckpointError(
                f"tensor {name!r} of {self.path} loaded as {tensor.dtype} {tuple(tensor.shape)}"
                f", but its header says {info.code} {list(info.shape)}"
            )
        return tensor

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        info = self._infos[name]
        return info.shape, info.dtype

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.__exit__(None, None, None)
            except Exception:  # releasing a read-only map must not fail a run
                pass


# ------------------------------------------------------------------ torch / pickle


def _is_zip(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == _ZIP_MAGIC
    except OSError:
        return False


def _check_zip_record(fh: Any, size: int, info: zipfile.ZipInfo) -> str | None:
    """What is wrong with one record of a torch zip archive, or None."""
    name = info.filename
    if info.flag_bits & 0x1:
        return f"record {name!r} is encrypted"
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        return f"record {name!r} is compressed (method {info.compress_type}); torch stores records"
    fh.seek(info.header_offset)
    local = fh.read(_ZIP_LOCAL_HEADER.size)
    if len(local) != _ZIP_LOCAL_HEADER.size:
        return f"record {name!r} starts past the end of the file (truncated?)"
    fields = _ZIP_LOCAL_HEADER.unpack(local)
    if fields[0] != _ZIP_LOCAL_SIGNATURE:
        return f"record {name!r} has no local header where the directory puts it"
    flags, name_len, extra_len = fields[2], fields[9], fields[10]
    local_name = fh.read(name_len).decode("utf-8" if flags & 0x800 else "cp437")
    if local_name != info.orig_filename:
        return f"record {name!r} is named {local_name!r} in its local header"
    start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > size:
        return f"record {name!r} runs past the end of the file (truncated?)"
    if info.CRC == 0:  # written with torch.serialization.set_crc32_options(False)
        return None
    fh.seek(start)
    crc, left = 0, info.file_size
    while left:
        chunk = fh.read(min(left, _CHUNK))
        if not chunk:
            return f"record {name!r} runs past the end of the file (truncated?)"
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    if crc != info.CRC:
        return f"record {name!r} fails its CRC-32 check (its bytes changed since it was written)"
    return None


def _verify_zip(path: Path) -> None:
    """Check a zip-format torch file is a complete archive whose records match their CRC-32.

    ``torch.load`` checks no checksum, so without this a flipped bit in a tensor or in
    the pickle would load as silently different weights (or names). Records written
    without a checksum (CRC 0, see ``torch.serialization.set_crc32_options``) are only
    checked for completeness. Reads the file once in 1 MiB chunks.
    """
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            with zipfile.ZipFile(fh) as archive:
                infos = archive.infolist()
            if not infos:
                problem: str | None = "the archive holds no records"
            else:
                problem = None
                for info in infos:
                    problem = _check_zip_record(fh, size, info)
                    if problem:
                        break
    except Exception as exc:  # zipfile raises many kinds on a damaged archive
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a valid zip archive (truncated or corrupt?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if problem:
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt zip archive: {problem}")


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


def _needed_globals(
    path: Path, allow_globals: Sequence[str], exc: BaseException, *, mmap: bool
) -> tuple[list[str], str | None]:
    """The globals beyond ``allow_globals`` that ``path`` needs to load.

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
    if mmap:  # zip format: torch can list the globals without unpickling
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
    path: Path, exc: BaseException, allow_globals: Sequence[str], *, mmap: bool
) -> CheckpointError:
    """Turn a ``torch.load(weights_only=True)`` failure into the matching error."""
    message = str(exc)
    if not (isinstance(exc, pickle.UnpicklingError) or "weights_only" in message):
        return CheckpointError(
            f"cannot read checkpoint {path} (truncated or corrupt?): "
            f"{message or type(exc).__name__}"
        )
    names, blocker = _needed_globals(path, allow_globals, exc, mmap=mmap)
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


def _torch_load(path: Path, allow_globals: Sequence[str] = ()) -> Any:
    """Load a torch / Lightning file safely; every failure is a :class:`CheckpointError`.

    Zip-format files are verified (:func:`_verify_zip`) and then memory-mapped; legacy
    files (which cannot be mapped) are read whole. ``weights_only=True`` is always passed
    explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` has no effect.
    """
    mmap = _is_zip(path)
    if mmap:
        _verify_zip(path)
    try:
        return _weights_only_load(path, allow_globals, mmap=mmap)
    except Exception as exc:
        raise _load_error(path, exc, allow_globals, mmap=mmap) from exc


def _tensors_of(value: Any) -> dict[str, torch.Tensor]:
    """The tensor values of a dict under string keys, in insertion order."""
    if not isinstance(value, Mapping):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _select_state(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the dict of tensors in a loaded torch / Lightning checkpoint."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)"
        )
    # A nested state dict wins over stray top-level tensors (a saved loss or metric);
    # in a flat state dict no value is a dict, so these keys never match there.
    for key in _STATE_KEYS:
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


class _TorchReader:
    """Reader of one torch / Lightning file; tensors are memory-mapped when possible."""

    def __init__(self, path: Path, allow_globals: Sequence[str] = ()) -> None:
        self.path = path
        tensors, self.state_key = _select_state(_torch_load(path, allow_globals), path)
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


def _open_file(path: Path, allow_globals: Sequence[str] = ()) -> _Reader:
    if path.suffix.lower() == ".safetensors":
        return _SafetensorsReader(path)
    return _TorchReader(path, allow_globals)


# ---------------------------------------------------------------------- checkpoint


class Checkpoint(Mapping[str, torch.Tensor]):
    """The tensors of one checkpoint, by name; build it with :func:`open_checkpoint`.

    Names are kept exactly as stored (``model.``, ``module.`` ... prefixes included)
    and iterate in file order (shards in sorted order). Looking a name up loads that
    one tensor on the CPU, lazily where the format allows (safetensors; zip-format torch
    files are memory-mapped). Use it as a context manager, or call :meth:`close`.

    Attributes
    ----------
    path : pathlib.Path
        The checkpoint file or Hugging Face folder.
    kind : str
        The :attr:`CheckpointEntry.kind` it was opened as.
    state_key : str or None
        The key of the torch / Lightning dict that held the tensors
        (``"current_model_state"``, ``"state_dict"``, ``"model_state_dict"`` or
        ``"model"``), or ``None`` for a flat state dict or safetensors.
    """

    def __init__(self, path: Path, kind: str, readers: list[_Reader]) -> None:
        self.path = path
        self.kind = kind
        self.state_key: str | None = readers[0].state_key if readers else None
        self._readers = readers
        self._where: dict[str, _Reader] = {}
        for reader in readers:
            for name in reader.names():
                self._where[name] = reader
        self._closed = False

    def _reader(self, name: str) -> _Reader:
        if self._closed:
            raise ValueError(f"checkpoint {self.path} is closed")
        return self._where[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._reader(name).get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Return a tensor's shape and dtype, without loading its data where possible.

        Parameters
        ----------
        name : str
            The tensor name, as stored.

        Returns
        -------
        tuple
            ``(shape, dtype)``: a tuple of ints and a :class:`torch.dtype`.

        Raises
        ------
        KeyError
            No tensor of that name.
        CheckpointError
            The file cannot be read, or stores a dtype torch does not have.
        """
        return self._reader(name).spec(name)

    def close(self) -> None:
        """Release the files; tensors already returned stay valid."""
        if self._closed:
            return
        self._closed = True
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} tensors"
        return f"<Checkpoint {self.kind} {self.path} ({state})>"


def _check_shards(entry: CheckpointEntry, readers: list[_Reader]) -> None:
    """Check every tensor sits in exactly the shard the index names for it."""
    suffix = entry.files[0].suffix.lower()
    index = entry.path / (
        "model.safetensors.index.json"
        if suffix == ".safetensors"
        else "pytorch_model.bin.index.json"
    )
    weight_map = _read_index(index)
    seen: dict[str, Path] = {}
    for reader in readers:
        for name in reader.names():
            if name in seen:
                raise CheckpointError(
                    f"tensor {name!r} is stored in two shards of {entry.path}: "
                    f"{seen[name].name} and {reader.path.name}"
                )
            seen[name] = reader.path
            expected = weight_map.get(name)
            if expected != reader.path.name:
                where = f"in {expected}" if expected else "nowhere"
                raise CheckpointError(
                    f"tensor {name!r} is in shard {reader.path.name} of {entry.path}, but "
                    f"{index.name} puts it {where}"
                )
    missing = [name for name in weight_map if name not in seen]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{index.name} of {entry.path} lists tensors that no shard holds: {shown}{more}"
        )


def _check_allow_globals(allow_globals: Sequence[str] | str) -> tuple[str, ...]:
    """Validate ``allow_globals``: dotted names, no duplicates (a lone str is one name)."""
    names = (allow_globals,) if isinstance(allow_globals, str) else tuple(allow_globals)
    bad = [name for name in names if not isinstance(name, str) or not _QUALNAME_RE.fullmatch(name)]
    if bad:
        raise UsageError(
            f"--allow-global {bad[0]!r} is invalid: give the qualified name of a pickled "
            "global as the refusal message prints it, e.g. argparse.Namespace"
        )
    return tuple(dict.fromkeys(names))


def open_checkpoint(entry: CheckpointEntry, *, allow_globals: Sequence[str] = ()) -> Checkpoint:
    """Open one checkpoint for reading, safely.

    safetensors files are validated (header size, JSON layout, known dtypes, shapes
    matching data offsets that tile the file exactly) with plain reads, then opened with
    :func:`safetensors.safe_open` and read tensor by tensor. Pickle-based files (``.pt``,
    ``.pth``, ``.bin``, ``.ckpt``) are read with ``torch.load(map_location="cpu",
    weights_only=True, mmap=True)`` (``mmap=False`` for the legacy non-zip format), after
    checking that a zip-format file is complete and matches its CRC-32 checksums; the
    unsafe loader is never used, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says.

    Parameters
    ----------
    entry : CheckpointEntry
        An entry from :func:`discover`.
    allow_globals : sequence of str, optional
        Qualified names (``"module.QualName"``, as the refusal message prints them) of
        pickled globals a torch / Lightning file may name, typically classes in its
        hyper-parameters (e.g. ``"argparse.Namespace"``). Each is replaced, for the
        duration of the load only, by an inert placeholder that accepts whatever the
        pickle constructs it with and runs nothing; the real object is never imported.
        Only the state-dict tensors are used. Globals not listed still cause a refusal.
        The placeholders are registered in torch's process-wide safe-globals list while
        a file loads, so loads in other threads may see them meanwhile.

    Returns
    -------
    Checkpoint
        A read-only mapping of tensor name to tensor; close it when done.

    Raises
    ------
    UnsafeCheckpointError
        A pickle-based file would need code execution (pickled globals not in
        ``allow_globals``) to load; the message names the file and all the globals
        still needed, sorted, and the ``--allow-global`` options that would let it load.
    CheckpointError
        A file is missing, truncated or corrupt (an invalid safetensors header, a zip
        record that fails its checksum, ...), holds no tensors, or a sharded checkpoint
        disagrees with its index.
    UsageError
        A name in ``allow_globals`` is not a dotted qualified name.
    """
    allowed = _check_allow_globals(allow_globals)
    if not entry.files:
        raise CheckpointError(f"checkpoint {entry.path} lists no weight files")
    readers: list[_Reader] = []
    try:
        for path in entry.files:
            readers.append(_open_file(path, allowed))
        sharded = entry.kind == "hf" and (
            len(entry.files) > 1 or entry.files[0].name not in _HF_SINGLE_FILES
        )
        if sharded:
            _check_shards(entry, readers)
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return Checkpoint(entry.path, entry.kind, readers)
