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

# the decomposition options, shared by `decompose` and `run`
ModesOpt = Annotated[int | None, typer.Option("--modes", help="Number of modes. [default: 10]")]
ThresholdOpt = Annotated[
    float | None, typer.Option("--threshold", help="Cut at t x max distance (0 < t <= 1).")
]
WindowOpt = Annotated[
    str | None,
    typer.Option("--epochs", help="Window of epoch labels A:B (half-open). [default: all epochs]"),
]
StrideOpt = Annotated[int, typer.Option("--stride", help="Every S-th epoch of the window.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Sampling seed.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
StatsOpt = Annotated[
    str | None,
    typer.Option(
        "--stats",
        help="Normalization statistics in rebuilt checkpoints: gated, raw, model, "
        "positive or clamp. [default: gated; model for a store made before cmdtool "
        "recognised statistics]",
    ),
]


@app.command()
def decompose(
    store: StoreArg,
    modes: ModesOpt = None,
    threshold: ThresholdOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="K, sampled parameters.")] = 1000,
    epochs: WindowOpt = None,
    stride: StrideOpt = 1,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    name: NameOpt = "cmd",
    cluster: ClusterOpt = None,
    stats: StatsOpt = None,
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
            stats=stats,
        ).fit(store, name=name, progress=(lambda d, t: bar(d, t)) if bar else None)
    if as_json:
        emit_json(decompose_json(model))
    else:
        print_modes(model)


@app.command()
def reconstruct(
    store: StoreArg,
    out_dir: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Folder for the checkpoints, or one file (*.safetensors, *.pt) for one epoch.",
        ),
    ],
    epochs: Annotated[
        str, typer.Option("--epochs", help="last, all, A:B (labels) or 3,7,10.")
    ] = "last",
    name: NameOpt = "cmd",
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="safetensors or pt. [default: safetensors, or OUT's suffix]"),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Write the stored epochs themselves, not the model's.")
    ] = False,
    layout: Annotated[
        str,
        typer.Option(
            "--layout",
            metavar="flat|source",
            help="flat: OUT/epoch_<label>.<format>; source: each epoch at OUT/<its source "
            "path>, in the layout it came from (HF folder, Lightning .ckpt, DCP folder).",
        ),
    ] = "flat",
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
            layout=layout,
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
        typer.Option("--out", metavar="DIR", help="Report folder. [default: STORE/../report]"),
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
    from cmdtool.store.results import retry_republished

    def once() -> tuple[Any, Any]:
        model = CMD.load(store, name)  # the table printed is that of the version reported
        return model, write_report(store, out_dir, name=name, force=force, pin=model.pin_)

    with handle_errors():
        model, summary = retry_republished(f"decomposition {name!r} of store {store}", once)
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
    modes: ModesOpt = None,
    threshold: ThresholdOpt = None,
    samples: Annotated[
        int | None, typer.Option("--samples", help="K, sampled parameters. [default: min(1000, N)]")
    ] = None,
    epochs: WindowOpt = None,
    stride: StrideOpt = 1,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    cluster: ClusterOpt = None,
    stats: StatsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest SOURCE into OUT/store.zarr, decompose, rebuild the last epoch, write OUT/report.

    The decomposition takes the options of 'cmdtool decompose'."""
    from cmdtool.pipeline import run_all

    with handle_errors(), progress_bar("run", not as_json) as bar:
        result = run_all(
            source,
            out_dir,
            progress=bar,
            modes=modes,
            threshold=threshold,
            samples=samples,
            epochs=epochs,
            stride=stride,
            seed=seed,
            device=device,
            stats=stats,
            cluster=cluster,
        )
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


