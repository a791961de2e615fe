"""Find the checkpoints in a folder and order them by epoch.

Recognised layouts, directly inside the SOURCE folder:

* ``*.safetensors`` files (kind ``"safetensors"``);
* Hugging Face Trainer folders ``checkpoint-<step>/`` (kind ``"hf"``) holding
  ``model.safetensors``, shards listed by ``model.safetensors.index.json``,
  ``pytorch_model.bin`` or shards listed by ``pytorch_model.bin.index.json``;
* torch state dicts ``*.pt``, ``*.pth``, ``*.bin`` (kind ``"torch"``);
* Lightning checkpoints ``*.ckpt`` (kind ``"lightning"``);
* ``torch.distributed.checkpoint`` folders (kind ``"dcp"``, e.g. ``step-100/``), holding
  ``.metadata`` and ``*.distcp`` files.

Training by-products (optimizer, scheduler, scaler and RNG states, ``training_args.bin``)
are recognised by name and never opened. A checkpoint whose name holds no epoch number
beside numbered ones (Lightning's ``last.ckpt``, the final ``model.safetensors`` that
``trainer.save_model()`` writes at the top of a Trainer's output folder, ``best.pt``) is
skipped with a notice (:attr:`Discovery.skipped`). Nothing here opens a weight file
(only JSON: shard indexes and, for ``labels="epoch"``, ``trainer_state.json``); reading is
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
    "*.safetensors, *.pt, *.pth, *.bin and *.ckpt files, checkpoint-<step>/ folders "
    "holding model.safetensors, model.safetensors.index.json or pytorch_model.bin, and "
    "torch.distributed.checkpoint folders (step-<n>/ holding .metadata)"
)
#: The file that marks a ``torch.distributed.checkpoint`` folder (written last by DCP).
DCP_METADATA = ".metadata"
#: How ``--labels`` may number Hugging Face ``checkpoint-<step>/`` folders.
LABEL_SOURCES = ("step", "epoch")
#: Hugging Face top-level shard indexes: a sharded final model beside ``checkpoint-*/``.
_HF_INDEXES = tuple(name for name, is_index in _HF_WEIGHTS if is_index)

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
        The epoch number taken from the name (see :func:`natural_label`), or from
        ``trainer_state.json`` (``labels="epoch"``).
    path : pathlib.Path
        The checkpoint file, or the Hugging Face ``checkpoint-<step>/`` folder.
    files : tuple of pathlib.Path
        The weight files to read: one, or the shards in sorted order (a DCP folder:
        ``.metadata`` then its ``*.distcp`` files).
    kind : str
        ``"safetensors"``, ``"hf"``, ``"torch"``, ``"lightning"`` or ``"dcp"``.
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


def _refuse_outside_link(folder: Path, path: Path) -> None:
    """Refuse a file of a checkpoint folder that is a symbolic link leading outside it.

    The message names the link only: the target may be any file, and nothing of it is
    read or quoted.
    """
    try:
        real, root = path.resolve(strict=True), folder.resolve(strict=True)
    except (OSError, RuntimeError):  # missing or a loop: the callers' checks report it
        return
    if not real.is_relative_to(root):
        raise CheckpointError(
            f"{path} is a symbolic link to a file outside its checkpoint folder {folder}: "
            "cmdtool reads only files inside it (copy the file in instead)"
        )


def _hf_files(folder: Path) -> tuple[Path, ...] | None:
    """Weight files of a Hugging Face checkpoint folder, or None if it holds none.

    The index and every weight file must lie inside the folder: a symbolic link that
    leads outside it is refused (:func:`_refuse_outside_link`).
    """
    for name, is_index in _HF_WEIGHTS:
        candidate = folder / name
        if candidate.is_file():
            _refuse_outside_link(folder, candidate)
            files = _index_shards(candidate) if is_index else (candidate,)
            for path in files:
                _refuse_outside_link(folder, path)
            return files
    return None


@dataclass(frozen=True)
class SkippedFile:
    """A checkpoint :func:`find_checkpoints` left out, and why.

    Attributes
    ----------
    path : str
        Its name inside the SOURCE folder (a file or folder name).
    reason : str
        One line: what it is and how to include it.
    """

    path: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    """What :func:`find_checkpoints` found in a folder.

    Attributes
    ----------
    entries : list of CheckpointEntry
        One per epoch, sorted by label.
    skipped : list of SkippedFile
        Checkpoints left out because their names hold no epoch number while other
        checkpoints' names do (``last.ckpt``, a top-level final ``model.safetensors``).
    labels : str
        What the labels count: ``"step"`` or ``"epoch"`` when Hugging Face
        ``checkpoint-<step>/`` folders are among the entries (``"epoch"`` with
        ``labels="epoch"``), else ``"name"`` (the number in each file or folder name).
    """

    entries: list[CheckpointEntry]
    skipped: list[SkippedFile]
    labels: str


def _dcp_files(folder: Path) -> tuple[Path, ...]:
    """``.metadata`` then the ``*.distcp`` files of a DCP folder, sorted."""
    return (folder / DCP_METADATA, *sorted(folder.glob("*.distcp"), key=lambda f: f.name))


def _skip_reason(name: str, kind: str, hf_beside: bool) -> str:
    """The notice for a checkpoint whose name holds no epoch number."""
    suffix = PurePosixPath(name).suffix
    if hf_beside and name in HF_SINGLE_FILES:
        return (
            "the final model trainer.save_model() writes beside the checkpoint-<step>/ "
            "folders; its name holds no epoch number; to include it, move it into a "
            "checkpoint-<step>/ folder"
        )
    what = (
        "Lightning's save_last copy of the latest epoch; "
        if kind == "lightning" and name.lower().startswith("last")
        else ""
    )
    return (
        f"{what}its name holds no epoch number; to include it, copy or rename it to a "
        f"numbered name such as epoch_<N>{suffix}"
    )


def _trainer_state_epoch(folder: Path) -> int:
    """The epoch a Hugging Face checkpoint folder's ``trainer_state.json`` records."""
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"--labels epoch: {state_file} is missing; ingest with --labels step"
        ) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"--labels epoch: cannot read {state_file}: {exc}") from exc
    epoch = state.get("epoch") if isinstance(state, dict) else None
    if isinstance(epoch, bool) or not isinstance(epoch, int | float) or epoch != epoch:
        raise CheckpointError(f"--labels epoch: {state_file} records no 'epoch' number")
    whole = round(epoch)
    if abs(epoch - whole) > 1e-4 or whole < 0:
        raise CheckpointError(
            f"--labels epoch: {state_file} says epoch {epoch}, not a whole epoch (saved "
            "mid-epoch?); ingest with --labels step"
        )
    return int(whole)


def _top_level_index_shards(source: Path, children: list[Path]) -> dict[str, str]:
    """Files of a sharded final model at the top of ``source`` (name -> index name)."""
    grouped: dict[str, str] = {}
    names = {c.name for c in children}
    for index in _HF_INDEXES:
        if index in names and (source / index).is_file():
            for shard in sorted(set(read_index(source / index).values())):
                grouped[shard] = index
    return grouped


def discover(
    source: Path, *, pattern: str | None = None, labels: str = "step"
) -> list[CheckpointEntry]:
    """Find the checkpoints directly inside ``source`` and order them by epoch.

    The entries of :func:`find_checkpoints` (same parameters), without its notices.
    """
    return find_checkpoints(source, pattern=pattern, labels=labels).entries


def find_checkpoints(
    source: Path, *, pattern: str | None = None, labels: str = "step"
) -> Discovery:
    """Find the checkpoints directly inside ``source``, order them by epoch, say what was
    left out.

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
    labels : {"step", "epoch"}
        How Hugging Face ``checkpoint-<step>/`` folders are labelled: by the step in
        their name, or by the whole epoch their ``trainer_state.json`` records. Other
        entries are labelled by the number in their name either way.

    Returns
    -------
    Discovery
        The entries sorted by label, the checkpoints skipped (a name without an epoch
        number among numbered ones: skipped with a notice, not an error), and what the
        labels count. No weight file is opened.

    Raises
    ------
    SourceNotFoundError
        ``source`` is missing or not a folder, holds no recognisable checkpoint, or
        ``pattern`` matches none of them.
    UsageError
        ``pattern`` is empty or contains a path separator; ``labels`` is not ``"step"``
        or ``"epoch"``, or is ``"epoch"`` for a folder without Hugging Face checkpoints.
    CheckpointError
        No entry's name carries an epoch number, two entries share one, a
        ``checkpoint-<step>/`` folder holds no model weights, a shard index is invalid
        (unreadable, shards outside the folder, missing shards), or (``labels="epoch"``)
        a ``trainer_state.json`` is missing or records no whole epoch.
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
    if labels not in LABEL_SOURCES:
        raise UsageError(f"--labels {labels!r} is not one of {', '.join(LABEL_SOURCES)}")
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
            if fnmatchcase(name, _HF_DIR_GLOB) and _hf_weights_present(child):
                found.append((child, "hf"))
            elif (child / DCP_METADATA).is_file():
                found.append((child, "dcp"))
            elif fnmatchcase(name, _HF_DIR_GLOB):
                found.append((child, "hf"))  # refused below: no weights
            elif pattern is not None and fnmatchcase(name, pattern):
                if _hf_weights_present(child):
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

    skipped: list[SkippedFile] = []
    hf_beside = any(kind == "hf" for _, kind in picked)
    # A sharded final model at the top level (trainer.save_model() of a large model):
    # its shards are numbered "model-00001-of-00002", which is no epoch.
    final_shards = _top_level_index_shards(source, children) if hf_beside else {}
    if final_shards:
        for index in sorted(set(final_shards.values())):
            skipped.append(
                SkippedFile(
                    index,
                    "the sharded final model trainer.save_model() writes beside the "
                    f"checkpoint-<step>/ folders ({len(final_shards)} shard(s)); to include "
                    "it, move it with its shards into a checkpoint-<step>/ folder",
                )
            )
        picked = [(p, kind) for p, kind in picked if p.name not in final_shards]

    numbered = [(p, kind) for p, kind in picked if natural_label(p.name) is not None]
    unlabeled = [(p, kind) for p, kind in picked if natural_label(p.name) is None]
    if unlabeled and not numbered:
        listed = ", ".join(p.name for p, _ in unlabeled)
        raise CheckpointError(
            f"cannot tell which epoch {listed} in {source} belongs to: its name "
            "holds no number; rename it (e.g. epoch_3.pt) or use --pattern to leave it out"
        )
    for p, kind in unlabeled:
        skipped.append(SkippedFile(p.name, _skip_reason(p.name, kind, hf_beside)))
    skipped.sort(key=lambda s: s.path)

    if labels == "epoch" and not any(kind == "hf" for _, kind in numbered):
        raise UsageError(
            f"--labels epoch reads the trainer_state.json of Hugging Face checkpoint-<step>/ "
            f"folders, and {source} holds none; leave --labels out"
        )

    entries: list[CheckpointEntry] = []
    by_label: dict[int, Path] = {}
    for path, kind in numbered:
        label = natural_label(path.name)
        assert label is not None  # split above
        if kind == "hf" and labels == "epoch":
            label = _trainer_state_epoch(path)
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
        elif kind == "dcp":
            files = _dcp_files(path)
        else:
            files = (path,)
        entries.append(CheckpointEntry(label=label, path=path, files=files, kind=kind))
    entries.sort(key=lambda e: e.label)
    has_hf = any(e.kind == "hf" for e in entries)
    return Discovery(entries, skipped, labels if has_hf else "name")


def _hf_weights_present(folder: Path) -> bool:
    return any((folder / hf_name).is_file() for hf_name, _ in _HF_WEIGHTS)


# ------------------------------------------------------------------------- readers

