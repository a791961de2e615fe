"""cmdtool: Correlation Mode Decomposition of neural-network training runs.

The public API, imported on first use so that ``import cmdtool`` stays light::

    from cmdtool import CMD, ingest, reconstruct
    ingest("run/", "store.zarr")
    model = CMD(n_modes=10).fit("store.zarr")
    reconstruct("store.zarr", "rebuilt/", epochs="last")

Data flows one way through the stage packages: ``checkpoints`` (files -> named
tensors), ``ingestion`` (-> store rows), ``store`` (rows, row blocks, results groups),
``method`` (the mathematics), ``backends`` (where the streamed pass runs),
``decomposition`` (the estimator), ``reconstruction`` (results -> checkpoints),
``evaluation`` and ``report``; ``online`` runs CMD while training, ``cli`` is the
command line. ``docs/design.md`` describes the method and the store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "CMD": "cmdtool.decomposition",
    "OnlineCMD": "cmdtool.online",
    "EmbeddedCMD": "cmdtool.online",
    "TrajectoryStore": "cmdtool.store",
    "ingest": "cmdtool.ingestion",
    "reconstruct": "cmdtool.reconstruction",
    "rebuild_state": "cmdtool.reconstruction",
    "update": "cmdtool.decomposition.update",
    "evaluate": "cmdtool.evaluation",
    "compare": "cmdtool.baselines",
}

__all__ = [
    "CMD",
    "EmbeddedCMD",
    "OnlineCMD",
    "TrajectoryStore",
    "__version__",
    "compare",
    "evaluate",
    "ingest",
    "rebuild_state",
    "reconstruct",
    "update",
]

if TYPE_CHECKING:
    from cmdtool.baselines import compare
    from cmdtool.decomposition import CMD
    from cmdtool.decomposition.update import update
    from cmdtool.evaluation.evaluate import evaluate
    from cmdtool.ingestion.ingest import ingest
    from cmdtool.online import EmbeddedCMD, OnlineCMD
    from cmdtool.reconstruction import rebuild_state, reconstruct
    from cmdtool.store import TrajectoryStore


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cmdtool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
