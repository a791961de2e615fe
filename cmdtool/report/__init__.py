"""``cmdtool report``: figures, ``report.json`` and one self-contained ``report.html``.

:mod:`cmdtool.report.data` computes the numbers (one streamed pass over ``weights``),
:mod:`cmdtool.report.figures` draws them (matplotlib, Agg), :mod:`cmdtool.report.html`
embeds them and :mod:`cmdtool.report.schema` documents ``report.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cmdtool.errors import StoreError
from cmdtool.report.data import ReportData, compute
from cmdtool.report.folder import check_out, replace_folder
from cmdtool.report.schema import SCHEMA, validate
from cmdtool.store import TrajectoryStore
from cmdtool.store.results import ResultPin

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
    """``<store parent>/report`` (``./report`` for a store at an object-store URL)."""
    from cmdtool.store.objects import is_url

    if is_url(str(store)):
        return Path.cwd() / REPORT_DIR
    return Path(store).resolve().parent / REPORT_DIR


def write_report(
    store: str | os.PathLike[str] | TrajectoryStore,
    out: str | os.PathLike[str] | None = None,
    *,
    name: str = "cmd",
    force: bool = False,
    pin: ResultPin | None = None,
) -> ReportSummary:
    """Write the report of decomposition ``name`` of ``store`` into the folder ``out``.

    The folder gets ``report.html`` (self-contained: figures embedded as data URIs),
    ``report.json`` (see :data:`SCHEMA`), each figure as a PNG file and a manifest of
    them (:mod:`cmdtool.report.folder`). It is built in a hidden sibling folder and
    renamed into place, so a failed report leaves the previous one as it was.

    Parameters
    ----------
    store : path or TrajectoryStore
    out : path, optional
        Default ``<store parent>/report``.
    name : str, default "cmd"
        The decomposition subgroup.
    force : bool, default False
        Replace a non-empty ``out``, which must hold only a previous report's files,
        unchanged (never a folder holding the store or anything else).
    pin : ResultPin, optional
        Report exactly this version of ``name`` (``CMD.pin_``); ResultChangedError, with
        nothing written, if it was replaced. Default: the current one, computed again if
        a writer republishes it meanwhile.

    Returns
    -------
    ReportSummary

    Raises
    ------
    DecompositionNotFoundError
        No decomposition ``name``: run ``cmdtool decompose`` first.
    UsageError
        ``out`` exists, is not empty and ``force`` is not given, or holds something a
        previous report did not write; ``out`` is inside the store or holds it.
    """
    st = store if isinstance(store, TrajectoryStore) else TrajectoryStore.open(store, mode="r")
    try:
        st.open_result(name)  # fails first, naming decompose, when there is none
        folder = Path(out) if out is not None else default_dir(st.path)
        check_out(folder, force, st.path)  # and removes what killed report runs left
        data = compute(st, name, pin=pin)
        problems = validate(data.summary)
        if problems:  # a bug, not bad input
            raise AssertionError(f"report.json does not match its schema: {problems[:3]}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            prefix = f".{folder.name}.partial-{os.getpid()}-"
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
        except OSError as exc:
            raise StoreError(f"cannot write report {folder}: {exc.strerror or exc}") from exc
        try:
            from cmdtool.report.figures import draw_all
            from cmdtool.report.html import render

            figures = draw_all(data, tmp)
            (tmp / JSON).write_text(json.dumps(data.summary, indent=2) + "\n")
            (tmp / HTML).write_text(render(data.summary, figures, tmp, str(st.path)))
            replace_folder(folder, tmp, force)  # deletes only a previous report's files
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
