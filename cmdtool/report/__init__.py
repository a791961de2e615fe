"""``cmdtool report``: figures, ``report.json`` and one self-contained ``report.html``.

:mod:`cmdtool.report.data` computes the numbers (one streamed pass over ``weights``),
:mod:`cmdtool.report.figures` draws them (matplotlib, Agg), :mod:`cmdtool.report.html`
embeds them and :mod:`cmdtool.report.schema` documents ``report.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cmdtool.errors import StoreError, UsageError
from cmdtool.report.data import ReportData, compute
from cmdtool.report.schema import SCHEMA, validate
from cmdtool.store import TrajectoryStore

__all__ = ["SCHEMA", "ReportData", "ReportSummary", "compute", "validate", "write_report"]

REPORT_DIR = "report"
HTML = "report.html"
JSON = "report.json"


@dataclass
class ReportSummary:
    """What :func:`write_report` wrote."""

    out: str
    html: str
    json: str
    figures: list[str]
    relative_error: float
    compression_ratio: float
    n_modes: int


def default_dir(store: str | os.PathLike[str]) -> Path:
    """``<store parent>/report``."""
    return Path(store).resolve().parent / REPORT_DIR


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"report folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(
                f"report folder {out} exists and is not empty; pass --force to replace it"
            )
        if not (out / JSON).is_file():
            raise UsageError(
                f"report folder {out} is not empty and holds no {JSON}: --force replaces "
                "only a previous report; pick another --out"
            )


def write_report(
    store: str | os.PathLike[str] | TrajectoryStore,
    out: str | os.PathLike[str] | None = None,
    *,
    name: str = "cmd",
    force: bool = False,
) -> ReportSummary:
    """Write the report of decomposition ``name`` of ``store`` into the folder ``out``.

    The folder gets ``report.html`` (self-contained: figures embedded as data URIs),
    ``report.json`` (see :data:`SCHEMA`) and each figure as a PNG file. It is built in a
    hidden sibling folder and renamed into place, so a failed report leaves the previous
    one as it was.

    Parameters
    ----------
    store : path or TrajectoryStore
    out : path, optional
        Default ``<store parent>/report``.
    name : str, default "cmd"
        The decomposition subgroup.
    force : bool, default False
        Replace a non-empty ``out`` (which must hold a previous report).

    Returns
    -------
    ReportSummary

    Raises
    ------
    DecompositionNotFoundError
        No decomposition ``name``: run ``cmdtool decompose`` first.
    UsageError
        ``out`` exists, is not empty and ``force`` is not given.
    """
    st = store if isinstance(store, TrajectoryStore) else TrajectoryStore.open(store, mode="r")
    try:
        st.open_result(name)  # fails first, naming decompose, when there is none
        folder = Path(out) if out is not None else default_dir(st.path)
        _check_out(folder, force)
        data = compute(st, name)
        problems = validate(data.summary)
        if problems:  # a bug, not bad input
            raise AssertionError(f"report.json does not match its schema: {problems[:3]}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            from cmdtool.report.figures import draw_all
            from cmdtool.report.html import render

            figures = draw_all(data, tmp)
            (tmp / JSON).write_text(json.dumps(data.summary, indent=2) + "\n")
            (tmp / HTML).write_text(render(data.summary, figures, tmp, str(st.path)))
            if folder.exists():
                old = folder.parent / f".{folder.name}.old-{os.getpid()}"
                os.replace(folder, old)
                os.replace(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, folder)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot write report {folder}: {exc.strerror or exc}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if st is not store:
            st.close()
    return ReportSummary(
        out=str(folder),
        html=str(folder / HTML),
        json=str(folder / JSON),
        figures=[str(folder / f.file) for f in figures],
        relative_error=float(data.summary["relative_error"]["overall"]),
        compression_ratio=float(data.summary["compression"]["ratio"]),
        n_modes=int(data.summary["n_modes"]),
    )
