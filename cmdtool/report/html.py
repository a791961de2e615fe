"""One self-contained ``report.html``: tables and PNGs embedded as base64 data URIs."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

from cmdtool.report.compare import PREFIX as COMPARE_PREFIX
from cmdtool.report.compare import section_html as compare_section
from cmdtool.report.figures import Figure

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
td.l, th.l { text-align: left; }
figure { margin: 2em 0; }
img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _table(header: list[str], rows: list[list[Any]], left: int = 0) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{escape(str(v))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _constant_text(summary: dict[str, Any], n: int) -> str:
    c = int(summary.get("constant", 0))
    return f"{c:,} ({c / n:.1%}): modelled exactly (a = 0, b = the value), in no mode"


def _stats_text(summary: dict[str, Any]) -> str:
    names = list(summary.get("stats_tensors") or [])
    if not names:
        return "none recognised"
    shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
    return f"{len(names)} tensor(s) ({shown}), rebuilt '{summary.get('stats', 'model')}'"


def _high_error_text(summary: dict[str, Any]) -> str:
    """A paragraph naming the epochs whose rebuilt error exceeds 1, why, and what to do."""
    high = summary.get("high_error_epochs") or []
    if not high:
        return ""
    shown = ", ".join(f"{h['epoch']} ({h['relative_error']:.2f})" for h in high[:12])
    more = f" and {len(high) - 12} more" if len(high) > 12 else ""
    win = summary["settings"].get("epochs") or summary["epochs"]
    return (
        f"<p><b>Epochs rebuilt with a relative error above 1:</b> {escape(shown + more)}. "
        "At these epochs the CMD checkpoint is further from the stored one than the stored "
        "weights are from zero: the affine model fitted over the window "
        f"(epochs {win[0]}..{win[-1]}) does not describe them, typically the first epochs, "
        "where the weights still move fast and non-linearly. Do not use those rebuilt "
        "checkpoints; to model them, decompose a window that starts later "
        "(<code>cmdtool decompose STORE --epochs A:</code>) or fit them separately with "
        "<code>--epochs A:B</code>.</p>"
    )


def render(summary: dict[str, Any], figures: list[Figure], folder: Path, store: str) -> str:
    """The HTML text of the report.

    Parameters
    ----------
    summary : dict
        The content of ``report.json``.
    figures : list of Figure
        Figures already written as PNG files in ``folder``.
    folder : Path
    store : str
        The store's path, for the title.

    Returns
    -------
    str
    """
    s = summary["settings"]
    err = summary["relative_error"]
    comp = summary["compression"]
    n = max(summary["n_params"], 1)
    settings_rows = [
        ["store", store],
        ["decomposition", summary["decomposition"]],
        ["parameters N", f"{summary['n_params']:,}"],
        ["epochs T (all ingested)", summary["n_epochs"]],
        ["window", f"{s.get('window')} stride {s.get('stride')} ({len(s['rows'])} epochs)"],
        ["modes M (requested)", f"{summary['n_modes']} ({s.get('requested_modes')})"],
        ["threshold", s.get("threshold")],
        ["samples K, seed", f"{s['samples']}, {s['seed']}"],
        ["constant parameters", _constant_text(summary, n)],
        ["normalization statistics", _stats_text(summary)],
        ["relative error, window (fit)", f"{s['relative_error']:.5f}"],
        ["relative error, all epochs", f"{err['overall']:.5f}"],
        ["compression", f"{comp['ratio']:.1f}x ({comp['stored_values']:,} values vs "
         f"{comp['model_values']:,} = 2N + M*T)"],
        ["device, seconds", f"{s.get('device')}, {float(s.get('seconds', 0)):.2f}"],
        ["created", s.get("created")],
    ]  # fmt: skip
    mode_rows = [
        [
            k,
            f"{summary['mode_sizes'][k]:,}",
            f"{summary['mode_sizes'][k] / n:.1%}",
            f"{err['per_mode_window'][k]:.5f}",
            f"{err['per_mode'][k]:.5f}",
        ]
        for k in range(summary["n_modes"])
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>cmdtool report: {escape(store)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>CMD report: {escape(store)}</h1>",
        "<h2>Settings</h2>",
        _table(["", ""], settings_rows, left=2),
        "<h2>Modes</h2>",
        _table(["mode", "parameters", "share", "rel. error (window)", "rel. error (all)"],
               mode_rows),
    ]  # fmt: skip
    for fig in figures:
        if fig.file.startswith(COMPARE_PREFIX):
            continue  # shown in the "Compared with" section
        parts.append(
            f"<figure><h2>{escape(fig.title)}</h2>"
            f'<img src="{_data_uri(folder / fig.file)}" alt="{escape(fig.title)}">'
            f"<figcaption>{escape(fig.caption)}</figcaption></figure>"
        )
    parts.append(compare_section(summary.get("compare"), figures, folder))
    parts.insert(parts.index("<h2>Modes</h2>"), _high_error_text(summary))
    parts.append("</body></html>")
    return "\n".join(parts)
