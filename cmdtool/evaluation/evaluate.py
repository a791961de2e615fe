"""Evaluate raw and CMD checkpoints with a user function, and sweep the number of modes.

The user function takes a state dict (name to tensor, as in the source checkpoints) and
returns a dict of metric name to float. Checkpoints are built in memory one at a time
(:func:`cmdtool.reconstruction.raw_state`, :func:`cmdtool.reconstruction.rebuild_state`);
nothing is written but the results, stored as JSON attributes of the decomposition group
(``cmdtool_evaluation`` and ``cmdtool_sweep``) while holding the store's write lock.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cmdtool.decomposition import CMD
from cmdtool.errors import CmdtoolError, UsageError
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
    TrajectoryStore,
    as_store,
)
from cmdtool.store.epochs import select_epochs
from cmdtool.store.results import retry_republished

EVAL_ATTR = "cmdtool_evaluation"
#: Epochs at the end of the evaluated ones that ``--fail-if-worse`` compares.
GATE_EPOCHS = 10



class GateFailed(CmdtoolError):
    """``--fail-if-worse``: the CMD checkpoints score worse than the raw ones (exit 10)."""

    exit_code = 10


@dataclass
class EvaluationResult:
    """Metrics of the raw and the CMD checkpoint of each evaluated epoch.

    Attributes
    ----------
    epochs : list of int
        Epoch labels, in store order.
    metrics : list of str
        Metric names, in the order the function returned them.
    raw, cmd : dict of str to list of float
        Per metric, one value per epoch (NaN where the function returned NaN).
    function : str
        The evaluation function, ``MODULE:FUNCTION`` or ``path.py:FUNCTION``.
    created : str
        ISO time of the evaluation (UTC).
    """

    epochs: list[int]
    metrics: list[str]
    raw: dict[str, list[float]]
    cmd: dict[str, list[float]]
    function: str = ""
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        """The stored attribute: NaN values become null (JSON has no NaN)."""
        return {
            "epochs": list(self.epochs),
            "metrics": list(self.metrics),
            "raw": {k: [json_float(v) for v in vals] for k, vals in self.raw.items()},
            "cmd": {k: [json_float(v) for v in vals] for k, vals in self.cmd.items()},
            "function": self.function,
            "created": self.created,
        }


def evaluate(
    store: TrajectoryStore | str | os.PathLike[str],
    fn: EvalFn | str,
    *,
    epochs: str = "all",
    name: str = "cmd",
    progress: Progress | None = None,
) -> EvaluationResult:
    """Evaluate the raw and the CMD checkpoint of each chosen epoch with ``fn``.

    The results are stored as the attribute ``cmdtool_evaluation`` of the decomposition
    group ``name`` (replacing an earlier one); nothing else is written.

    Parameters
    ----------
    store : TrajectoryStore or path
    fn : callable or str
        State dict to dict of metric name to float, or ``MODULE:FUNCTION`` /
        ``path/file.py:FUNCTION`` (see :func:`load_eval_function`).
    epochs : str
        ``last``, ``all``, ``A:B`` (labels, half-open) or ``3,7,10``.
    name : str
        The decomposition whose checkpoints are evaluated.
    progress : callable, optional
        Called as ``progress(done, total, what)`` after each checkpoint.

    Returns
    -------
    EvaluationResult

    Raises
    ------
    EvaluationError
        The function cannot be loaded, raises, or returns something that is not a dict
        of metric name to number; nothing is stored then.
    """
    func, what = resolve_function(fn)
    st = as_store(store)
    model = CMD.load(st, name)
    rows = select_epochs(st.labels, epochs)
    labels = [st.labels[int(r)] for r in rows]
    # one published version throughout: a republish of `name` during the evaluation
    # (ResultChangedError) evaluates again, on the new version
    loaded = [model]
    return retry_republished(
        f"decomposition {name!r} of store {st.path}",
        lambda: _evaluate_once(
            st, loaded.pop() if loaded else CMD.load(st, name), labels, func, what, progress
        ),
    )


def _evaluate_once(
    st: TrajectoryStore,
    model: CMD,
    labels: list[int],
    func: EvalFn,
    what: str,
    progress: Progress | None,
) -> EvaluationResult:
    """Evaluate ``labels`` on ``model`` and store the result on that very version."""
    name = model.name_
    metrics: list[str] = []
    raw: dict[str, list[float]] = {}
    cmd: dict[str, list[float]] = {}
    total = 2 * len(labels)
    for i, label in enumerate(labels):
        for kind, values, build in (
            ("raw", raw, lambda lab: raw_state(st, lab)),
            ("CMD", cmd, lambda lab: rebuild_state(model, lab)),
        ):
            got = call_function(func, build(label), what, label, kind)
            if not metrics:
                metrics = list(got)
                raw.update({k: [] for k in metrics})
                cmd.update({k: [] for k in metrics})
            check_same_metrics(metrics, got, what, label)
            for k in metrics:
                values[k].append(got[k])
            if progress is not None:
                done = 2 * i + (1 if kind == "raw" else 2)
                progress(done, total, f"epoch {label} ({kind})")
    result = EvaluationResult(epochs=labels, metrics=metrics, raw=raw, cmd=cmd, function=what)
    with TrajectoryStore.open(st.path, mode="r+") as writer:
        writer.set_result_attr(name, EVAL_ATTR, result.to_json(), expect=model.pin_)
    return result


def parse_gate(spec: str) -> tuple[str, float]:
    """``METRIC[:TOL]`` of ``--fail-if-worse`` (TOL default 0, >= 0)."""
    metric, _, tol_s = spec.partition(":")
    metric = metric.strip()
    if not metric:
        raise UsageError(f"--fail-if-worse {spec!r} must look like METRIC or METRIC:TOL")
    try:
        tol = float(tol_s) if tol_s.strip() else 0.0
    except ValueError:
        raise UsageError(f"--fail-if-worse {spec!r}: TOL {tol_s!r} is not a number") from None
    if not math.isfinite(tol) or tol < 0:
        raise UsageError(f"--fail-if-worse {spec!r}: TOL must be a finite number >= 0")
    return metric, tol


def check_gate(result: EvaluationResult, metric: str, tol: float = 0.0) -> tuple[float, float]:
    """Compare CMD with raw on the last :data:`GATE_EPOCHS` evaluated epochs.

    Parameters
    ----------
    result : EvaluationResult
    metric : str
        A metric the function returns; higher is better.
    tol : float
        Allowed shortfall of CMD's mean below the raw mean.

    Returns
    -------
    (float, float)
        The raw and the CMD mean (NaN values ignored).

    Raises
    ------
    UsageError
        ``metric`` is not one the function returned.
    GateFailed
        CMD's mean is below the raw mean minus ``tol``.
    """
    if metric not in result.metrics:
        raise UsageError(
            f"--fail-if-worse {metric}: the function returns no such metric "
            f"(it returns: {', '.join(result.metrics) or 'none'})"
        )
    n = min(GATE_EPOCHS, len(result.epochs))
    raw_mean = float(np.nanmean(result.raw[metric][-n:])) if n else math.nan
    cmd_mean = float(np.nanmean(result.cmd[metric][-n:])) if n else math.nan
    if cmd_mean < raw_mean - tol or (math.isnan(cmd_mean) and not math.isnan(raw_mean)):
        raise GateFailed(
            f"gate failed: mean {metric} of the CMD checkpoints {cmd_mean:.6g} < raw mean "
            f"{raw_mean:.6g} - tolerance {tol:g} over the last {n} epoch(s) evaluated"
        )
    return raw_mean, cmd_mean


# ---------------------------------------------------------------------- sweep
