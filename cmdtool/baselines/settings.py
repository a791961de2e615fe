"""The settings of ``compare``, checked before anything is written (and before torch is
imported, so that a bad option fails fast on the command line).

:func:`check_settings` opens the store read-only and returns the window and the
resolved settings, or raises a one-line :class:`~cmdtool.errors.UsageError` naming the
value and its limit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmdtool.errors import UsageError
from cmdtool.store import RESULT_ATTR, TrajectoryStore, check_result_name
from cmdtool.store.epochs import select_window

METHODS = ("cmd", "pca", "dmd", "ema", "swa")
DEFAULT_RANKS = (1, 2, 5, 10)
DEFAULT_EMA_DECAY = 0.9
#: Fewest epochs a window must hold, as decompose (``decomposition.estimator.MIN_EPOCHS``).
MIN_EPOCHS = 3


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """``"cmd,pca"`` or a sequence of names, duplicates dropped; an unknown name is a
    UsageError."""
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    out: list[str] = []
    for item in items:
        m = str(item).strip().lower()
        if not m:
            continue
        if m not in METHODS:
            raise UsageError(f"--methods: unknown method {item!r} (known: {', '.join(METHODS)})")
        if m not in out:
            out.append(m)
    if not out:
        raise UsageError(f"--methods {methods!r} names no method (known: {', '.join(METHODS)})")
    return out


def parse_ranks(ranks: str | Sequence[int] | None) -> list[int] | None:
    """``"1,2,5"`` or a sequence of ints, duplicates dropped (None: the defaults)."""
    if ranks is None:
        return None
    items = ranks.split(",") if isinstance(ranks, str) else list(ranks)
    out: list[int] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            r = int(str(item).strip())
        except ValueError:
            raise UsageError(f"--ranks: {item!r} is not an integer") from None
        if r not in out:
            out.append(r)
    if not out:
        raise UsageError(f"--ranks {ranks!r} names no rank")
    return out


def check_out(st: TrajectoryStore, out: Path) -> None:
    """``--write OUT`` may not lie inside the store nor inside a folder it was ingested
    from (as ``reconstruct``), nor be a file."""
    where = out.resolve()
    if where == st.path.resolve() or st.path.resolve() in where.parents:
        raise UsageError(f"--write {out}: the folder is inside the store {st.path}; pick another")
    for root in (Path(r) for r in st.source_roots):
        if where == root or root in where.parents:
            raise UsageError(
                f"--write {out}: the folder is inside {root}, which holds the source "
                "checkpoints of this store; pick another"
            )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--write {out} exists and is not a folder")


@dataclass
class Settings:
    """What :func:`check_settings` resolved.

    Attributes
    ----------
    path : Path
    methods : list of str
    ranks : list of int
        Ascending, each ``1 <= r < T'``.
    window : str or None
        ``A:B`` or None (every epoch).
    stride : int
    rows : ndarray, int64, shape (T',)
    ema_decay : float
    swa_epochs : int
    has_decomposition : bool
        Whether the group ``name`` exists.
    """

    path: Path
    methods: list[str]
    ranks: list[int]
    window: str | None
    stride: int
    rows: np.ndarray
    ema_decay: float
    swa_epochs: int
    has_decomposition: bool


def check_settings(
    store: TrajectoryStore | str | os.PathLike[str],
    *,
    methods: str | Sequence[str] = METHODS,
    ranks: str | Sequence[int] | None = None,
    epochs: str | None = None,
    stride: int | None = None,
    name: str = "cmd",
    write: str | os.PathLike[str] | None = None,
    ema_decay: float = DEFAULT_EMA_DECAY,
    swa_epochs: int | None = None,
) -> Settings:
    """Check every setting of :func:`cmdtool.baselines.compare` against the store.

    The window defaults to the decomposition's (``--epochs`` and ``--stride`` both
    left out and the group ``name`` present), else every epoch with stride 1; the ranks
    to those of 1, 2, 5, 10 below T'; the SWA length to ``min(10, max(1, T' // 4))``.

    Raises
    ------
    UsageError
        An unknown method, a rank < 1 or >= T', a decay outside (0, 1), an SWA length
        < 1 or > T', a window of fewer than 3 epochs, an unusable name or output folder.
    """
    meths = parse_methods(methods)
    rank_list = parse_ranks(ranks)
    check_result_name(name)
    if not isinstance(ema_decay, int | float) or not (0.0 < ema_decay < 1.0):  # NaN fails
        raise UsageError(f"--ema-decay {ema_decay}: must be > 0 and < 1")
    from cmdtool.store.objects import is_url

    # a URL stays text: a Path would fold s3://bucket into s3:/bucket
    path = store.path if isinstance(store, TrajectoryStore) else (
        store if is_url(store) else Path(store)
    )
    with TrajectoryStore.open(path) as st:
        has = name in st.result_names()
        win, stp = epochs, 1 if stride is None else stride
        if has and epochs is None and stride is None:
            attrs: dict[str, Any] = st.result_attr(name, RESULT_ATTR) or {}
            win = None if attrs.get("window") in (None, ":") else attrs.get("window")
            stp = int(attrs.get("stride", 1))
        if st.n_epochs == 0:
            raise UsageError(f"store {path} holds no epoch; run 'cmdtool ingest' first")
        rows = select_window(st.labels, win, stp)
        where = f"--epochs {win or 'all'}, --stride {stp}"
        t = int(rows.size)
        if t < MIN_EPOCHS:
            raise UsageError(
                f"the window holds {t} epoch(s) ({where}); compare needs at least {MIN_EPOCHS}"
            )
        if rank_list is None:
            use = [r for r in DEFAULT_RANKS if r < t]
        else:
            for r in rank_list:
                if r < 1 or r >= t:
                    raise UsageError(
                        f"--ranks {r}: a rank must be >= 1 and < the window's {t} epochs ({where})"
                    )
            use = sorted(rank_list)
        k = min(10, max(1, t // 4)) if swa_epochs is None else int(swa_epochs)
        if k < 1 or k > t:
            raise UsageError(
                f"--swa-epochs {k}: must be >= 1 and <= the window's {t} epochs ({where})"
            )
        if write is not None:
            check_out(st, Path(write))
    assert math.isfinite(ema_decay)
    return Settings(path, meths, use, win, stp, rows, float(ema_decay), k, has)  # type: ignore[arg-type]  # a URL is text
