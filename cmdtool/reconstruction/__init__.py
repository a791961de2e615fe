"""Stage 6 of the flow: results -> rebuilt checkpoints (step 7 of ``docs/design.md``).

:func:`rebuild_state` / :func:`raw_state` build one epoch in memory
(:mod:`~cmdtool.reconstruction.rebuild`); :func:`reconstruct` writes files
(:mod:`~cmdtool.reconstruction.write`).
"""

from cmdtool.reconstruction.rebuild import raw_state, rebuild_state
from cmdtool.reconstruction.write import (
    FORMATS,
    EpochWriter,
    ReconstructSummary,
    reconstruct,
    write_epoch,
)

__all__ = [
    "FORMATS",
    "EpochWriter",
    "ReconstructSummary",
    "raw_state",
    "rebuild_state",
    "reconstruct",
    "write_epoch",
]
