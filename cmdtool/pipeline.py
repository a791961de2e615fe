"""``cmdtool run``: ingest, decompose, rebuild the last epoch and report in one go."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmdtool.decomposition import CMD
from cmdtool.errors import UsageError
from cmdtool.ingestion import IngestSummary, ingest
from cmdtool.reconstruction import ReconstructSummary, reconstruct
from cmdtool.report import REPORT_DIR, ReportSummary, write_report

STORE_NAME = "store.zarr"
REBUILT_NAME = "reconstructed"
DEFAULT_SAMPLES = 1000
DEFAULT_MODES = 10


@dataclass
class RunResult:
    ingest: IngestSummary
    model: CMD
    reconstruct: ReconstructSummary
    report: ReportSummary


def run_all(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    progress: Callable[..., None] | None = None,
    modes: int | None = None,
    threshold: float | None = None,
    samples: int | None = None,
    epochs: str | None = None,
    stride: int = 1,
    seed: int = 0,
    device: str = "auto",
    stats: str | None = None,
    cluster: str | None = None,
) -> RunResult:
    """Ingest ``source`` into ``out/store.zarr`` (appending to an existing one), decompose
    and write the last epoch rebuilt from the model to ``out/reconstructed/`` and the report
    to ``out/report/`` (replacing the one a previous run wrote).

    The decomposition options are those of :class:`~cmdtool.decomposition.CMD` (and of
    ``cmdtool decompose``): ``modes`` (10 when neither it nor ``threshold`` is given),
    ``threshold``, ``samples`` (K; min(1000, N) when not given), ``epochs`` (window
    ``A:B``), ``stride``, ``seed``, ``device``, ``stats`` and ``cluster``.
    """
    if modes is not None and threshold is not None:
        raise UsageError("give --modes or --threshold, not both")
    out_dir = Path(out)
    store = out_dir / STORE_NAME
    summary = ingest(source, store, progress=progress)
    k = min(DEFAULT_SAMPLES, summary.n_params) if samples is None else samples
    model = CMD(
        None if threshold is not None else (DEFAULT_MODES if modes is None else modes),
        threshold=threshold,
        n_samples=k,
        epochs=epochs,
        stride=stride,
        seed=seed,
        device=device,
        cluster=cluster,
        stats=stats,
    ).fit(store, progress=(lambda d, t: progress(d, t, "decompose")) if progress else None)
    rebuilt = reconstruct(model.store_, out_dir / REBUILT_NAME, epochs="last")
    report = write_report(model.store_, out_dir / REPORT_DIR, force=True)
    return RunResult(ingest=summary, model=model, reconstruct=rebuilt, report=report)
