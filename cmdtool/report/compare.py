"""The report's "Compared with" section: the ``cmdtool_compare`` attribute that
``cmdtool compare`` stores on the decomposition group, drawn and tabulated.

- one figure with every method's relative error per epoch of the window (log scale);
- with an evaluation function, one figure per metric: its value per epoch for the
  stored checkpoints and each method's rebuilt ones (paper Fig. 5 style);
- the table: error, stored values, seconds and the metric's mean ± spread over the last
  epochs, per method.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

#: The attribute name (``cmdtool.baselines.COMPARE_ATTR``).
COMPARE_ATTR = "cmdtool_compare"
#: Figure files of this section start with it (the HTML places them in the section).
PREFIX = "compare_"


def _floats(values: Any) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values or []], dtype=np.float64)


def _label(entry: dict[str, Any]) -> str:
    rank = entry.get("rank")
    return str(entry.get("method")) if rank is None else f"{entry.get('method')} r={rank}"


def draw_errors(ax: Any, cmp: dict[str, Any]) -> None:
    """Every method's relative error per epoch on the matplotlib axes ``ax`` (log scale)."""
    epochs = cmp.get("epochs", [])
    for entry in cmp.get("methods", []):
        values = _floats(entry.get("epoch_errors"))
        if len(values) == len(epochs):
            style = {"color": "black", "linewidth": 2.2} if entry.get("method") == "cmd" else {}
            values[values <= 0] = np.nan  # exact (an average's first epoch): off a log axis
            ax.plot(epochs, values, marker=".", label=_label(entry), **style)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("relative error ||w - w_hat|| / ||w||")
    ax.legend(fontsize=7, ncol=2)


def draw_metric(ax: Any, cmp: dict[str, Any], metric: str) -> None:
    """``metric`` per epoch of the stored checkpoints and of each method's rebuilt ones."""
    epochs = cmp.get("epochs", [])
    raw = (cmp.get("raw_metric") or {}).get(metric) or {}
    values = _floats(raw.get("values"))
    if len(values) == len(epochs):
        ax.plot(epochs, values, color="0.5", linestyle="--", marker=".", label="stored (SGD)")
    for entry in cmp.get("methods", []):
        m = (entry.get("metric") or {}).get(metric) or {}
        values = _floats(m.get("values"))
        if len(values) == len(epochs):
            style = {"color": "black", "linewidth": 2.2} if entry.get("method") == "cmd" else {}
            ax.plot(epochs, values, marker=".", label=_label(entry), **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, ncol=2)


def _figure(plt: Any, draw: Callable[[Any], None]) -> Any:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    draw(ax)
    fig.tight_layout()
    return fig


Spec = tuple[str, str, str, Callable[[], Any]]


def figure_specs(plt: Any, cmp: dict[str, Any] | None) -> list[Spec]:
    """``(file, title, caption, draw)`` of this section's figures (none without a
    comparison)."""
    if not cmp:
        return []
    window = f"epochs {cmp['epochs'][0]}..{cmp['epochs'][-1]}" if cmp.get("epochs") else ""
    specs: list[Spec] = [
        (f"{PREFIX}errors.png", "Compared with: relative error per epoch",
         f"||w_t - w_hat_t|| / ||w_t|| of every method over the window ({window}); "
         "CMD in black; an exact epoch (error 0) is not drawn.",
         lambda: _figure(plt, lambda ax: draw_errors(ax, cmp))),
    ]  # fmt: skip
    def metric_figure(metric: str) -> Callable[[], Any]:
        return lambda: _figure(plt, lambda ax: draw_metric(ax, cmp, metric))

    for i, metric in enumerate(cmp.get("metrics") or []):
        specs.append(
            (f"{PREFIX}metric_{i}.png", f"Compared with: {metric} per method (paper Fig. 5)",
             f"{metric} of the stored checkpoints (dashed) and of each method's rebuilt "
             "checkpoints at every epoch of the window.", metric_figure(metric))
        )  # fmt: skip
    return specs


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "nan" if not isinstance(v, int | float) or v != v else format(v, spec)


def _table(cmp: dict[str, Any]) -> str:
    metrics = list(cmp.get("metrics") or [])
    last = min(int(cmp.get("last", 10)), len(cmp.get("epochs", [])))
    head = ["method", "rank", "rel. error", "stored values", "seconds"]
    head += [f"{m} (last {last}: mean ± spread)" for m in metrics]

    def pm(entry: dict[str, Any] | None) -> str:
        if not entry:
            return "-"
        return f"{_fmt(entry.get('last_mean'))} ± {_fmt(entry.get('last_spread'))}"

    rows: list[list[str]] = []
    if cmp.get("raw_metric") is not None:
        n_values = int(cmp.get("n_params", 0)) * len(cmp.get("epochs", []))
        rows.append(["stored (raw)", "", "", f"{n_values:,}", ""]
                    + [pm(cmp["raw_metric"].get(m)) for m in metrics])  # fmt: skip
    for e in cmp.get("methods", []):
        rows.append(
            [str(e.get("method")), "" if e.get("rank") is None else str(e.get("rank")),
             _fmt(e.get("relative_error"), ".5f"), f"{int(e.get('stored_values', 0)):,}",
             _fmt(e.get("seconds"), ".2f")]
            + [pm((e.get("metric") or {}).get(m)) for m in metrics]
        )  # fmt: skip
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    left = ' class="l"'
    body = "".join(
        "<tr>"
        + "".join(f"<td{left if i == 0 else ''}>{escape(v)}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def section_html(cmp: dict[str, Any] | None, figures: list[Any], folder: Path) -> str:
    """The HTML of the section (empty without a comparison).

    Parameters
    ----------
    cmp : dict or None
        The stored ``cmdtool_compare`` attribute.
    figures : list of Figure
        All the report's figures; those of this section (file name starting with
        :data:`PREFIX`) are embedded here.
    folder : Path
        Where the PNG files are.
    """
    if not cmp:
        return ""
    epochs = cmp.get("epochs") or [0]
    parts = [
        '<section id="compared-with"><h2>Compared with</h2>',
        f"<p>{escape(str(len(cmp.get('methods', []))))} models fitted by "
        f"<code>cmdtool compare</code> on the window of epochs {epochs[0]}..{epochs[-1]} "
        f"(stride {escape(str(cmp.get('stride')))}; EMA decay "
        f"{escape(str(cmp.get('ema_decay')))}, SWA over {escape(str(cmp.get('swa_epochs')))} "
        "epochs).</p>",
        _table(cmp),
    ]
    for fig in figures:
        if not fig.file.startswith(PREFIX):
            continue
        data = base64.b64encode((folder / fig.file).read_bytes()).decode("ascii")
        parts.append(
            f"<figure><h3>{escape(fig.title)}</h3>"
            f'<img src="data:image/png;base64,{data}" alt="{escape(fig.title)}">'
            f"<figcaption>{escape(fig.caption)}</figcaption></figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)
