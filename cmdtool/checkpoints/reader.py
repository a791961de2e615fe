"""One checkpoint as a mapping of named tensors, whatever its layout (single file,
Hugging Face folder with shards): :func:`open_checkpoint` and :class:`Checkpoint`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

import torch

from cmdtool.checkpoints.dcp import DCPReader
from cmdtool.checkpoints.discover import HF_SINGLE_FILES, CheckpointEntry, read_index
from cmdtool.checkpoints.limits import ReadLimits, check_params
from cmdtool.checkpoints.remote import open_remote_file, refuse_remote_dcp
from cmdtool.checkpoints.safetensors import SafetensorsReader
from cmdtool.checkpoints.torchfile import QUALNAME_RE, STATES, TorchReader
from cmdtool.errors import CheckpointError, UsageError


class _Reader(Protocol):
    path: Path
    state_key: str | None

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]: ...

    def close(self) -> None: ...


def _open_file(
    path: Path,
    allow_globals: Sequence[str] = (),
    state: str = "raw",
    limits: ReadLimits | None = None,
) -> _Reader:
    limits = limits or ReadLimits()
    remote = open_remote_file(path, allow_globals, state, limits)  # object-store SOURCE
    if remote is not None:
        return remote
    if path.suffix.lower() == ".safetensors":
        return SafetensorsReader(path, max_tensors=limits.max_tensors)
    return TorchReader(path, allow_globals, state, limits)


def _check_size(entry: CheckpointEntry, readers: list[_Reader], limits: ReadLimits) -> None:
    """Refuse a checkpoint whose tensors hold more than ``limits.max_params`` elements."""
    total = 0
    for reader in readers:
        for name in reader.names():
            count = 1
            for dim in reader.spec(name)[0]:
                count *= dim
            total += count
    check_params(entry.path, total, limits)


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
    weight_map = read_index(index)
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
    bad = [name for name in names if not isinstance(name, str) or not QUALNAME_RE.fullmatch(name)]
    if bad:
        raise UsageError(
            f"--allow-global {bad[0]!r} is invalid: give the qualified name of a pickled "
            "global as the refusal message prints it, e.g. argparse.Namespace"
        )
    return tuple(dict.fromkeys(names))


def open_checkpoint(
    entry: CheckpointEntry,
    *,
    allow_globals: Sequence[str] = (),
    state: str = "raw",
    limits: ReadLimits | None = None,
) -> Checkpoint:
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
    state : {"raw", "averaged"}
        Which weights of a Lightning file holding both: the raw ones
        (``current_model_state``, written by weight averaging) or the averaged ones
        (``state_dict``). Files holding one set are read the same either way.
    limits : ReadLimits, optional
        What one checkpoint may hold (:mod:`~cmdtool.checkpoints.limits`): expanded or
        overlapping views are refused unless ``allow_expanded``; at most ``max_params``
        tensor elements in all and ``max_tensors`` tensors per file. Default
        ``ReadLimits()``. Torch files' storages must also match the bytes behind them
        exactly (:mod:`~cmdtool.checkpoints.torchscan`), whatever the limits.

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
        disagrees with its index; or the checkpoint exceeds ``limits``.
    UsageError
        A name in ``allow_globals`` is not a dotted qualified name.
    """
    limits = limits or ReadLimits()
    allowed = _check_allow_globals(allow_globals)
    if state not in STATES:
        raise UsageError(f"--state {state!r} is not one of {', '.join(STATES)}")
    if not entry.files:
        raise CheckpointError(f"checkpoint {entry.path} lists no weight files")
    readers: list[_Reader] = []
    try:
        if entry.kind == "dcp":  # one reader for the folder: .metadata + *.distcp
            refuse_remote_dcp(entry.path)
            readers.append(DCPReader(entry.path))
        for path in entry.files if entry.kind != "dcp" else ():
            readers.append(_open_file(path, allowed, state, limits))
        sharded = entry.kind == "hf" and (
            len(entry.files) > 1 or entry.files[0].name not in HF_SINGLE_FILES
        )
        if sharded:
            _check_shards(entry, readers)
        _check_size(entry, readers, limits)
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return Checkpoint(entry.path, entry.kind, readers)
