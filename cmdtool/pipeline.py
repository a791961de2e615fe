"""``cmdtool run``: ingest, decompose, rebuild the last epoch and report in one go."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmdtool.decomposition import CMD
from cmdtool.ingestion import IngestSummary, ingest
from cmdtool.reconstruction import ReconstructSummary, reconstruct
from cmdtool.report import REPORT_DIR, ReportSummary, write_report

STORE_NAME = "store.zarr"
REBUILT_NAME = "reconstructed"
DEFAULT_SAMPLES = 1000


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
) -> RunResult:
    """Ingest ``source`` into ``out/store.zarr`` (appending to an existing one), decompose
    with the defaults (10 modes, K = min(1000, N)) and write the last epoch rebuilt from the
    model to ``out/reconstructed/`` and the report to ``out/report/`` (replacing the one a
    previous run wrote)."""
    out_dir = Path(out)
    store = out_dir / STORE_NAME
    summary = ingest(source, store, progress=progress)
    k = min(DEFAULT_SAMPLES, summary.n_params)
    model = CMD(10, n_samples=k).fit(
        store, progress=(lambda d, t: progress(d, t, "decompose")) if progress else None
    )
    rebuilt = reconstruct(model.store_, out_dir / REBUILT_NAME, epochs="last")
    report = write_report(model.store_, out_dir / REPORT_DIR, force=True)
    return RunResult(ingest=summary, model=model, reconstruct=rebuilt, report=report)
