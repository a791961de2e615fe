"""Evaluate raw and CMD checkpoints with a user function, and sweep the number of modes.

The user function takes a state dict (name to tensor, as in the source checkpoints) and
returns a dict of metric name to float. Checkpoints are built in memory one at a time
(:func:`cmdtool.reconstruct.raw_state`, :func:`cmdtool.reconstruct.rebuild_state`);
nothing is written but the results, stored as JSON attributes of the decomposition group
(``cmdtool_evaluation`` and ``cmdtool_sweep``) while holding the store's write lock.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmdtool.decompose import CMD
from cmdtool.epochs import select_epochs, select_window
from cmdtool.errors import CmdtoolError, EvaluationError, UsageError
from cmdtool.reconstruct import raw_state, rebuild_state
from cmdtool.store import (
    RESULT_ATTR,
    TrajectoryStore,
    as_store,
    check_result_name,
    scratch_result_name,
)

EVAL_ATTR = "cmdtool_evaluation"
SWEEP_ATTR = "cmdtool_sweep"
#: Epochs at the end of the evaluated ones that ``--fail-if-worse`` compares.
GATE_EPOCHS = 10

EvalFn = Callable[[dict[str, torch.Tensor]], Mapping[str, Any]]
Progress = Callable[[int, int, str], None]


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
            "raw": {k: [_json_float(v) for v in vals] for k, vals in self.raw.items()},
            "cmd": {k: [_json_float(v) for v in vals] for k, vals in self.cmd.items()},
            "function": self.function,
            "created": self.created,
        }


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
            "metrics": {k: [_json_float(v) for v in vals] for k, vals in self.metrics.items()},
            "raw_metrics": {k: _json_float(v) for k, v in self.raw_metrics.items()},
            "epoch": self.epoch,
            "window": self.window,
            "samples": self.samples,
            "seed": self.seed,
            "function": self.function,
            "created": self.created,
        }


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else v


# ------------------------------------------------------------------ the function
def load_eval_function(target: str) -> EvalFn:
    """Import ``pkg.mod:function`` or ``path/to/file.py:function``.

    Parameters
    ----------
    target : str
        A module importable from ``sys.path`` or a ``.py`` file, a colon, a function name.

    Returns
    -------
    callable
        The function (state dict to dict of metric name to float).

    Raises
    ------
    UsageError
        ``target`` is not of the form ``MODULE:FUNCTION``.
    EvaluationError
        The module cannot be imported or lacks the function.
    """
    if target.count(":") < 1:
        raise UsageError(
            f"--eval {target!r} must look like MODULE:FUNCTION or path/file.py:FUNCTION"
        )
    where, fn_name = target.rsplit(":", 1)
    if not where or not fn_name:
        raise UsageError(
            f"--eval {target!r} must look like MODULE:FUNCTION or path/file.py:FUNCTION"
        )
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise EvaluationError(f"--eval {target}: file {path} not found")
        mod_name = f"_cmdtool_eval_{path.stem}_{uuid.uuid4().hex[:8]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise EvaluationError(f"--eval {target}: cannot load {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look it up there
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise EvaluationError(
                f"--eval {target}: importing {path} failed: {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise EvaluationError(
                f"--eval {target}: cannot import module {where!r}: {type(exc).__name__}: {exc}"
            ) from exc
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise EvaluationError(f"--eval {target}: {where} has no function {fn_name!r}")
    if not callable(fn):
        raise EvaluationError(f"--eval {target}: {fn_name!r} in {where} is not callable")
    return fn  # type: ignore[no-any-return]


def _describe(fn: EvalFn | str) -> str:
    if isinstance(fn, str):
        return fn
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _as_float(value: Any) -> float | None:
    """A metric value as a float; None for anything that is not a (finite or NaN) number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool:
            return None
        value = value.item()
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if (math.isfinite(f) or math.isnan(f)) else None
    return None


def _call(
    fn: EvalFn, state: dict[str, torch.Tensor], what: str, label: int, kind: str
) -> dict[str, float]:
    """Run ``fn`` on one checkpoint and check what it returned."""
    try:
        got = fn(state)
    except Exception as exc:
        raise EvaluationError(
            f"--eval {what} raised on the {kind} checkpoint of epoch {label}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(got, Mapping):
        raise EvaluationError(
            f"--eval {what} returned {type(got).__name__} on epoch {label}; "
            "it must return a dict of metric name to float"
        )
    out: dict[str, float] = {}
    for key, value in got.items():
        f = _as_float(value)
        if not isinstance(key, str) or f is None:
            raise EvaluationError(
                f"--eval {what}: metric {key!r} is {value!r} ({type(value).__name__}) on "
                f"epoch {label}; metrics must be finite numbers or NaN"
            )
        out[key] = f
    if not out:
        raise EvaluationError(f"--eval {what} returned no metric on epoch {label}")
    return out


def _check_same_metrics(metrics: list[str], got: dict[str, float], what: str, label: int) -> None:
    if list(got) != metrics and set(got) != set(metrics):
        odd = sorted(set(got) ^ set(metrics))[0]
        raise EvaluationError(
            f"--eval {what}: metric {odd!r} is returned on some epochs but not on epoch {label}"
        )


def _resolve(fn: EvalFn | str) -> tuple[EvalFn, str]:
    if isinstance(fn, str):
        return load_eval_function(fn), fn
    return fn, _describe(fn)


# ------------------------------------------------------------------- evaluate
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
    func, what = _resolve(fn)
    st = as_store(store)
    model = CMD.load(st, name)
    rows = select_epochs(st.labels, epochs)
    labels = [st.labels[int(r)] for r in rows]
    metrics: list[str] = []
    raw: dict[str, list[float]] = {}
    cmd: dict[str, list[float]] = {}
    total = 2 * len(labels)
    for i, label in enumerate(labels):
        for kind, values, build in (
            ("raw", raw, lambda lab: raw_state(st, lab)),
            ("CMD", cmd, lambda lab: rebuild_state(model, lab)),
        ):
            got = _call(func, build(label), what, label, kind)
            if not metrics:
                metrics = list(got)
                raw.update({k: [] for k in metrics})
                cmd.update({k: [] for k in metrics})
            _check_same_metrics(metrics, got, what, label)
            for k in metrics:
                values[k].append(got[k])
            if progress is not None:
                done = 2 * i + (1 if kind == "raw" else 2)
                progress(done, total, f"epoch {label} ({kind})")
    result = EvaluationResult(epochs=labels, metrics=metrics, raw=raw, cmd=cmd, function=what)
    with TrajectoryStore.open(st.path, mode="r+") as writer:
        writer.set_result_attr(name, EVAL_ATTR, result.to_json())
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
    func, what = (None, None) if fn is None else _resolve(fn)
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
            raw_metrics = _call(func, raw_state(st, last), what, last, "raw")
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
                    got = _call(func, rebuild_state(model, last), what, last, f"CMD (M={m})")
                    _check_same_metrics(list(raw_metrics), got, what, last)
                    for key in metrics:
                        metrics[key].append(got[key])
            finally:
                shutil.rmtree(st.path / tmp, ignore_errors=True)
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
