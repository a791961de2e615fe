"""Stage 1 of the flow: checkpoint files -> named tensors.

:func:`discover` finds and orders the checkpoints of a folder
(:mod:`~cmdtool.checkpoints.discover`); :func:`open_checkpoint` reads one as a mapping of
named tensors (:mod:`~cmdtool.checkpoints.reader`), through the format's safe reader
(:mod:`~cmdtool.checkpoints.safetensors`, :mod:`~cmdtool.checkpoints.torchfile`).
"""

from cmdtool.checkpoints.discover import (
    CheckpointEntry,
    Discovery,
    SkippedFile,
    canonical_name,
    discover,
    find_checkpoints,
    natural_label,
)
from cmdtool.checkpoints.dtypes import dtype_name, torch_dtype
from cmdtool.checkpoints.reader import Checkpoint, open_checkpoint

__all__ = [
    "Checkpoint",
    "CheckpointEntry",
    "Discovery",
    "SkippedFile",
    "canonical_name",
    "discover",
    "dtype_name",
    "find_checkpoints",
    "natural_label",
    "open_checkpoint",
    "torch_dtype",
]
