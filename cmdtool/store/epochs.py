"""Epoch selections: the decomposition window and the epochs to rebuild."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmdtool.errors import EpochNotFoundError, UsageError


def _parse_bound(text: str, spec: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"epoch spec {spec!r}: {text!r} is not an integer label") from None


def select_range(labels: Sequence[int], spec: str) -> np.ndarray:
    """Rows whose label lies in the half-open label range ``A:B`` (either side optional).

    Returns
    -------
    ndarray, int64, shape (n,)
    """
    if spec.count(":") != 1:
        raise UsageError(f"epoch range {spec!r} must look like A:B, A: or :B (labels)")
    lo_s, hi_s = spec.split(":")
    lo, hi = _parse_bound(lo_s, spec), _parse_bound(hi_s, spec)
    # compared as Python ints: a label (or bound) of 20+ digits does not fit int64
    keep = [
        i
        for i, lab in enumerate(labels)
        if (lo is None or lab >= lo) and (hi is None or lab < hi)
    ]
    return np.asarray(keep, dtype=np.int64)


def select_window(labels: Sequence[int], spec: str | None, stride: int = 1) -> np.ndarray:
    """Rows of the decomposition window: labels in ``[A, B)``, every ``stride``-th.

    Raises a UsageError for an empty window or a stride < 1; the caller checks the
    minimum length.
    """
    if stride < 1:
        raise UsageError(f"stride={stride} must be >= 1")
    rows = np.arange(len(labels), dtype=np.int64) if not spec else select_range(labels, spec)
    if rows.size == 0:
        have = f"{labels[0]}..{labels[-1]}" if len(labels) else "none"
        raise UsageError(f"--epochs {spec}: no stored epoch falls in it (labels {have})")
    return rows[::stride]


def select_epochs(labels: Sequence[int], spec: str) -> np.ndarray:
    """Rows for ``last``, ``all``, ``A:B`` or comma-separated labels (``3,7,10``)."""
    spec = spec.strip()
    if not labels:
        raise UsageError("the store holds no epoch")
    if spec == "last":
        return np.array([len(labels) - 1], dtype=np.int64)
    if spec == "all":
        return np.arange(len(labels), dtype=np.int64)
    if ":" in spec:
        rows = select_range(labels, spec)
        if rows.size == 0:
            raise UsageError(
                f"--epochs {spec}: no stored epoch falls in it (labels {labels[0]}..{labels[-1]})"
            )
        return rows
    where = {lab: i for i, lab in enumerate(labels)}
    picked: list[int] = []
    for part in spec.split(","):
        lab = _parse_bound(part, spec)
        if lab is None:
            raise UsageError(f"epoch spec {spec!r} has an empty label")
        if lab not in where:
            raise EpochNotFoundError(
                f"epoch {lab} is not in the store (labels {labels[0]}..{labels[-1]})"
            )
        picked.append(where[lab])
    return np.asarray(picked, dtype=np.int64)
