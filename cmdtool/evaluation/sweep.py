"""``cmdtool sweep``: fit several numbers of modes and evaluate each (CMD's accuracy
against M, paper Fig. 23)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cmdtool.decomposition import CMD
from cmdtool.errors import UsageError
from cmdtool.evaluation.hook import (
    EvalFn,
    Progress,
    call_function,
    check_same_metrics,
    json_float,
    resolve_function,
)
from cmdtool.reconstruction import raw_state, rebuild_state
from cmdtool.store import (
    RESULT_ATTR,
    TrajectoryStore,
    check_result_name,
    scratch_result_name,
)
from cmdtool.store.epochs import select_window

SWEEP_ATTR = "cmdtool_sweep"
@dataclass
class SweepResult:
    """Reconstruction error (and metrics) of CMD for several numbers of modes.

    Attributes
    ----------
    modes : list of int
        Requested numbers of modes M.
    n_modes_found : list of int
        Modes each fit found (may be fewer than requested).
    mode_sizes : list of list of int
        Parameters per mode, for each fit.
    relative_error : list of float
        ``||W - W_hat||_F / ||W||_F`` over the window, for each fit.
    metrics : dict of str to list of float
        With an evaluation function: its metrics on the CMD checkpoint of ``epoch``.
    raw_metrics : dict of str to float
        The same metrics on the raw checkpoint of ``epoch``.
    epoch : int
        The last epoch of the window.
    window, samples, seed, function
        The settings used.
    """

    modes: list[int]
    n_modes_found: list[int]
    mode_sizes: list[list[int]]
    relative_error: list[float]
    metrics: dict[str, list[float]]
    raw_metrics: dict[str, float]
    epoch: int
    window: str
    samples: int
    seed: int
    function: str | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        """The stored attribute: NaN values become null."""
        return {
            "modes": list(self.modes),
            "n_modes_found": list(self.n_modes_found),
            "mode_sizes": [list(s) for s in self.mode_sizes],
            "relative_error": list(self.relative_error),
            "metrics": {k: [json_float(v) for v in vals] for k, vals in self.metrics.items()},
            "raw_metrics": {k: json_float(v) for k, v in self.raw_metrics.items()},
            "epoch": self.epoch,
            "window": self.window,
            "samples": self.samples,
            "seed": self.seed,
            "function": self.function,
            "created": self.created,
        }


def sweep(
    store: str | os.PathLike[str],
    modes: list[int],
    *,
    fn: EvalFn | str | None = None,
    samples: int | None = None,
    seed: int | None = None,
    epochs: str | None = None,
    name: str = "cmd",
    device: str = "auto",
    progress: Progress | None = None,
) -> SweepResult:
    """Fit CMD for each number of modes in ``modes`` and record error (and metrics).

    Each fit goes into a temporary results group, removed afterwards; the list is stored
    as the attribute ``cmdtool_sweep`` of the decomposition group ``name``, which must
    exist. The store's write lock is held throughout.

    Parameters
    ----------
    store : path
    modes : list of int
        Numbers of modes to try.
    fn : callable or str, optional
        Evaluation function: its metrics on the CMD checkpoint of the window's last epoch,
        and once on the raw one.
    samples, seed, epochs : optional
        K, the sampling seed and the window ``A:B``; default those of decomposition ``name``.
    name : str
        The decomposition the sweep is stored with.
    device : str
        Torch device of the fits.
    progress : callable, optional
        ``progress(done, total, what)`` after each fit.

    Returns
    -------
    SweepResult
    """
    if not modes:
        raise UsageError("--modes needs at least one number of modes")
    if any(m < 1 for m in modes):
        raise UsageError(f"--modes {modes}: each must be >= 1")
    check_result_name(name)
    func, what = (None, None) if fn is None else resolve_function(fn)
    with TrajectoryStore.open(store, mode="r+") as st:
        base: dict[str, Any] = dict(st.open_result(name).attrs[RESULT_ATTR])  # type: ignore[arg-type]
        window = epochs if epochs is not None else base.get("window", ":")
        window_arg = None if window in (None, ":", "") else window
        k = samples if samples is not None else int(base["samples"])
        s = seed if seed is not None else int(base.get("seed", 0))
        rows = select_window(st.labels, window_arg)
        last = st.labels[int(rows[-1])]
        raw_metrics: dict[str, float] = {}
        if func is not None:
            assert what is not None
            raw_metrics = call_function(func, raw_state(st, last), what, last, "raw")
        found: list[int] = []
        sizes: list[list[int]] = []
        errors: list[float] = []
        metrics: dict[str, list[float]] = {key: [] for key in raw_metrics}
        for i, m in enumerate(modes):
            tmp = scratch_result_name()
            try:
                model = CMD(m, n_samples=k, epochs=window_arg, seed=s, device=device).fit(
                    st, name=tmp
                )
                found.append(model.n_modes_)
                sizes.append([int(c) for c in model.mode_sizes_])
                errors.append(model.relative_error_)
                if func is not None:
                    assert what is not None
                    state = rebuild_state(model, last)
                    got = call_function(func, state, what, last, f"CMD (M={m})")
                    check_same_metrics(list(raw_metrics), got, what, last)
                    for key in metrics:
                        metrics[key].append(got[key])
            finally:
                st._remove(st.path / tmp)  # local: renamed away, deleted; a URL: unpointed
                st.discard_result(tmp)
            if progress is not None:
                progress(i + 1, len(modes), f"M = {m}")
        result = SweepResult(
            modes=list(modes),
            n_modes_found=found,
            mode_sizes=sizes,
            relative_error=errors,
            metrics=metrics,
            raw_metrics=raw_metrics,
            epoch=last,
            window=window or ":",
            samples=k,
            seed=s,
            function=what,
        )
        st.set_result_attr(name, SWEEP_ATTR, result.to_json())
    return result
