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
    plain,
    print_ingest,
    progress_bar,
)

# What one checkpoint may hold (cmdtool/checkpoints/limits.py; the defaults are repeated
# here so that the CLI does not import torch to draw --help; a test keeps them equal).
DEFAULT_MAX_PARAMS = 2**34
DEFAULT_MAX_TENSORS = 100_000
AllowExpandedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-expanded",
        help="Ingest stride-0 (expanded) or overlapping views of a torch file at their full "
        "logical size instead of refusing them.",
    ),
]
MaxParamsOpt = Annotated[
    int,
    typer.Option(
        "--max-params",
        metavar="N",
        help="Refuse a checkpoint whose tensors hold more elements than N in all.",
    ),
]
MaxTensorsOpt = Annotated[
    int,
    typer.Option(
        "--max-tensors", metavar="N", help="Refuse a checkpoint file holding more tensors."
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
    stats_pattern: Annotated[
        str | None,
        typer.Option(
            "--stats-pattern",
            metavar="REGEX",
            help="Names of the normalization statistics (fixed at creation). "
            "[default: (^|\\.)running_(mean|var)$]",
        ),
    ] = None,
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
    label_by: Annotated[
        str,
        typer.Option(
            "--labels",
            metavar="step|epoch",
            help="Label Hugging Face checkpoint-<step>/ folders by their step, or by the "
            "epoch in their trainer_state.json.",
        ),
    ] = "step",
    state: Annotated[
        str,
        typer.Option(
            "--state",
            metavar="raw|averaged",
            help="Lightning files with weight averaging: the raw (current_model_state) or "
            "the averaged (state_dict) weights.",
        ),
    ] = "raw",
    allow_expanded: AllowExpandedOpt = False,
    max_params: MaxParamsOpt = DEFAULT_MAX_PARAMS,
    max_tensors: MaxTensorsOpt = DEFAULT_MAX_TENSORS,
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
        "stats_pattern": stats_pattern,
        "allow_globals": allow_global or (),
        "readers": readers,
        "label_by": label_by,
        "state": state,
        "allow_expanded": allow_expanded,
        "max_params": max_params,
        "max_tensors": max_tensors,
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
    checks = "" if d["checksums"] else ", no checksums: 'cmdtool upgrade' adds them"
    out.print(f"store {d['store']} (format v{d['format_version']}{checks})", highlight=False)
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
        table.add_row(plain(p["name"]), str(tuple(p["shape"])), p["dtype"], str(p["offset"]), "yes")
    for e in d["extras"]:
        table.add_row(plain(e["name"]), str(tuple(e["shape"])), e["dtype"], "", "no")
    out.print(table)
    st = d["stats"]
    out.print(
        f"normalization statistics ({st['pattern']!r}"
        + ("" if st["recorded"] else ", the default: the store predates the rule")
        + f"): {', '.join(st['tensors']) or 'none'}",
        highlight=False,
    )
    for r in d["decompositions"]:
        out.print(
            f"decomposition '{r['name']}': {r['n_modes']} modes, {r['constant']:,} constant "
            f"parameters, statistics '{r['stats']}'"
            + ("" if r["stats_recorded"] else " (made before cmdtool treated them)")
            + f", window {r['window']} stride {r['stride']}, relative error "
            f"{r['relative_error']:.4f}",
            highlight=False,
        )
    if not d["decompositions"]:
        out.print("no decomposition yet: run 'cmdtool decompose'", highlight=False)


@app.command()
def verify(store: StoreArg, as_json: JsonOpt = False) -> None:
    """Read every committed chunk of STORE and its decompositions; list what is damaged
    (exit 6 if anything is)."""
    from cmdtool.errors import StoreError
    from cmdtool.store.verify import verify as run_verify

    with handle_errors(), progress_bar("verify", not as_json) as bar:
        report = run_verify(store, progress=bar)
    if as_json:
        emit_json({**vars(report), "ok": report.ok})
    else:
        for problem in report.problems:
            out.print(f"damaged: {problem}", highlight=False)
        checks = "crc32c" if report.checksummed else "sizes only (format v1: no checksums)"
        out.print(
            f"store {report.store} (format v{report.format_version}): {report.chunks:,} chunks "
            f"of {report.arrays} arrays read, {report.bytes_read / 1e6:.1f} MB, "
            f"{checks}, {report.seconds:.1f} s: "
            + ("no damage" if report.ok else f"{len(report.problems)} problem(s)"),
            highlight=False,
        )
    if not report.ok:
        with handle_errors():
            raise StoreError(
                f"store {report.store} is damaged: {len(report.problems)} problem(s), the "
                f"first: {report.problems[0]}"
            )


@app.command()
def upgrade(store: StoreArg, as_json: JsonOpt = False) -> None:
    """Rewrite a format-v1 STORE as format v2 (a checksum on every chunk), in place."""
    from cmdtool.store.upgrade import upgrade as run_upgrade

    with handle_errors(), progress_bar("upgrade", not as_json) as bar:
        s = run_upgrade(store, progress=bar)
    if as_json:
        emit_json(vars(s))
    elif s.from_version == s.to_version:
        out.print(f"store {s.store} is already format v{s.to_version}", highlight=False)
    else:
        out.print(
            f"upgraded {s.store} from format v{s.from_version} to v{s.to_version}: "
            f"{len(s.arrays)} arrays rewritten, {s.bytes_written / 1e6:.1f} MB, "
            f"{s.seconds:.1f} s",
            highlight=False,
        )


def _emit_json_line(data: dict[str, Any]) -> None:
    """One JSON object on one line of stdout, flushed (JSON Lines, for live output)."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def _print_watch_event(event: Any, warmup: int) -> None:
    head = f"[bold]epoch {event.label}[/]"
    if event.phase == "warmup":
        out.print(f"{head}  warm-up {event.n_epochs}/{warmup}", markup=True, highlight=False)
        return
    what = "decomposed: " if event.phase == "decomposed" else ""
    out.print(
        f"{head}  {what}modes {event.n_modes}  rel.err {fmt(event.relative_error)}  "
        f"{event.seconds:.2f} s",
        markup=True,
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
    settle: Annotated[
        float | None,
        typer.Option(
            "--settle",
            metavar="S",
            help="A complete file is ingested once unchanged for S seconds. "
            "[default: 5 x --interval]",
        ),
    ] = None,
    allow_expanded: AllowExpandedOpt = False,
    max_params: MaxParamsOpt = DEFAULT_MAX_PARAMS,
    max_tensors: MaxTensorsOpt = DEFAULT_MAX_TENSORS,
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
        if isinstance(source, str):  # an object-store URL (SourceArg keeps it as text)
            from cmdtool.errors import UsageError

            raise UsageError(f"watch {source}: SOURCE must be a local folder (object-store "
                             "SOURCEs work with ingest, not watch, yet)")
        if isinstance(store, str):  # an object-store URL (StoreArg keeps it as text)
            from cmdtool.errors import UsageError

            raise UsageError(f"watch: STORE {store} must be a local folder (watch replaces "
                             "and removes local folders; object-store STOREs work with "
                             "ingest, decompose and update)")
        summary = run_watch(
            source,
            store,
            warmup=warmup,
            interval=interval,
            until_idle=until_idle,
            settle=settle,
            allow_expanded=allow_expanded,
            max_params=max_params,
            max_tensors=max_tensors,
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


