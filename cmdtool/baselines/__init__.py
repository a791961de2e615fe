"""Stage 5 of the flow: the baselines of ``cmdtool compare`` (PCA, exact DMD, EMA, SWA)
against CMD, streamed over column blocks (:func:`compare`,
:mod:`~cmdtool.baselines.comparison`). The per-method mathematics is in
:mod:`~cmdtool.baselines.pca`, :mod:`~cmdtool.baselines.dmd` and
:mod:`~cmdtool.baselines.averages`; the passes in :mod:`~cmdtool.baselines.gram` and
:mod:`~cmdtool.baselines.passes`; the settings in :mod:`~cmdtool.baselines.settings`.

The names are imported on first use, so that :mod:`~cmdtool.baselines.settings` (which
the command line checks first) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "COMPARE_ATTR": "cmdtool.baselines.comparison",
    "CompareResult": "cmdtool.baselines.comparison",
    "MethodResult": "cmdtool.baselines.comparison",
    "compare": "cmdtool.baselines.comparison",
    "METHODS": "cmdtool.baselines.settings",
    "check_settings": "cmdtool.baselines.settings",
    "parse_methods": "cmdtool.baselines.settings",
    "parse_ranks": "cmdtool.baselines.settings",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
