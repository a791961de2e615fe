"""The evaluation hook: a user's function ``fn(state_dict) -> {metric: number}``, loaded
from ``module:function`` or ``path/to/file.py:function`` and called on one checkpoint at
a time. Loading the target runs its file as code, as ``python file.py`` would."""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from cmdtool.errors import EvaluationError, UsageError

EvalFn = Callable[[dict[str, torch.Tensor]], Mapping[str, Any]]
Progress = Callable[[int, int, str], None]
def json_float(v: float) -> float | None:
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


def describe_function(fn: EvalFn | str) -> str:
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


def call_function(
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


def check_same_metrics(metrics: list[str], got: dict[str, float], what: str, label: int) -> None:
    if list(got) != metrics and set(got) != set(metrics):
        odd = sorted(set(got) ^ set(metrics))[0]
        raise EvaluationError(
            f"--eval {what}: metric {odd!r} is returned on some epochs but not on epoch {label}"
        )


def resolve_function(fn: EvalFn | str) -> tuple[EvalFn, str]:
    if isinstance(fn, str):
        return load_eval_function(fn), fn
    return fn, describe_function(fn)


# ------------------------------------------------------------------- evaluate
