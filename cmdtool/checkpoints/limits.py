"""Bounds on what one checkpoint may make cmdtool store: ``--max-params``, ``--max-tensors``
and ``--allow-expanded``.

A checkpoint file is small evidence for a large claim: a stride-0 (expanded) view of one
float is, to every reader, a tensor of any shape, and a file of a million tiny tensors makes
a million metadata records. These checks bound both before anything is written:

* **expanded or overlapping views** (a stride of 0 in a dimension of size > 1, or strides
  that make two indexes share one element) are refused unless ``allow_expanded``: the
  store would hold every logical element, far more than the file holds;
* **max_params**: the logical elements of all the tensors of one checkpoint together
  (default :data:`DEFAULT_MAX_PARAMS`, 2**34: a 64 GiB float32 row per epoch);
* **max_tensors**: the tensors of one checkpoint file (default
  :data:`DEFAULT_MAX_TENSORS`, 100,000: the store's ``zarr.json``, rewritten at every
  commit, holds one record of about 150 bytes per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cmdtool.errors import CheckpointError, UsageError

#: Default ``--max-params``: logical tensor elements per checkpoint, all tensors together.
DEFAULT_MAX_PARAMS = 2**34
#: Default ``--max-tensors``: tensors per checkpoint file.
DEFAULT_MAX_TENSORS = 100_000


@dataclass(frozen=True)
class ReadLimits:
    """What one checkpoint may hold.

    Attributes
    ----------
    allow_expanded : bool
        Accept stride-0 (expanded) and overlapping views, read at their full logical size.
    max_params : int
        Most logical elements of all the tensors of one checkpoint together (>= 1).
    max_tensors : int
        Most tensors in one checkpoint file (>= 1).
    """

    allow_expanded: bool = False
    max_params: int = DEFAULT_MAX_PARAMS
    max_tensors: int = DEFAULT_MAX_TENSORS

    def __post_init__(self) -> None:
        for option, value in (
            ("--max-params", self.max_params),
            ("--max-tensors", self.max_tensors),
        ):
            if type(value) is not int or value < 1:
                raise UsageError(f"{option} {value!r} is invalid: give a positive whole number")


def check_tensor_count(
    path: Path, count: int, limits: ReadLimits, *, at_least: bool = False
) -> None:
    """Refuse a file holding more than ``limits.max_tensors`` tensors.

    ``at_least``: ``count`` is where counting stopped, not the file's total.
    """
    if count > limits.max_tensors:
        many = "more tensors than" if at_least else f"{count:,} tensors, more than"
        raise CheckpointError(
            f"refusing {path}: it holds {many} --max-tensors {limits.max_tensors:,} allows "
            "(each would be one record of the store's metadata); pass a larger --max-tensors "
            "if the file is what you expect"
        )


def check_params(path: Path, total: int, limits: ReadLimits) -> None:
    """Refuse a checkpoint whose tensors hold more than ``limits.max_params`` elements."""
    if total > limits.max_params:
        raise CheckpointError(
            f"refusing {path}: its tensors hold {total:,} elements in all, more than "
            f"--max-params {limits.max_params:,} allows; pass a larger --max-params if the "
            "checkpoint is what you expect"
        )


def overlaps(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a strided layout may address one element from two indexes.

    Dimensions of size > 1 are sorted by stride; each stride must exceed the largest
    offset the smaller ones reach. This is exact for stride-0 dimensions and for every
    layout torch produces by slicing, transposing or permuting; a few interleaved
    layouts without overlap (shape (3, 2), strides (2, 3)) are reported as overlapping.
    """
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides, strict=True) if sz > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_layout(path: Path, name: str, tensor: torch.Tensor, limits: ReadLimits) -> None:
    """Refuse an expanded (stride-0) or overlapping view unless ``limits.allow_expanded``."""
    if limits.allow_expanded or tensor.numel() <= 1:
        return
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    if not overlaps(shape, strides):
        return
    stored = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
    raise CheckpointError(
        f"refusing tensor {name!r} of {path}: it is an expanded or overlapping view (shape "
        f"{shape}, strides {strides}) of {tensor.numel():,} elements, of which the file "
        f"stores {stored:,}; the store would hold every element. Pass --allow-expanded to "
        "ingest it at its full size"
    )
