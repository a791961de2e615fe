"""The report's figures, drawn with matplotlib (Agg) into PNG files.

matplotlib is imported inside :func:`draw_all`, so importing :mod:`cmdtool.report` stays
cheap. Each figure follows one in the paper (Figs. 1-7 of "The Underlying Correlated
Dynamics in Neural Training").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmdtool.report.data import MEMBERS_SHOWN, ReportData, epoch_positions

#: At most this many tensors (the largest) in the per-tensor figures.
MAX_TENSORS = 30
#: At most this many modes get their own panel.
MAX_PANELS = 12
DPI = 100
#: Text properties for user strings (tensor and metric names): never mathtext, so a name
#: such as ``$\frac{a$`` is drawn as written instead of failing to parse.
PLAIN = {"parse_math": False, "usetex": False}


@dataclass(frozen=True)
class Figure:
    """One written figure: ``file`` (a PNG in the report folder), a title and a caption."""

    file: str
    title: str
    caption: str


def _epoch_label(offset: int) -> str:
    return "epoch" if offset == 0 else f"epoch - {offset}"


def _grid(plt: Any, count: int, ncols: int = 4, size: tuple[float, float] = (3.2, 2.4)) -> Any:
    ncols = max(1, min(ncols, count))
    nrows = -(-count // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False
    )
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes.flat


def _corr(plt: Any, d: ReportData) -> Any:
    order = np.argsort(d.sample_modes, kind="stable")
    c = d.corr[np.ix_(order, order)]
    modes = d.sample_modes[order]
    fig, ax = plt.subplots(figsize=(7, 6.2))
    im = ax.imshow(c, vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="|corr|")
    edges = np.flatnonzero(np.diff(modes)) + 1
    for e in edges:
        ax.axhline(e - 0.5, color="red", ls="--", lw=1)
        ax.axvline(e - 0.5, color="red", ls="--", lw=1)
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(modes)]])
    ticks = (starts + stops - 1) / 2
    ax.set_xticks(ticks, [str(modes[s]) for s in starts])
    ax.set_yticks(ticks, [str(modes[s]) for s in starts])
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("mode (sampled parameters, grouped)")
    ax.set_ylabel("mode (sampled parameters, grouped)")
    ax.set_title(f"|corr| of the {len(modes)} sampled parameters, ordered by mode", pad=30)
    return fig


def _references(plt: Any, d: ReportData) -> Any:
    m = min(d.n_modes, MAX_PANELS)
    fig, axes = _grid(plt, m)
    win = d.epochs[d.window_rows]
    for k, ax in zip(range(m), axes, strict=False):
        ax.plot(d.epochs, d.ref_all[k], color="tab:red", lw=1.2)
        ax.axvspan(win.min(), win.max(), color="0.9", zorder=0)
        ax.set_title(f"mode {k} reference: {_ref_name(d, k)}", fontsize=8, **PLAIN)
        ax.set_xlabel(_epoch_label(d.epoch_offset), fontsize=8)
        ax.set_ylabel("value", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _members(plt: Any, d: ReportData) -> Any:
    m = min(d.n_modes, MAX_PANELS)
    fig, axes = _grid(plt, m * MEMBERS_SHOWN, ncols=MEMBERS_SHOWN, size=(3.4, 2.2))
    panels = list(axes)
    for k in range(m):
        members = np.flatnonzero(d.sample_modes == k)[:MEMBERS_SHOWN]
        for j in range(MEMBERS_SHOWN):
            ax = panels[k * MEMBERS_SHOWN + j]
            if j >= len(members):
                ax.set_visible(False)
                continue
            i = members[j]
            ax.plot(d.epochs, d.samples_all[i], color="black", lw=1.2, label="stored")
            rec = d.sample_a[i] * d.ref_all[k] + d.sample_b[i]
            ax.plot(d.epochs, rec, color="tab:orange", ls="--", lw=1.2, label="CMD")
            ax.set_title(
                f"mode {k}: {_sample_name(d, i)} vs {_ref_name(d, k)}", fontsize=7, **PLAIN
            )
            ax.set_xlabel(_epoch_label(d.epoch_offset), fontsize=8)
            ax.set_ylabel("value", fontsize=8)
            ax.tick_params(labelsize=7)
            if k == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _zscore(x: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    sd = x.std(axis=-1, keepdims=True)
    return np.divide(x - mu, sd, out=np.zeros_like(x), where=sd > 0)


def _bands(plt: Any, d: ReportData) -> Any:
    m = min(d.n_modes, MAX_PANELS)
    fig, axes = _grid(plt, m)
    for k, ax in zip(range(m), axes, strict=False):
        ref = _zscore(d.ref_all[k])
        members = _zscore(d.samples_all[d.sample_modes == k])
        if len(members):
            sign = np.sign(members @ ref)
            members = members * np.where(sign == 0, 1.0, sign)[:, None]
            lo, hi = np.percentile(members, [2.5, 97.5], axis=0)
            ax.fill_between(d.epochs, lo, hi, color="tab:blue", alpha=0.3, label="95%")
        ax.plot(d.epochs, ref, color="tab:red", lw=1, label="reference")
        ax.set_title(
            f"mode {k} ({len(members)} samples), ref. {_ref_name(d, k)}", fontsize=7, **PLAIN
        )
        ax.set_xlabel(_epoch_label(d.epoch_offset), fontsize=8)
        ax.set_ylabel("normalised value", fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``layer.2`` before ``layer.10`` (network order, for names that
    number their layers)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _largest(d: ReportData) -> np.ndarray:
    """Indices of the (at most MAX_TENSORS) largest tensors, in network order (names
    sorted naturally)."""
    keep = np.argsort(-d.tensor_sizes, kind="stable")[:MAX_TENSORS]
    return np.array(sorted(keep, key=lambda i: natural_key(d.tensor_names[i])), dtype=np.int64)


def _ref_name(d: ReportData, k: int) -> str:
    refs = d.summary.get("references") or []
    return str(refs[k]["name"]) if k < len(refs) else f"mode {k}"


def _sample_name(d: ReportData, i: int) -> str:
    names = d.sample_names
    return names[i] if i < len(names) else f"sample {i}"


def _shares(plt: Any, d: ReportData) -> Any:
    idx = _largest(d)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(idx) + 2), 4.5))
    bottom = np.zeros(len(idx))
    cmap = plt.get_cmap("tab20")
    for k in range(d.n_modes):
        vals = d.tensor_shares[idx, k]
        ax.bar(np.arange(len(idx)), vals, bottom=bottom, color=cmap(k % 20), label=f"mode {k}")
        bottom += vals
    names = [d.tensor_names[i] for i in idx]
    ax.set_xticks(np.arange(len(idx)), names, rotation=70, ha="right", **PLAIN)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("share of the tensor's parameters")
    ax.set_xlabel("tensor (network order)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncols=min(d.n_modes, 5), loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    return fig


def _errors(plt: Any, d: ReportData) -> Any:
    idx = _largest(d)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    win = d.epochs[d.window_rows]
    ax1.plot(d.epochs, np.maximum(d.epoch_error, 1e-12), marker=".", color="tab:purple")
    ax1.axvspan(win.min(), win.max(), color="0.9", zorder=0, label="window")
    ax1.set_yscale("log")  # the plateau and the first epochs on one scale
    if np.any(d.epoch_error > 1):
        ax1.axhline(1.0, color="red", ls=":", lw=1, label="error 1")
    ax1.set_xlabel(_epoch_label(d.epoch_offset))
    ax1.set_ylabel("relative error (log scale)")
    ax1.set_title("per epoch")
    ax1.legend(fontsize=8)
    ax2.bar(np.arange(len(idx)), d.tensor_error[idx], color="tab:purple")
    names = [d.tensor_names[i] for i in idx]
    ax2.set_xticks(np.arange(len(idx)), names, rotation=70, ha="right", **PLAIN)
    ax2.tick_params(axis="x", labelsize=7)
    ax2.set_xlabel("tensor (network order)")
    ax2.set_ylabel("relative error")
    ax2.set_title("per tensor (all epochs)")
    fig.tight_layout()
    return fig


def _floats(values: Any) -> np.ndarray:
    """A JSON list as float64, null (a NaN metric) as NaN."""
    return np.array([np.nan if v is None else v for v in values or []], dtype=np.float64)


def _evaluation(plt: Any, ev: dict[str, Any], offset: int) -> Any:
    metrics = list(ev.get("metrics", []))
    fig, axes = _grid(plt, max(len(metrics), 1), ncols=2, size=(5.5, 3.6))
    x, _ = epoch_positions(ev["epochs"], offset)
    for name, ax in zip(metrics, axes, strict=False):
        for key, color, label in (("raw", "black", "raw (stored)"), ("cmd", "tab:orange", "CMD")):
            values = _floats((ev.get(key) or {}).get(name))
            if len(values) == len(x):
                ax.plot(x, values, color=color, marker=".", label=label)
        ax.set_title(name, **PLAIN)
        ax.set_xlabel(_epoch_label(offset))
        ax.set_ylabel(name, **PLAIN)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _sweep(plt: Any, sw: dict[str, Any]) -> Any:
    metrics = dict(sw.get("metrics") or {})
    fig, axes = _grid(plt, 1 + len(metrics), ncols=2, size=(5.5, 3.6))
    panels = list(axes)
    panels[0].plot(sw["modes"], _floats(sw["relative_error"]), marker="o", color="tab:purple")
    panels[0].set_xlabel("number of modes")
    panels[0].set_ylabel("relative error")
    for (name, values), ax in zip(metrics.items(), panels[1:], strict=False):
        if len(_floats(values)) == len(sw["modes"]):
            ax.plot(sw["modes"], _floats(values), marker="o")
        ax.set_xlabel("number of modes")
        ax.set_ylabel(name, **PLAIN)
        ax.set_title(name, **PLAIN)
    fig.tight_layout()
    return fig


def draw_all(d: ReportData, out: Path) -> list[Figure]:
    """Draw every figure of the report into PNG files in ``out``.

    Parameters
    ----------
    d : ReportData
    out : Path
        An existing folder.

    Returns
    -------
    list of Figure
        In the order the report shows them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs: list[tuple[str, str, str, Any]] = [
        ("correlation.png", "Correlation of the sampled parameters (paper Fig. 2)",
         "|corr| between the K sampled trajectories over the window, grouped by mode; dashed "
         "lines separate the modes.", lambda: _corr(plt, d)),
        ("references.png", "Reference of each mode (paper Fig. 25)",
         "Each mode's reference parameter over all ingested epochs; grey: the window the "
         "decomposition was fitted on.", lambda: _references(plt, d)),
        ("members.png", "Sampled parameters and their reconstruction (paper Figs. 1, 23)",
         f"{MEMBERS_SHOWN} sampled parameters per mode (black) against a*r(t)+b (dashed).",
         lambda: _members(plt, d)),
        ("bands.png", "95% band of each mode (paper Fig. 3)",
         "Sampled members normalised to zero mean, unit variance and the reference's sign; "
         "2.5-97.5 percentiles per epoch, with the normalised reference.",
         lambda: _bands(plt, d)),
        ("tensor_modes.png", "Modes through the network (paper Fig. 4b)",
         f"Share of each mode in each tensor (the {MAX_TENSORS} largest at most).",
         lambda: _shares(plt, d)),
        ("errors.png", "Reconstruction error",
         "sqrt(sum (w - w_hat)^2 / sum w^2) per epoch and per tensor, over all epochs.",
         lambda: _errors(plt, d)),
    ]  # fmt: skip
    if d.evaluation is not None:
        ev = d.evaluation
        specs.append(
            ("evaluation.png", "Evaluation: stored vs CMD weights (paper Figs. 5, 7)",
             "Each metric per epoch, evaluated on the stored and on the CMD-rebuilt weights.",
             lambda: _evaluation(plt, ev, d.epoch_offset))
        )  # fmt: skip
    if d.sweep is not None:
        sw = d.sweep
        specs.append(
            ("sweep.png", "Number of modes (paper Fig. 6)",
             "Relative reconstruction error (and metrics) against the number of modes.",
             lambda: _sweep(plt, sw))
        )  # fmt: skip
    from cmdtool.report.compare import figure_specs  # the "Compared with" section

    specs.extend(figure_specs(plt, d.summary.get("compare")))
    figures = []
    for file, title, caption, draw in specs:
        fig = draw()
        try:
            fig.savefig(out / file, dpi=DPI)
        finally:
            plt.close(fig)
        figures.append(Figure(file, title, caption))
    return figures
