"""Normalization statistics: which modelled tensors are running statistics, and how
decompositions rebuild them (``docs/design.md``, "Constant parameters and normalization
statistics").

Running statistics of BatchNorm / InstanceNorm / SyncBatchNorm (``running_mean``,
``running_var``) are moving averages, not trained weights. They are recognised by a
regular expression on the tensor name, fixed when the store is created (``ingest
--stats-pattern``) and recorded in the store's ``filters`` as ``stats``. A matched tensor
whose name ends in ``var`` is a variance: no rebuilt checkpoint may hold a negative or
non-finite value of it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cmdtool.errors import UsageError
from cmdtool.store.layout import ParamInfo

#: Default name rule: ``...running_mean`` and ``...running_var`` (torch's BatchNorm*d,
#: InstanceNorm*d with track_running_stats, SyncBatchNorm).
DEFAULT_STATS_PATTERN = r"(^|\.)running_(mean|var)$"
#: A matched tensor is a variance when its name matches this.
VARIANCE_RE = re.compile(r"var$")
#: How a decomposition rebuilds the statistics (``decompose --stats``):
#: ``gated`` the model's values, except at epochs where the modelled tensor is more than
#: :data:`GATE` (relative) away from the stored one, which are taken as stored;
#: ``raw`` each epoch's stored values; ``model`` the affine model ``a·r + b`` like any
#: parameter; ``positive`` variances modelled in log space, ``exp(a·r + b)``; ``clamp``
#: the affine model clamped to each entry's observed range over all ingested epochs.
STATS_CHOICES = ("gated", "raw", "model", "positive", "clamp")
DEFAULT_STATS = "gated"
#: Treatment of a decomposition (or store) made before cmdtool knew about statistics.
LEGACY_STATS = "model"
#: Relative error above which ``gated`` takes a tensor's stored statistics at an epoch.
GATE = 0.3


@dataclass(frozen=True)
class StatsTensor:
    """A modelled tensor recognised as normalization statistics."""

    name: str
    offset: int
    size: int
    variance: bool


def check_stats_choice(choice: str) -> str:
    """Validate a ``--stats`` value."""
    if choice not in STATS_CHOICES:
        raise UsageError(f"--stats {choice!r} is not one of {', '.join(STATS_CHOICES)}")
    return choice


def compile_stats_pattern(pattern: str) -> re.Pattern[str]:
    """The ``--stats-pattern`` regular expression; a UsageError when it is not valid."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(
            f"--stats-pattern {pattern!r}: invalid regular expression: {exc}"
        ) from None


def match_stats(params: Sequence[ParamInfo], pattern: str) -> list[StatsTensor]:
    """The modelled tensors whose name matches ``pattern`` (``re.search``), in store order."""
    rx = compile_stats_pattern(pattern)
    return [
        StatsTensor(p.name, p.offset, p.size, bool(VARIANCE_RE.search(p.name)))
        for p in sorted(params, key=lambda p: p.offset)
        if rx.search(p.name)
    ]


def stats_pattern_of(filters: dict[str, str | None]) -> tuple[str, bool]:
    """The store's statistics pattern and whether the store recorded one (a store made
    before issue 12 did not: the default pattern applies to it)."""
    value = filters.get("stats")
    if isinstance(value, str):
        return value, True
    return DEFAULT_STATS_PATTERN, False


def stats_columns(tensors: Sequence[StatsTensor]) -> tuple[np.ndarray, np.ndarray]:
    """Columns of ``weights`` of the statistics (int64, (S,)) and which are variances
    (bool, (S,))."""
    if not tensors:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    cols = np.concatenate([np.arange(t.offset, t.offset + t.size, dtype=np.int64) for t in tensors])
    var = np.concatenate([np.full(t.size, t.variance) for t in tensors])
    return cols, var


def pattern_for_new_store(params: Sequence[ParamInfo], asked: str | None, where: str) -> str:
    """The statistics pattern a new store records; an explicit one must match a tensor
    of the first checkpoint ``where``."""
    if asked is None:
        return DEFAULT_STATS_PATTERN
    if not match_stats(params, asked):
        shown = ", ".join(repr(p.name) for p in params[:3])
        raise UsageError(
            f"--stats-pattern {asked!r} matches none of the floating tensors of {where} "
            f"({shown}, ...); fix the pattern"
        )
    return asked


def check_stored_pattern(
    path: str | os.PathLike[str], filters: dict[str, str | None], asked: str | None
) -> None:
    """An explicit ``--stats-pattern`` on an existing store must be the one it was made
    with (the pattern is fixed at creation, like ``--include``)."""
    stored, recorded = stats_pattern_of(filters)
    if asked is not None and (not recorded or asked != stored):
        was = repr(stored) if recorded else "none (made before cmdtool recorded one)"
        raise UsageError(
            f"store {path} was created with --stats-pattern {was}; the pattern is fixed at "
            "creation: re-ingest without --stats-pattern, or into a new store"
        )
