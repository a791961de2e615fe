"""safetensors files: the header validated with plain reads before anything is decoded.

Size limits, JSON layout, dtypes, shapes, and data offsets that tile the rest of the
file exactly are checked before :func:`safetensors.safe_open` sees the file, so a
hostile header cannot make the reader allocate or read out of bounds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cmdtool.checkpoints.bytesource import read_at, remote_of, size_of
from cmdtool.checkpoints.limits import ReadLimits, check_tensor_count
from cmdtool.errors import (
    CheckpointError,
    CmdtoolError,
)

#: safetensors refuses headers longer than this (``MAX_HEADER_SIZE``); so does cmdtool.
MAX_HEADER = 100_000_000
#: First read of an object-store file's header: length and (usually) the whole header.
FIRST_READ = 1 << 20
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
    except UnicodeDecodeError:  # the codec's message would quote a byte of the file
        raise ValueError("its header is not UTF-8 (not a safetensors file?)") from None
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


def _read_safetensors_header(
    path: Path, max_tensors: int | None = None
) -> dict[str, _TensorInfo]:
    """Validate a safetensors file with plain reads, before any library maps it.

    Reads the 8-byte header length and then the header itself (at most
    :data:`MAX_HEADER` bytes, and never more than the file holds); nothing is
    allocated in proportion to a size the file merely claims. A header describing more
    than ``max_tensors`` tensors is refused before it is parsed. Messages never quote
    the file's bytes (nor the header length, which is its first 8 bytes).
    """
    try:
        size = size_of(path)
        # one ranged GET for an object (header and length together); 8 bytes locally
        first = read_at(path, 0, FIRST_READ if remote_of(path) else 8)
        prefix = first[:8]
        if len(prefix) < 8:
            raise CheckpointError(
                f"invalid safetensors file {path}: it is {size} bytes long, too short "
                "for the 8-byte header length (truncated?)"
            )
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER:
            raise CheckpointError(
                f"invalid safetensors file {path}: its header length is more than the "
                f"{MAX_HEADER} bytes safetensors allows (corrupt, or not a safetensors file?)"
            )
        if length > size - 8:
            raise CheckpointError(
                f"invalid safetensors file {path}: its header length exceeds the file, "
                f"where only {size - 8} follow the header length (truncated, or not a "
                "safetensors file?)"
            )
        raw = first[8 : 8 + length]
        if len(raw) < length:
            raw += read_at(path, 8 + len(raw), length - len(raw))
    except CmdtoolError:  # an object store's one-line errors (an OSError too) as they are
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    if len(raw) != length:
        raise CheckpointError(f"cannot read safetensors file {path}: it shrank while read")
    if max_tensors is not None and raw.count(b'"data_offsets"') > max_tensors:
        limits = ReadLimits(max_tensors=max_tensors)
        check_tensor_count(path, max_tensors + 1, limits, at_least=True)
    try:
        return _parse_safetensors_header(raw, size - 8 - length)
    except ValueError as exc:
        raise CheckpointError(f"invalid safetensors file {path}: {exc}") from None


class SafetensorsReader:
    """Lazy reader of one validated safetensors file (memory-mapped by safetensors)."""

    state_key: str | None = None

    def __init__(self, path: Path, max_tensors: int | None = None) -> None:
        self.path = path
        self._infos = _read_safetensors_header(path, max_tensors)
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


