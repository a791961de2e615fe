"""What a checkpoint's files say beyond its tensors: tied tensors and safetensors metadata.

* Tied tensors: ``torch.save`` keeps two names that share one storage (GPT-2's
  ``lm_head.weight`` and ``transformer.wte.weight``) as one storage, and
  ``torch.load(weights_only=True)`` gives them back as views of one storage.
  :func:`find_aliases` finds them after loading, so the store keeps the values once.
* safetensors header metadata (``__metadata__``, e.g. ``{"format": "pt"}``, which
  transformers checks in ``from_pretrained``): :func:`safetensors_metadata`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from cmdtool.checkpoints.bytesource import read_at
from cmdtool.checkpoints.discover import CheckpointEntry
from cmdtool.checkpoints.reader import Checkpoint
from cmdtool.checkpoints.safetensors import MAX_HEADER
from cmdtool.errors import CheckpointError, NotFoundError, ObjectStoreError

#: Kinds whose tensors come from torch pickles, where storage sharing survives a load.
_TORCH_KINDS = frozenset({"torch", "lightning", "hf"})


def _view_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...], str]:
    """What makes two tensors the same values: storage, offset, shape, strides, dtype."""
    return (
        tensor.untyped_storage().data_ptr(),
        int(tensor.storage_offset()),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        str(tensor.dtype),
    )


def find_aliases(
    entry: CheckpointEntry, ckpt: Checkpoint, keep: Callable[[str], bool] = lambda _: True
) -> dict[str, str]:
    """Names of ``ckpt`` that are the very same tensor as an earlier name (tied weights).

    Parameters
    ----------
    entry : CheckpointEntry
        The checkpoint's entry. Only torch pickles (``.pt``/``.bin``/``.ckpt`` and Hugging
        Face ``pytorch_model.bin`` folders) can tie tensors; safetensors and DCP files
        store every name's values separately, and give ``{}`` without reading a tensor.
    ckpt : Checkpoint
        The entry, open.
    keep : callable, optional
        Only names for which it is true take part (the store's include/exclude filter).

    Returns
    -------
    dict of str to str
        ``{alias: target}`` in file order: ``alias`` shares its storage, storage offset,
        shape, strides and dtype with ``target``, the first such name in file order. Two
        views of different parts of one storage are not tied. Empty tensors never are.
    """
    if entry.kind not in _TORCH_KINDS or all(
        f.suffix.lower() == ".safetensors" for f in entry.files
    ):
        return {}
    first: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], str], str] = {}
    aliases: dict[str, str] = {}
    for name in ckpt:
        if not keep(name):
            continue
        tensor = ckpt[name]
        if tensor.numel() == 0 or tensor.untyped_storage().data_ptr() == 0:
            continue
        key = _view_key(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` object of a safetensors file's header, or None if it has none.

    Parameters
    ----------
    path : pathlib.Path
        A safetensors file (already validated by the reader; read again here, header
        only: 8 bytes of length and at most :data:`MAX_HEADER` bytes of JSON).

    Raises
    ------
    CheckpointError
        The header cannot be read, or its metadata is not an object of strings.
    """
    try:
        length = int.from_bytes(read_at(path, 0, 8), "little")
        if length > MAX_HEADER:
            raise CheckpointError(f"invalid safetensors file {path}: header too long")
        header = json.loads(read_at(path, 8, length).decode("utf-8"))
    except (ObjectStoreError, NotFoundError):  # an object store's own one-line errors
        raise
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the header of {path}: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CheckpointError(f"invalid safetensors file {path}: '__metadata__' is not strings")
    return dict(meta)
