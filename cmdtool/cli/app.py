"""The ``cmdtool`` command line: parse, call the library, print. No logic lives here.

This module holds the Typer app, error handling, the global options and the pieces the
command modules share; each ``*_commands`` module registers its commands on ``app``."""

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
def handle_errors() -> Iterator[None]:
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
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[..., None] | None]:
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


def emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def labels_text(labels: list[int]) -> str:
    if not labels:
        return "none new"
    if len(labels) <= 8:
        return ", ".join(map(str, labels))
    return f"{labels[0]}..{labels[-1]}"


def print_ingest(s: Any) -> None:
    verb = "created" if s.created else "updated"
    out.print(
        f"{verb} {s.store}: +{len(s.added)} epoch(s) ({labels_text(s.added)}), "
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


def print_modes(model: Any) -> None:
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


def decompose_json(model: Any) -> dict[str, Any]:
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


def fmt(v: float | None) -> str:
    return "nan" if v is None or v != v else f"{v:.4f}"


def main() -> None:
    """Console-script entry point."""
    app()
