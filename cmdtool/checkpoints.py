"""Find checkpoint files in a folder, order them by epoch, and read each format safely.

Recognised layouts, directly inside the SOURCE folder:

* ``*.safetensors`` files (kind ``"safetensors"``);
* Hugging Face Trainer folders ``checkpoint-<step>/`` (kind ``"hf"``) holding
  ``model.safetensors``, shards listed by ``model.safetensors.index.json``,
  ``pytorch_model.bin`` or shards listed by ``pytorch_model.bin.index.json``;
* torch state dicts ``*.pt``, ``*.pth``, ``*.bin`` (kind ``"torch"``);
* Lightning checkpoints ``*.ckpt`` (kind ``"lightning"``).

Training by-products (optimizer, scheduler, scaler and RNG states, ``training_args.bin``)
are recognised by name and never opened. Pickle-based files are only ever read with
``torch.load(..., weights_only=True)``: a file that would need arbitrary code to be
unpickled raises :class:`~cmdtool.errors.UnsafeCheckpointError` instead of being loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from typing import Any, Protocol

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
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_ZIP_MAGIC = b"PK\x03\x04"


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
    except (OSError, UnicodeDecodeError, ValueError) as exc:
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
    missing = [f.name for f in files if not f.is_file()]
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


class _SafetensorsReader:
    """Lazy reader of one safetensors file (memory-mapped by safetensors)."""

    state_key: str | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._handle: Any = safe_open(str(path), framework="pt")
            keys = getattr(self._handle, "offset_keys", self._handle.keys)()
        except Exception as exc:
            raise CheckpointError(
                f"cannot read safetensors file {path} (truncated or corrupt?): {exc}"
            ) from exc
        self._names: list[str] = list(keys)

    def names(self) -> list[str]:
        return self._names

    def get(self, name: str) -> torch.Tensor:
        try:
            tensor = self._handle.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path}: {exc}") from exc
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"tensor {name!r} of {self.path} did not load as a tensor")
        return tensor

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        try:
            view = self._handle.get_slice(name)
            shape = tuple(int(n) for n in view.get_shape())
            code = str(view.get_dtype())
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path}: {exc}") from exc
        dtype = _ST_DTYPES.get(code)
        if dtype is None:
            raise CheckpointError(
                f"tensor {name!r} of {self.path} has dtype {code}, which this torch build "
                "does not support"
            )
        return shape, dtype

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.__exit__(None, None, None)
            except Exception:  # releasing a read-only map must not fail a run
                pass


def _unsafe_globals(path: Path, message: str) -> list[str]:
    """Names of the globals that keep ``path`` from loading with ``weights_only=True``."""
    try:
        found = [str(g) for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
    except Exception:
        found = []
    return found or sorted(set(_GLOBAL_RE.findall(message)))


def _unpickler_reason(message: str) -> str:
    """The useful sentence of torch's long weights-only error message."""
    marker = "WeightsUnpickler error:"
    reason = message.split(marker, 1)[1] if marker in message else message
    reason = reason.split("Check the documentation", 1)[0]
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    return " ".join(reason.split()) or "rejected by the weights-only unpickler"


def _load_error(path: Path, exc: BaseException) -> CheckpointError:
    """Turn a ``torch.load(weights_only=True)`` failure into the matching error."""
    message = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in message:
        reason = _unpickler_reason(message)
        globals_ = _unsafe_globals(path, message)
        if globals_:
            return UnsafeCheckpointError(
                f"refusing to load {path}: unpickling it would run code from "
                f"{', '.join(globals_)}, and cmdtool loads checkpoints with weights_only=True "
                "only. In a trusted environment, re-save just the weights (e.g. "
                "torch.save(model.state_dict(), ...) or safetensors) and ingest those"
            )
        if "Unsupported operand" in reason:
            return CheckpointError(
                f"cannot read checkpoint {path}: corrupt or not a torch checkpoint ({reason})"
            )
        return UnsafeCheckpointError(
            f"refusing to load {path}: it cannot be loaded with weights_only=True ({reason}). "
            "In a trusted environment, re-save just the weights (e.g. "
            "torch.save(model.state_dict(), ...) or safetensors) and ingest those"
        )
    return CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {message}")


def _is_zip(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == _ZIP_MAGIC
    except OSError:
        return False


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, memory-mapped when the format allows."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) or _is_zip(path):
            raise _load_error(path, exc) from exc
    # Not a zip archive: the legacy torch format (or garbage), which mmap cannot map.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:
        raise _load_error(path, exc) from exc


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

    def __init__(self, path: Path) -> None:
        self.path = path
        tensors, self.state_key = _select_state(_torch_load(path), path)
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


def _open_file(path: Path) -> _Reader:
    if path.suffix.lower() == ".safetensors":
        return _SafetensorsReader(path)
    return _TorchReader(path)


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


def open_checkpoint(entry: CheckpointEntry) -> Checkpoint:
    """Open one checkpoint for reading, safely.

    safetensors files are opened with :func:`safetensors.safe_open` and read tensor by
    tensor. Pickle-based files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) are read with
    ``torch.load(map_location="cpu", weights_only=True, mmap=True)`` (``mmap=False``
    for the legacy non-zip format); the unsafe loader is never used.

    Parameters
    ----------
    entry : CheckpointEntry
        An entry from :func:`discover`.

    Returns
    -------
    Checkpoint
        A read-only mapping of tensor name to tensor; close it when done.

    Raises
    ------
    UnsafeCheckpointError
        A pickle-based file would need code execution (pickled globals) to load; the
        message names the file and, where they can be told, the globals.
    CheckpointError
        A file is missing, truncated or corrupt, holds no tensors, or a sharded
        checkpoint disagrees with its index.
    """
    if not entry.files:
        raise CheckpointError(f"checkpoint {entry.path} lists no weight files")
    readers: list[_Reader] = []
    try:
        for path in entry.files:
            readers.append(_open_file(path))
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
