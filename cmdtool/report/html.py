"""One self-contained ``report.html``: tables and PNGs embedded as base64 data URIs."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from typing import Any

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
        parts.append(
            f"<figure><h2>{escape(fig.title)}</h2>"
            f'<img src="{_data_uri(folder / fig.file)}" alt="{escape(fig.title)}">'
            f"<figcaption>{escape(fig.caption)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
