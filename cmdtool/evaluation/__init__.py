"""Evaluating rebuilt checkpoints with a user's function (:mod:`~cmdtool.evaluation.hook`):
``evaluate`` and its CI gate (:mod:`~cmdtool.evaluation.evaluate`), ``sweep``
(:mod:`~cmdtool.evaluation.sweep`)."""

from cmdtool.evaluation.evaluate import (
    EVAL_ATTR,
    GATE_EPOCHS,
    EvaluationResult,
    GateFailed,
    check_gate,
    evaluate,
    parse_gate,
)
from cmdtool.evaluation.hook import load_eval_function
from cmdtool.evaluation.sweep import SWEEP_ATTR, SweepResult, sweep

__all__ = [
    "EVAL_ATTR",
    "GATE_EPOCHS",
    "SWEEP_ATTR",
    "EvaluationResult",
    "GateFailed",
    "SweepResult",
    "check_gate",
    "evaluate",
    "load_eval_function",
    "parse_gate",
    "sweep",
]
