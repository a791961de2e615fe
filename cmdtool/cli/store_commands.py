"""Commands that fill and describe a store: ``ingest``, ``update``, ``info``, ``watch``."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from cmdtool.cli.app import (
    JsonOpt,
    NameOpt,
    SourceArg,
    StoreArg,
    app,
    emit_json,
    err,
    fmt,
    handle_errors,
    labels_text,
    out,
    print_ingest,
    progress_bar,
)


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
    from cmdtool.decomposition.update import ingest_and_update
    from cmdtool.ingestion import ingest as run_ingest

    options: dict[str, Any] = {
        "pattern": pattern,
        "include": include,
        "exclude": exclude,
        "allow_nonfinite": allow_nonfinite,
        "allow_globals": allow_global or (),
        "readers": readers,
    }
    with handle_errors(), progress_bar("ingest", not as_json) as bar:
        if then_update:
            summary, updated = ingest_and_update(source, store, name, progress=bar, **options)
        else:
            summary, updated = run_ingest(source, store, progress=bar, **options), None
    if as_json:
        emit_json(vars(summary) if updated is None else {**vars(summary), "update": vars(updated)})
        return
    print_ingest(summary)
    if updated is not None:
        _print_update(updated)


def _print_update(s: Any) -> None:
    if not s.added:
        out.print(f"'{s.name}' is up to date: {s.n_epochs} epochs", highlight=False)
        return
    out.print(
        f"folded epoch(s) {labels_text(s.added)} into '{s.name}': {s.n_epochs} epochs, "
        f"{s.n_modes} modes, relative error {s.relative_error:.4f}, "
        f"{s.rows_read} row(s) read, {s.seconds:.2f} s",
        highlight=False,
    )


@app.command()
def update(store: StoreArg, name: NameOpt = "cmd", as_json: JsonOpt = False) -> None:
    """Fold the epochs ingested after decomposition --name into it, reading only them."""
    from cmdtool.decomposition.update import update as run_update

    with handle_errors(), progress_bar("update", not as_json) as bar:
        summary = run_update(store, name, progress=(lambda d, t: bar(d, t)) if bar else None)
    if as_json:
        emit_json(vars(summary))
    else:
        _print_update(summary)


@app.command()
def info(store: StoreArg, as_json: JsonOpt = False) -> None:
    """Epochs, tensors, size on disk and decompositions of STORE."""
    from cmdtool.store.describe import describe

    with handle_errors():
        d = describe(store)
    if as_json:
        emit_json(d)
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
        f"{head}  {what}modes {event.n_modes}  rel.err {fmt(event.relative_error)}  "
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
    from cmdtool.online.watch import watch as run_watch

    def on_epoch(event: Any) -> None:
        if as_json:
            _emit_json_line({"type": "epoch", **vars(event)})
        else:
            _print_watch_event(event, warmup)

    def on_notice(message: str) -> None:
        err.print(message, highlight=False, soft_wrap=True)

    with handle_errors():
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
        f"rel.err {fmt(summary.relative_error)}"
        if summary.decomposed
        else "no decomposition yet"
    )
    out.print(
        f"watched {source}: +{len(summary.added)} epoch(s) ({labels_text(summary.added)}), "
        f"{summary.n_epochs} in all; {model}; {summary.seconds:.1f} s",
        highlight=False,
    )


