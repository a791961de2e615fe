"""The evaluation hook: a user's function ``fn(state_dict) -> {metric: number}``, loaded
from ``module:function`` or ``path/to/file.py:function`` and called on one checkpoint at
a time. Loading the target runs its file as code, as ``python file.py`` would: it must be
trusted. While user code runs, ``sys.argv`` is ``[its file]`` (as for ``python file.py``)
and a ``SystemExit`` it raises (``sys.exit``, argparse) is an :class:`EvaluationError`
(exit 9), so it can neither end the process nor pass a gate by exiting 0."""

from __future__ import annotations

import importlib
import importlib.util
import io
import math
import numbers
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cmdtool.errors import EvaluationError, UsageError

EvalFn = Callable[[dict[str, torch.Tensor]], Mapping[str, Any]]
Progress = Callable[[int, int, str], None]


def json_float(v: float) -> float | None:
    return None if math.isnan(v) else v


# ------------------------------------------------------------------ user code
class _HeldStderr(io.TextIOBase):
    """``sys.stderr`` while user code runs: what it writes is held, and written to the real
    stream once the code returns (or dropped when it exits, its last line going into the
    error); after that, writes pass straight through (a logging handler the code made
    keeps working)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.held = io.StringIO()
        self.holding = True

    def write(self, text: str) -> int:
        (self.held if self.holding else self.real).write(text)
        return len(text)

    def flush(self) -> None:
        if not self.holding:
            self.real.flush()

    def fileno(self) -> int:
        return int(self.real.fileno())

    def isatty(self) -> bool:
        return bool(self.real.isatty())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.real, "encoding", "utf-8"))

    def release(self, replay: bool) -> None:
        if self.holding:
            self.holding = False
            if replay and self.held.getvalue():
                self.real.write(self.held.getvalue())
                self.real.flush()

    def last_line(self) -> str:
        lines = [ln.strip() for ln in self.held.getvalue().splitlines() if ln.strip()]
        return lines[-1] if lines else ""


@contextmanager
def user_code(target: str, doing: str, argv0: str) -> Iterator[None]:
    """Run the user's ``--eval`` code (importing it, or calling its function) inside.

    ``sys.argv`` is ``[argv0]`` meanwhile, as ``python file.py`` would have it, so an
    argparse parser with optional arguments only sees none; a ``SystemExit`` (from
    ``sys.exit`` or argparse) becomes an :class:`EvaluationError` naming ``target``, what
    was being done, the exit code and the last line the code wrote to stderr. Ctrl-C
    (KeyboardInterrupt) passes through unchanged.
    """
    real_argv, real_err = sys.argv, sys.stderr
    held = _HeldStderr(real_err)
    sys.argv, sys.stderr = [argv0], held
    try:
        yield
    except SystemExit as exc:
        held.release(replay=False)
        said = held.last_line()
        raise EvaluationError(
            f"--eval {target}: {doing} called sys.exit({exc.code!r})"
            + (f" after printing {said!r}" if said else "")
            + "; evaluation code must return, not exit (guard a command line parser with "
            "if __name__ == '__main__':)"
        ) from None
    finally:
        sys.argv = real_argv
        if sys.stderr is held:
            sys.stderr = real_err
        held.release(replay=True)


def _argv0(fn: Any) -> str:
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    return str(getattr(module, "__file__", None) or getattr(fn, "__module__", "") or "eval")


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
            with user_code(target, f"importing {path}", str(path)):
                spec.loader.exec_module(module)
        except EvaluationError:
            sys.modules.pop(mod_name, None)
            raise
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise EvaluationError(
                f"--eval {target}: importing {path} failed: {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            with user_code(target, f"importing module {where!r}", where):
                module = importlib.import_module(where)
        except EvaluationError:
            raise
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
    """Run ``fn`` on one checkpoint and check what it returned (see :func:`user_code`)."""
    try:
        doing = f"{what.rsplit(':', 1)[-1]}() on the {kind} checkpoint of epoch {label}"
        with user_code(what, doing, _argv0(fn)):
            got = fn(state)
    except EvaluationError:
        raise
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
