"""``compare``: CMD against the models users would pick instead, on the same window.

PCA (the trajectory subspace of P-BFGS / DLDR), exact DMD, EMA and SWA are fitted on the
window ``[A, B)`` (stride S) of a store and scored like CMD: the relative reconstruction
error over the window, per epoch, the number of values each model stores, seconds and,
with an evaluation function, the metric of every rebuilt checkpoint. Everything is
streamed over column blocks (``docs/design.md``, "Baselines (compare)"):

1. one pass for the T' x T' Gram matrices (PCA, DMD; :mod:`~cmdtool.baselines.gram`);
2. small T' x T' solves (:mod:`~cmdtool.baselines.pca`, :mod:`~cmdtool.baselines.dmd`,
   :mod:`~cmdtool.baselines.averages`);
3. one pass for every method's per-epoch error (:mod:`~cmdtool.baselines.passes`);
4. with ``eval`` or ``write``: each model's checkpoints, one epoch at a time
   (:mod:`~cmdtool.baselines.rebuild`).

The result is stored as the JSON attribute ``cmdtool_compare`` of the decomposition
group (the report's "Compared with" section reads it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmdtool.backends import Backend, check_request, open_backend
from cmdtool.baselines.averages import ema_model, swa_model
from cmdtool.baselines.dmd import dmd_model
from cmdtool.baselines.gram import GramTask, window_gram
from cmdtool.baselines.linear import LinearModel
from cmdtool.baselines.passes import ErrorPart, ErrorTask
from cmdtool.baselines.pca import pca_model
from cmdtool.baselines.rebuild import rebuilt_states, save
from cmdtool.baselines.settings import DEFAULT_EMA_DECAY, METHODS, check_settings
from cmdtool.decomposition import CMD
from cmdtool.errors import EvaluationError, StoreError
from cmdtool.reconstruction import raw_state
from cmdtool.store import TrajectoryStore

COMPARE_ATTR = "cmdtool_compare"
#: Epochs at the end of the window over which the metric's mean and spread are given.
LAST = 10

EvalFn = Callable[[dict[str, torch.Tensor]], Mapping[str, Any]]
Progress = Callable[[int, int, str], None]


def _json_float(v: float) -> float | None:
    return None if not math.isfinite(v) else float(v)


@dataclass
class MethodResult:
    """One method (and rank) of a comparison.

    Attributes
    ----------
    method : str
    rank : int or None
        d (PCA) or r (DMD); None for cmd, ema, swa.
    relative_error : float
        ``||X - X_hat||_F / ||X||_F`` over the window.
    epoch_errors : list of float
        ``||x_t - x_hat_t|| / ||x_t||`` per window epoch.
    stored_values : int
        Values the model needs (CMD ``2N + M T'``, PCA ``N d + d T' + N``, DMD
        ``N r + 2 r``, EMA/SWA ``N`` per epoch, ``N T'`` for the window).
    seconds : float
    metric : dict or None
        Per metric: ``values`` (one per window epoch), ``last_mean`` and ``last_spread``
        (mean and standard deviation over the last :data:`LAST` epochs, NaN ignored).
    effective_rank : int or None
        Components kept (fewer than ``rank`` when the window has fewer non-negligible
        singular values).
    """

    method: str
    rank: int | None
    relative_error: float
    epoch_errors: list[float]
    stored_values: int
    seconds: float
    metric: dict[str, dict[str, Any]] | None = None
    effective_rank: int | None = None

    @property
    def key(self) -> str:
        return self.method if self.rank is None else f"{self.method}-{self.rank}"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "rank": self.rank,
            "relative_error": self.relative_error,
            "epoch_errors": list(self.epoch_errors),
            "stored_values": self.stored_values,
            "seconds": self.seconds,
            "metric": self.metric,
            "effective_rank": self.effective_rank,
        }


@dataclass
class CompareResult:
    """What :func:`compare` measured; ``to_json()`` is the ``--json`` output and the
    stored ``cmdtool_compare`` attribute."""

    name: str
    window: str
    stride: int
    epochs: list[int]
    rows: list[int]
    n_params: int
    methods: list[MethodResult]
    ema_decay: float
    swa_epochs: int
    metrics: list[str] = field(default_factory=list)
    raw_metric: dict[str, dict[str, Any]] | None = None
    function: str | None = None
    cmd: dict[str, Any] | None = None
    nonfinite_columns: int = 0
    stored: bool = False
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "methods": [m.to_json() for m in self.methods],
            "decomposition": self.name,
            "window": self.window,
            "stride": self.stride,
            "epochs": list(self.epochs),
            "rows": list(self.rows),
            "n_params": self.n_params,
            "ema_decay": self.ema_decay,
            "swa_epochs": self.swa_epochs,
            "metrics": list(self.metrics),
            "raw_metric": self.raw_metric,
            "function": self.function,
            "cmd": self.cmd,
            "nonfinite_columns": self.nonfinite_columns,
            "last": LAST,
            "seconds": self.seconds,
            "created": self.created,
        }


# -------------------------------------------------------------------- metrics
def _last_stats(values: list[float]) -> tuple[float, float]:
    tail = np.asarray(values[-LAST:], dtype=np.float64)
    tail = tail[np.isfinite(tail)]
    if tail.size == 0:
        return math.nan, math.nan
    return float(tail.mean()), float(tail.std())


def _metric_json(values: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for k, vals in values.items():
        mean, spread = _last_stats(vals)
        out[k] = {
            "values": [_json_float(v) for v in vals],
            "last_mean": _json_float(mean),
            "last_spread": _json_float(spread),
        }
    return out


def _as_metrics(got: Any, what: str, label: int, kind: str) -> dict[str, float]:
    """The function's return value as metric -> float, or an EvaluationError."""
    if not isinstance(got, Mapping) or not got:
        raise EvaluationError(
            f"--eval {what} returned {type(got).__name__} on the {kind} checkpoint of epoch "
            f"{label}; it must return a non-empty dict of metric name to float"
        )
    out: dict[str, float] = {}
    for key, value in got.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(
            key, str
        ):
            raise EvaluationError(
                f"--eval {what}: metric {key!r} is {value!r} on the {kind} checkpoint of epoch "
                f"{label}; metrics must be numbers"
            )
        out[key] = float(value)
    return out


class _Evaluator:
    """Calls the user's function and checks that every call returns the same metrics."""

    def __init__(self, fn: EvalFn, what: str) -> None:
        self.fn, self.what = fn, what
        self.metrics: list[str] = []

    def __call__(self, state: dict[str, torch.Tensor], label: int, kind: str) -> dict[str, float]:
        try:
            got = self.fn(state)
        except (Exception, SystemExit) as exc:  # sys.exit() in it must not end cmdtool
            raise EvaluationError(
                f"--eval {self.what} raised on the {kind} checkpoint of epoch {label}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        out = _as_metrics(got, self.what, label, kind)
        if not self.metrics:
            self.metrics = list(out)
        elif set(out) != set(self.metrics):
            odd = sorted(set(out) ^ set(self.metrics))[0]
            raise EvaluationError(
                f"--eval {self.what}: metric {odd!r} is returned on some checkpoints but not "
                f"on the {kind} checkpoint of epoch {label}"
            )
        return out


# --------------------------------------------------------------------- compare
def compare(
    store: TrajectoryStore | str | os.PathLike[str],
    *,
    methods: str | Sequence[str] = METHODS,
    ranks: str | Sequence[int] | None = None,
    epochs: str | None = None,
    stride: int | None = None,
    eval: EvalFn | None = None,
    name: str = "cmd",
    write: str | os.PathLike[str] | None = None,
    cluster: str | None = None,
    ema_decay: float = DEFAULT_EMA_DECAY,
    swa_epochs: int | None = None,
    progress: Progress | None = None,
) -> CompareResult:
    """Compare CMD with PCA, exact DMD, EMA and SWA on one window of ``store``.

    Parameters
    ----------
    store : TrajectoryStore or path
    methods : str or sequence of str
        Any of ``cmd``, ``pca``, ``dmd``, ``ema``, ``swa`` (comma-separated or a list).
    ranks : str or sequence of int, optional
        d of PCA and r of DMD, each ``1 <= rank < T'``. Default: those of 1, 2, 5, 10
        below T'.
    epochs : str, optional
        The window ``A:B`` (labels, half-open). Default: the decomposition's window when
        it exists, else every epoch.
    stride : int, optional
        Every S-th epoch of the window (default: the decomposition's, else 1).
    eval : callable, optional
        ``fn(state_dict) -> {metric: number}``, called on every rebuilt checkpoint of
        every method (and on the stored ones) at every window epoch. The CLI loads it
        from ``MODULE:FUNCTION`` (:func:`cmdtool.evaluation.load_eval_function`).
    name : str
        The decomposition compared (``cmd``): fitted with the default settings on the
        window when the store has none; its group receives the result.
    write : path, optional
        Write each method's rebuilt checkpoints as
        ``WRITE/<method>[-<rank>]/epoch_<label>.safetensors``.
    cluster : str, optional
        Run the streamed passes as Dask tasks (see :mod:`cmdtool.backends.dask`).
    ema_decay : float
        beta of the EMA, ``0 < beta < 1``.
    swa_epochs : int, optional
        k of SWA, ``1 <= k <= T'`` (default ``min(10, max(1, T' // 4))``).
    progress : callable, optional
        ``progress(done, total, what)``.

    Returns
    -------
    CompareResult

    Raises
    ------
    UsageError
        A bad method, rank, decay, SWA length, window (fewer than 3 epochs) or output
        folder: nothing is written then.
    EvaluationError
        The function raises or returns something other than a dict of numbers.
    """
    t_start = time.perf_counter()
    cfg = check_settings(
        store, methods=methods, ranks=ranks, epochs=epochs, stride=stride, name=name,
        write=write, ema_decay=ema_decay, swa_epochs=swa_epochs,
    )  # fmt: skip
    check_request(store, cluster, "auto")
    path, meths, rows, win, stp = cfg.path, cfg.methods, cfg.rows, cfg.window, cfg.stride
    out_dir = Path(write) if write is not None else None
    what = None if eval is None else f"{getattr(eval, '__module__', '?')}:" + str(
        getattr(eval, "__qualname__", repr(eval))
    )
    evaluator = None if eval is None else _Evaluator(eval, what or "?")
    if evaluator is not None:  # a broken function fails before anything is written
        with TrajectoryStore.open(path) as st:
            first = st.labels[int(rows[0])]
            evaluator(raw_state(st, first), first, "stored")

    with TrajectoryStore.open(path, mode="r+") as st:
        fitted_here = False
        if "cmd" in meths and name not in st.result_names():
            CMD(epochs=win, stride=stp).fit(st, name=name)
            fitted_here = True
        model = CMD.load(st, name) if name in st.result_names() else None
        with open_backend(cluster) as backend:
            result = _run(
                st, backend, rows, meths, cfg.ranks, cfg.ema_decay, cfg.swa_epochs, model,
                evaluator, out_dir, progress,
            )  # fmt: skip
        result.window = win or ":"
        result.stride = stp
        result.function = what
        if model is not None:
            result.cmd = {
                "window": model.summary_.get("window"),
                "stride": model.summary_.get("stride"),
                "epochs": model.summary_.get("epochs"),
                "n_modes": model.n_modes_,
                "fitted_by_compare": fitted_here,
            }
        result.seconds = time.perf_counter() - t_start
        if model is not None:
            st.set_result_attr(name, COMPARE_ATTR, result.to_json(), expect=model.pin_)
            result.stored = True
    return result


def _run(
    st: TrajectoryStore,
    backend: Backend,
    rows: np.ndarray,
    meths: list[str],
    ranks: list[int],
    ema_decay: float,
    k_swa: int,
    model: CMD | None,
    evaluator: _Evaluator | None,
    out_dir: Path | None,
    progress: Progress | None,
) -> CompareResult:
    """The passes, on an open (writable) store, once the settings are known to be good."""
    n, t = st.n_params, int(rows.size)
    store_path = str(st.path.resolve())
    blocks = list(st.column_blocks())

    def stage(label: str) -> Callable[[int, int, object], None] | None:
        if progress is None:
            return None
        return lambda done, total, _r: progress(done, total, label)

    # ---- pass 1 and the small solves
    linear: dict[str, list[LinearModel]] = {}
    nonfinite = 0
    if "pca" in meths or "dmd" in meths:
        t0 = time.perf_counter()
        gram = window_gram(backend.map, GramTask(store_path, rows, _st=st), blocks, stage("gram"))
        t_gram = time.perf_counter() - t0
        nonfinite = gram.nonfinite
        g = gram.uncentred()
        for meth, build, mat in (("pca", pca_model, gram.centred), ("dmd", dmd_model, g)):
            if meth in meths:
                linear[meth] = []
                for r in ranks:
                    t1 = time.perf_counter()
                    lm = build(mat, r, n)
                    lm.seconds = t_gram + time.perf_counter() - t1
                    linear[meth].append(lm)
    if "ema" in meths:
        linear["ema"] = [ema_model(t, ema_decay, n)]
        linear["ema"][0].extra["beta"] = ema_decay
    if "swa" in meths:
        linear["swa"] = [swa_model(t, k_swa, n)]
        linear["swa"][0].extra["k"] = k_swa

    # ---- pass 2: every method's error per epoch
    entries: list[LinearModel | CMD] = []
    for meth in meths:
        if meth == "cmd":
            assert model is not None
            entries.append(model)
        else:
            entries.extend(linear[meth])
    ref_values = None
    if model is not None and "cmd" in meths:
        ref_values = st.read_columns(rows, model.ref_index_).astype(np.float64)
    task = ErrorTask(
        store_path,
        rows,
        _st=st,
        operators=[None if isinstance(e, CMD) else e.residual_operator() for e in entries],
        ref_values=ref_values,
        name=None if model is None else model.name_,
        generation=None if model is None else model.pin_.generation,
        _model=model,
    )
    parts: list[ErrorPart] = backend.map(
        task, blocks, lambda s: f"columns {s[0]}:{s[1]}", stage("errors")
    )
    total = ErrorPart(np.zeros((len(entries), t)), np.zeros(t), np.zeros(len(entries)), 0)
    for p in parts:
        total.add(p)
    sq = total.sq
    all_sq = float(sq.sum())
    results: list[MethodResult] = []
    for i, e in enumerate(entries):
        err2 = total.err2[i]
        per_epoch = np.sqrt(np.divide(err2, sq, out=np.zeros(t), where=sq > 0))
        rel = float(np.sqrt(err2.sum() / all_sq)) if all_sq > 0 else 0.0
        if isinstance(e, CMD):
            results.append(
                MethodResult(
                    "cmd", None, rel, [float(x) for x in per_epoch],
                    2 * n + e.n_modes_ * t, e.seconds_ + float(total.seconds[i]),
                    effective_rank=e.n_modes_,
                )
            )  # fmt: skip
        else:
            results.append(
                MethodResult(
                    e.method, e.rank, rel, [float(x) for x in per_epoch], e.stored_values,
                    e.seconds + float(total.seconds[i]), effective_rank=e.effective_rank,
                )
            )  # fmt: skip

    result = CompareResult(
        name="" if model is None else model.name_,
        window=":",
        stride=1,
        epochs=[st.labels[int(r)] for r in rows],
        rows=[int(r) for r in rows],
        n_params=n,
        methods=results,
        ema_decay=ema_decay,
        swa_epochs=k_swa,
        nonfinite_columns=max(nonfinite, total.nonfinite),
    )
    if evaluator is None and out_dir is None:
        return result

    # ---- rebuilt checkpoints: evaluated and/or written, one epoch at a time
    done, total_states = 0, len(entries) * t
    if evaluator is not None:
        raw: dict[str, list[float]] = {}
        for row in rows:
            label = st.labels[int(row)]
            got = evaluator(raw_state(st, label), label, "stored")
            for k in evaluator.metrics:
                raw.setdefault(k, []).append(got[k])
        result.raw_metric = _metric_json(raw)
        result.metrics = list(evaluator.metrics)
    for e, res in zip(entries, results, strict=True):
        folder = None
        if out_dir is not None:
            folder = out_dir / res.key
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create {folder}: {exc.strerror or exc}") from exc
        values: dict[str, list[float]] = {}
        for row, state in rebuilt_states(st, rows, e, backend.map, store_path):
            label = st.labels[row]
            if folder is not None:
                target = folder / f"epoch_{label}.safetensors"
                save(state, target)
                result.written.append(str(target))
            if evaluator is not None:
                got = evaluator(state, label, res.key)
                for k in evaluator.metrics:
                    values.setdefault(k, []).append(got[k])
            done += 1
            if progress is not None:
                progress(done, total_states, f"{res.key} epoch {label}")
        if evaluator is not None:
            res.metric = _metric_json(values)
    return result
