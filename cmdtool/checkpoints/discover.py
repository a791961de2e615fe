"""Find the checkpoints in a folder and order them by epoch.

Recognised layouts, directly inside the SOURCE folder:

* ``*.safetensors`` files (kind ``"safetensors"``);
* Hugging Face Trainer folders ``checkpoint-<step>/`` (kind ``"hf"``) holding
  ``model.safetensors``, shards listed by ``model.safetensors.index.json``,
  ``pytorch_model.bin`` or shards listed by ``pytorch_model.bin.index.json``;
* torch state dicts ``*.pt``, ``*.pth``, ``*.bin`` (kind ``"torch"``);
* Lightning checkpoints ``*.ckpt`` (kind ``"lightning"``).

Training by-products (optimizer, scheduler, scaler and RNG states, ``training_args.bin``)
are recognised by name and never opened. Nothing here opens a weight file: reading is
:mod:`cmdtool.checkpoints.reader`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath, PureWindowsPath

from cmdtool.errors import (
    CheckpointError,
    SourceNotFoundError,
    UsageError,
)

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
HF_SINGLE_FILES = frozenset(name for name, is_index in _HF_WEIGHTS if not is_index)
#: Keys of a torch / Lightning checkpoint dict that may hold the state dict, by priority.
#: Lightning's weight-averaging callback keeps the raw weights in ``current_model_state``
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_LOOKED_FOR = (
    "*.safetensors, *.pt, *.pth, *.bin and *.ckpt files, and checkpoint-<step>/ folders "
    "holding model.safetensors, model.safetensors.index.json or pytorch_model.bin"
)

_EPOCH_RE = re.compile(r"epoch[=_-]*(\d+)", re.IGNORECASE)
_STEP_RE = re.compile(r"(?:checkpoint-|step[=_-])(\d+)", re.IGNORECASE)
_DIGITS_RE = re.compile(r"\d+")


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


def read_index(index: Path) -> dict[str, str]:
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
    shards = sorted(set(read_index(index).values()))
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

