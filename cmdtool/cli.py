"""The ``cmdtool`` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cmdtool import __version__
from cmdtool.errors import CmdtoolError

app = typer.Typer(
    name="cmdtool",
    help="Correlation Mode Decomposition of training runs: ingest checkpoints, "
    "decompose them into a few modes, rebuild checkpoints from the model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)
_state = {"debug": False}


@contextmanager
def _errors() -> Iterator[None]:
    """Known errors: one line on stderr and the documented exit code; bugs: exit 1."""
    try:
        yield
    except CmdtoolError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if _state["debug"]:
            raise
        err.print("interrupted; the store keeps only complete epochs and results")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if _state["debug"]:
            raise
        err.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback and report it)",
            markup=True,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        out.print(f"cmdtool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Correlation Mode Decomposition of training runs."""
    _state["debug"] = debug


@contextmanager
def _progress(label: str, enabled: bool) -> Iterator[Callable[..., None] | None]:
    """A rich progress bar on a terminal; nothing otherwise."""
    if not enabled or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[what]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None, what="")

        def update(done: int, total: int, what: str = "") -> None:
            bar.update(task, completed=done, total=total, what=what)

        yield update


def _emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _labels_text(labels: list[int]) -> str:
    if not labels:
        return "none new"
    if len(labels) <= 8:
        return ", ".join(map(str, labels))
    return f"{labels[0]}..{labels[-1]}"


def _print_ingest(s: Any) -> None:
    verb = "created" if s.created else "updated"
    out.print(
        f"{verb} {s.store}: +{len(s.added)} epoch(s) ({_labels_text(s.added)}), "
        f"{s.n_epochs} in all, N = {s.n_params:,} parameters, {s.seconds:.1f} s",
        highlight=False,
    )
    if s.skipped:
        out.print(f"already in the store: {len(s.skipped)} epoch(s)", highlight=False)
    for c in s.changed:
        err.print(
            f"warning: {c['source']} (epoch {c['label']}) changed after it was ingested; "
            "the store keeps the values it had then",
            highlight=False,
        )
    keys = {k: n for k, n in s.state_keys.items() if k != "(top level)"}
    if keys:
        used = ", ".join(f"'{k}' ({n} files)" for k, n in keys.items())
        out.print(f"tensors read from: {used}", highlight=False)


def _print_modes(model: Any) -> None:
    table = Table(title=f"CMD '{model.name_}': {model.n_modes_} modes")
    table.add_column("mode", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("share", justify="right")
    table.add_column("rel. error", justify="right")
    table.add_column("reference column", justify="right")
    total = max(int(model.mode_sizes_.sum()), 1)
    for m in range(model.n_modes_):
        table.add_row(
            str(m),
            f"{int(model.mode_sizes_[m]):,}",
            f"{model.mode_sizes_[m] / total:.1%}",
            f"{model.mode_errors_[m]:.4f}",
            str(int(model.ref_index_[m])),
        )
    out.print(table)
    out.print(
        f"relative reconstruction error over the window: {model.relative_error_:.4f} "
        f"({len(model.window_rows_)} epochs, {model.seconds_:.2f} s on {model.summary_['device']})",
        highlight=False,
    )


def _decompose_json(model: Any) -> dict[str, Any]:
    s = model.summary_
    return {
        "name": model.name_,
        "n_modes": model.n_modes_,
        "mode_sizes": s["mode_sizes"],
        "mode_errors": s["mode_errors"],
        "relative_error": s["relative_error"],
        "seconds": s["seconds"],
        "epochs": s["epochs"],
        "samples": s["samples"],
        "seed": s["seed"],
        "device": s["device"],
    }


# ---------------------------------------------------------------------- commands
SourceArg = Annotated[Path, typer.Argument(help="Folder of checkpoints.")]
StoreArg = Annotated[Path, typer.Argument(help="Trajectory store (a zarr v3 folder).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary.")]
NameOpt = Annotated[str, typer.Option("--name", help="Name of the decomposition subgroup.")]
ClusterOpt = Annotated[
    str | None,
    typer.Option(
        "--cluster", metavar="ADDRESS", help="dask.distributed scheduler address, or 'local'."
    ),
]


@app.command()
def ingest(
    source: SourceArg,
    store: StoreArg,
    pattern: Annotated[
        str | None, typer.Option("--pattern", help="Glob picking checkpoint files or folders.")
    ] = None,
    include: Annotated[
        str | None, typer.Option("--include", help="Keep only tensors whose name matches.")
    ] = None,
    exclude: Annotated[
        str | None, typer.Option("--exclude", help="Drop tensors whose name matches.")
    ] = None,
    allow_nonfinite: Annotated[
        bool, typer.Option("--allow-nonfinite", help="Store NaN/Inf instead of refusing.")
    ] = False,
    allow_global: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-global",
            metavar="QUALNAME",
            help="A pickled class a torch/Lightning file may name (repeatable); it is "
            "replaced by an inert placeholder and only tensors are used.",
        ),
    ] = None,
    readers: Annotated[
        int,
        typer.Option("--readers", help="Checkpoints read ahead concurrently (0: none)."),
    ] = 2,
    then_update: Annotated[
        bool,
        typer.Option(
            "--update", help="Then fold the new epochs into decomposition --name (online CMD)."
        ),
    ] = False,
    name: NameOpt = "cmd",
    as_json: JsonOpt = False,
) -> None:
    """Append the checkpoints of SOURCE that are not yet in STORE."""
    from cmdtool.ingest import ingest as run_ingest
    from cmdtool.update import ingest_and_update

    options: dict[str, Any] = {
        "pattern": pattern,
        "include": include,
        "exclude": exclude,
        "allow_nonfinite": allow_nonfinite,
        "allow_globals": allow_global or (),
        "readers": readers,
    }
    with _errors(), _progress("ingest", not as_json) as bar:
        if then_update:
            summary, updated = ingest_and_update(source, store, name, progress=bar, **options)
        else:
            summary, updated = run_ingest(source, store, progress=bar, **options), None
    if as_json:
        _emit_json(vars(summary) if updated is None else {**vars(summary), "update": vars(updated)})
        return
    _print_ingest(summary)
    if updated is not None:
        _print_update(updated)


def _print_update(s: Any) -> None:
    if not s.added:
        out.print(f"'{s.name}' is up to date: {s.n_epochs} epochs", highlight=False)
        return
    out.print(
        f"folded epoch(s) {_labels_text(s.added)} into '{s.name}': {s.n_epochs} epochs, "
        f"{s.n_modes} modes, relative error {s.relative_error:.4f}, "
        f"{s.rows_read} row(s) read, {s.seconds:.2f} s",
        highlight=False,
    )


@app.command()
def update(store: StoreArg, name: NameOpt = "cmd", as_json: JsonOpt = False) -> None:
    """Fold the epochs ingested after decomposition --name into it, reading only them."""
    from cmdtool.update import update as run_update

    with _errors(), _progress("update", not as_json) as bar:
        summary = run_update(store, name, progress=(lambda d, t: bar(d, t)) if bar else None)
    if as_json:
        _emit_json(vars(summary))
    else:
        _print_update(summary)


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
    from cmdtool.decompose import CMD
    from cmdtool.errors import UsageError

    with _errors(), _progress("decompose", not as_json) as bar:
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
        _emit_json(_decompose_json(model))
    else:
        _print_modes(model)


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
    from cmdtool.reconstruct import reconstruct as run_reconstruct

    with _errors(), _progress("reconstruct", not as_json) as bar:
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
        _emit_json(vars(summary))
    else:
        out.print(f"wrote {len(summary.files)} checkpoint(s) to {out_dir}", highlight=False)


@app.command()
def info(store: StoreArg, as_json: JsonOpt = False) -> None:
    """Epochs, tensors, size on disk and decompositions of STORE."""
    from cmdtool.describe import describe

    with _errors():
        d = describe(store)
    if as_json:
        _emit_json(d)
        return
    labels = d["labels"]
    out.print(f"store {d['store']} (format v{d['format_version']})", highlight=False)
    out.print(
        f"{d['n_epochs']} epochs"
        + (f", labels {labels[0]}..{labels[-1]}" if labels else "")
        + f"; N = {d['n_params']:,} modeled parameters in {len(d['params'])} tensors, "
        f"{len(d['extras'])} other tensors; {d['disk_bytes'] / 1e6:.1f} MB on disk",
        highlight=False,
    )
    table = Table(title="tensors")
    for col in ("name", "shape", "dtype", "offset", "modeled"):
        table.add_column(col)
    for p in d["params"]:
        table.add_row(p["name"], str(tuple(p["shape"])), p["dtype"], str(p["offset"]), "yes")
    for e in d["extras"]:
        table.add_row(e["name"], str(tuple(e["shape"])), e["dtype"], "", "no")
    out.print(table)
    for r in d["decompositions"]:
        out.print(
            f"decomposition '{r['name']}': {r['n_modes']} modes, window {r['window']} "
            f"stride {r['stride']}, relative error {r['relative_error']:.4f}",
            highlight=False,
        )
    if not d["decompositions"]:
        out.print("no decomposition yet: run 'cmdtool decompose'", highlight=False)


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
    from cmdtool.decompose import CMD
    from cmdtool.report import write_report

    with _errors():
        summary = write_report(store, out_dir, name=name, force=force)
        model = None if as_json else CMD.load(store, name)
    if as_json:
        _emit_json(vars(summary))
        return
    _print_modes(model)
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

    with _errors(), _progress("run", not as_json) as bar:
        result = run_all(source, out_dir, progress=bar)
    if as_json:
        _emit_json(
            {
                "ingest": vars(result.ingest),
                "decompose": _decompose_json(result.model),
                "reconstruct": vars(result.reconstruct),
                "report": vars(result.report),
            }
        )
        return
    _print_ingest(result.ingest)
    _print_modes(result.model)
    out.print(f"rebuilt {', '.join(result.reconstruct.files)} from the CMD model", highlight=False)
    _print_report(result.report)


EvalOpt = Annotated[
    str | None,
    typer.Option(
        "--eval",
        metavar="MODULE:FUNCTION",
        help="Function (state dict -> dict of metric -> float): pkg.mod:fn or path/file.py:fn.",
    ),
]


def _fmt(v: float | None) -> str:
    return "nan" if v is None or v != v else f"{v:.4f}"


@app.command()
def evaluate(
    store: StoreArg,
    eval_target: Annotated[
        str,
        typer.Option(
            "--eval",
            metavar="MODULE:FUNCTION",
            help="Function (state dict -> dict of metric -> float): pkg.mod:fn or path/file.py:fn.",
        ),
    ],
    epochs: Annotated[
        str, typer.Option("--epochs", help="last, all, A:B (labels) or 3,7,10.")
    ] = "all",
    name: NameOpt = "cmd",
    fail_if_worse: Annotated[
        str | None,
        typer.Option(
            "--fail-if-worse",
            metavar="METRIC[:TOL]",
            help="Exit 10 if CMD's mean METRIC over the last 10 epochs evaluated is below "
            "raw's minus TOL (default 0).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate the raw and the CMD checkpoint of each epoch with a user function."""
    from cmdtool.evaluate import check_gate, parse_gate
    from cmdtool.evaluate import evaluate as run_evaluate

    with _errors(), _progress("evaluate", not as_json) as bar:
        gate = parse_gate(fail_if_worse) if fail_if_worse is not None else None
        result = run_evaluate(store, eval_target, epochs=epochs, name=name, progress=bar)
    if as_json:
        _emit_json(result.to_json())
    else:
        table = Table(title=f"raw and CMD ('{name}') checkpoints")
        table.add_column("epoch", justify="right")
        for m in result.metrics:
            table.add_column(f"{m} raw", justify="right")
            table.add_column(f"{m} CMD", justify="right")
        for i, label in enumerate(result.epochs):
            cells = [str(label)]
            for m in result.metrics:
                cells += [_fmt(result.raw[m][i]), _fmt(result.cmd[m][i])]
            table.add_row(*cells)
        out.print(table)
        out.print(f"metrics from {result.function}, stored in {store}/{name}", highlight=False)
    if gate is not None:
        with _errors():
            raw_mean, cmd_mean = check_gate(result, *gate)
        if not as_json:
            out.print(
                f"gate passed: mean {gate[0]} CMD {cmd_mean:.6g} >= raw {raw_mean:.6g} "
                f"- {gate[1]:g}",
                highlight=False,
            )


@app.command()
def sweep(
    store: StoreArg,
    modes: Annotated[
        str, typer.Option("--modes", help="Numbers of modes to try, e.g. 1,2,5,10,20.")
    ] = "1,2,5,10,20",
    eval_target: EvalOpt = None,
    samples: Annotated[
        int | None, typer.Option("--samples", help="K (default: the decomposition's).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Sampling seed (default: the decomposition's).")
    ] = None,
    epochs: Annotated[
        str | None,
        typer.Option("--epochs", help="Window A:B (half-open; default: the decomposition's)."),
    ] = None,
    name: NameOpt = "cmd",
    as_json: JsonOpt = False,
) -> None:
    """Fit CMD for several numbers of modes: error (and metrics) against M."""
    from cmdtool.errors import UsageError
    from cmdtool.evaluate import sweep as run_sweep

    with _errors(), _progress("sweep", not as_json) as bar:
        try:
            ms = [int(p) for p in modes.split(",") if p.strip()]
        except ValueError:
            raise UsageError(f"--modes {modes!r} must be comma-separated integers") from None
        result = run_sweep(
            store,
            ms,
            fn=eval_target,
            samples=samples,
            seed=seed,
            epochs=epochs,
            name=name,
            progress=bar,
        )
    if as_json:
        _emit_json(result.to_json())
        return
    table = Table(title=f"sweep of the number of modes (window {result.window})")
    table.add_column("M", justify="right")
    table.add_column("found", justify="right")
    table.add_column("rel. error", justify="right")
    for metric in result.metrics:
        table.add_column(f"{metric} CMD @ {result.epoch}", justify="right")
    for i, m in enumerate(result.modes):
        cells = [str(m), str(result.n_modes_found[i]), f"{result.relative_error[i]:.4f}"]
        cells += [_fmt(result.metrics[k][i]) for k in result.metrics]
        table.add_row(*cells)
    out.print(table)
    for k, v in result.raw_metrics.items():
        out.print(f"raw {k} at epoch {result.epoch}: {_fmt(v)}", highlight=False)


def _emit_json_line(data: dict[str, Any]) -> None:
    """One JSON object on one line of stdout, flushed (JSON Lines, for live output)."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def _print_watch_event(event: Any, warmup: int) -> None:
    head = f"[bold]epoch {event.label}[/]"
    if event.phase == "warmup":
        out.print(f"{head}  warm-up {event.n_epochs}/{warmup}", highlight=False)
        return
    what = "decomposed: " if event.phase == "decomposed" else ""
    out.print(
        f"{head}  {what}modes {event.n_modes}  rel.err {_fmt(event.relative_error)}  "
        f"{event.seconds:.2f} s",
        highlight=False,
    )


@app.command()
def watch(
    source: SourceArg,
    store: StoreArg,
    warmup: Annotated[
        int, typer.Option("--warmup", metavar="F", help="Epochs the decomposition is fitted over.")
    ] = 10,
    interval: Annotated[
        float, typer.Option("--interval", metavar="S", help="Seconds between looks at SOURCE.")
    ] = 2.0,
    until_idle: Annotated[
        float | None,
        typer.Option(
            "--until-idle",
            metavar="S",
            help="Stop after S seconds without a new epoch; without it, run until Ctrl-C.",
        ),
    ] = None,
    name: NameOpt = "cmd",
    modes: Annotated[int, typer.Option("--modes", help="Number of modes.")] = 10,
    samples: Annotated[int, typer.Option("--samples", help="K, sampled parameters.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    pattern: Annotated[
        str | None, typer.Option("--pattern", help="Glob picking checkpoint files or folders.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line: each epoch, then a summary.")
    ] = False,
) -> None:
    """Follow SOURCE while training writes to it: ingest each complete checkpoint, decompose
    after the warm-up, then fold in every new epoch."""
    from cmdtool.watch import watch as run_watch

    def on_epoch(event: Any) -> None:
        if as_json:
            _emit_json_line({"type": "epoch", **vars(event)})
        else:
            _print_watch_event(event, warmup)

    def on_notice(message: str) -> None:
        err.print(message, highlight=False, soft_wrap=True)

    with _errors():
        summary = run_watch(
            source,
            store,
            warmup=warmup,
            interval=interval,
            until_idle=until_idle,
            name=name,
            n_modes=modes,
            n_samples=samples,
            seed=seed,
            device=device,
            pattern=pattern,
            on_epoch=on_epoch,
            on_notice=on_notice,
        )
    if as_json:
        _emit_json_line({"type": "summary", **vars(summary)})
        return
    model = (
        f"decomposition '{summary.name}': {summary.n_modes} modes, "
        f"rel.err {_fmt(summary.relative_error)}"
        if summary.decomposed
        else "no decomposition yet"
    )
    out.print(
        f"watched {source}: +{len(summary.added)} epoch(s) ({_labels_text(summary.added)}), "
        f"{summary.n_epochs} in all; {model}; {summary.seconds:.1f} s",
        highlight=False,
    )


def main() -> None:
    """Console-script entry point."""
    app()
