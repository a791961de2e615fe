"""Commands that fit and use a decomposition: ``decompose``, ``reconstruct``, ``report``,
``run``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cmdtool.cli.app import (
    ClusterOpt,
    JsonOpt,
    NameOpt,
    SourceArg,
    StoreArg,
    app,
    decompose_json,
    emit_json,
    handle_errors,
    out,
    print_ingest,
    print_modes,
    progress_bar,
)


@app.command()
def decompose(
    store: StoreArg,
    modes: Annotated[
        int | None, typer.Option("--modes", help="Number of modes (default 10).")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Cut at t x max distance (0 < t <= 1).")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="K, sampled parameters.")] = 1000,
    epochs: Annotated[
        str | None, typer.Option("--epochs", help="Window of epoch labels A:B (half-open).")
    ] = None,
    stride: Annotated[int, typer.Option("--stride", help="Every S-th epoch of the window.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    name: NameOpt = "cmd",
    cluster: ClusterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find the modes of STORE and fit every parameter to one (CMD)."""
    from cmdtool.decomposition import CMD
    from cmdtool.errors import UsageError

    with handle_errors(), progress_bar("decompose", not as_json) as bar:
        if modes is not None and threshold is not None:
            raise UsageError("give --modes or --threshold, not both")
        model = CMD(
            None if threshold is not None else (10 if modes is None else modes),
            threshold=threshold,
            n_samples=samples,
            epochs=epochs,
            stride=stride,
            seed=seed,
            device=device,
            cluster=cluster,
        ).fit(store, name=name, progress=(lambda d, t: bar(d, t)) if bar else None)
    if as_json:
        emit_json(decompose_json(model))
    else:
        print_modes(model)


@app.command()
def reconstruct(
    store: StoreArg,
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder for the checkpoints.")],
    epochs: Annotated[
        str, typer.Option("--epochs", help="last, all, A:B (labels) or 3,7,10.")
    ] = "last",
    name: NameOpt = "cmd",
    fmt: Annotated[str, typer.Option("--format", help="safetensors or pt.")] = "safetensors",
    raw: Annotated[
        bool, typer.Option("--raw", help="Write the stored epochs themselves, not the model's.")
    ] = False,
    cluster: ClusterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write checkpoints rebuilt from the decomposition, in the source's names and dtypes."""
    from cmdtool.reconstruction import reconstruct as run_reconstruct

    with handle_errors(), progress_bar("reconstruct", not as_json) as bar:
        summary = run_reconstruct(
            store,
            out_dir,
            epochs=epochs,
            name=name,
            fmt=fmt,
            raw=raw,
            cluster=cluster,
            progress=bar,
        )
    if as_json:
        emit_json(vars(summary))
    else:
        out.print(f"wrote {len(summary.files)} checkpoint(s) to {out_dir}", highlight=False)


@app.command()
def report(
    store: StoreArg,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", help="Report folder (default STORE/../report)."),
    ] = None,
    name: NameOpt = "cmd",
    force: Annotated[
        bool, typer.Option("--force", help="Replace a non-empty report folder.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write DIR/report.html (self-contained), the figures as PNG files and report.json."""
    from cmdtool.decomposition import CMD
    from cmdtool.report import write_report

    with handle_errors():
        summary = write_report(store, out_dir, name=name, force=force)
        model = None if as_json else CMD.load(store, name)
    if as_json:
        emit_json(vars(summary))
        return
    print_modes(model)
    _print_report(summary)


def _print_report(summary: Any) -> None:
    out.print(
        f"report: {summary.html} ({len(summary.figures)} figures, report.json); relative "
        f"error over all epochs {summary.relative_error:.4f}, compression "
        f"{summary.compression_ratio:.1f}x",
        highlight=False,
    )


@app.command()
def run(
    source: SourceArg,
    out_dir: Annotated[
        Path, typer.Argument(metavar="OUT", help="Folder for the store and results.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Ingest SOURCE into OUT/store.zarr, decompose, rebuild the last epoch, write OUT/report."""
    from cmdtool.pipeline import run_all

    with handle_errors(), progress_bar("run", not as_json) as bar:
        result = run_all(source, out_dir, progress=bar)
    if as_json:
        emit_json(
            {
                "ingest": vars(result.ingest),
                "decompose": decompose_json(result.model),
                "reconstruct": vars(result.reconstruct),
                "report": vars(result.report),
            }
        )
        return
    print_ingest(result.ingest)
    print_modes(result.model)
    out.print(f"rebuilt {', '.join(result.reconstruct.files)} from the CMD model", highlight=False)
    _print_report(result.report)


