"""The ``cmdtool`` command line: parse, call the library, print. No logic lives here.

This module holds the Typer app, error handling, the global options and the pieces the
command modules share; each ``*_commands`` module registers its commands on ``app``."""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
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
    # plain click-style help: flags show as flags (no "<bool>"), defaults as "[default: X]"
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 200},
)
#: Control characters (C0, DEL, C1) and Unicode line/paragraph separators: a user string
#: (a path, a tensor name, a label) holding one would break a message into several lines
#: or send terminal escapes.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def plain(text: object) -> str:
    """``text`` as one line: control characters shown escaped as in ``repr`` (``\\n``,
    ``\\x1b``, ``\\u2028``); everything else as is."""

    def esc(m: re.Match[str]) -> str:
        c = m.group()
        return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    return _CONTROL.sub(esc, str(text))


class PlainConsole(Console):
    """The CLI's consoles: text is plain, never rich markup (a path or tensor name such as
    ``w/mk[/st]`` prints as is), and every string printed is one line (:func:`plain`, no
    wrapping at the terminal width). A caller that wants markup passes ``markup=True`` and
    escapes the user strings in it with :func:`rich.markup.escape`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, **kwargs)
        if "width" not in kwargs and not self.is_terminal:
            # piped to a file or a program: no wrapping at 80 columns (tables keep their
            # natural width; nothing printed expands to the console width)
            self.width = UNWRAPPED_WIDTH

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if objects and all(isinstance(o, str) for o in objects):
            objects = tuple(plain(o) for o in objects)
            kwargs.setdefault("soft_wrap", True)
        super().print(*objects, **kwargs)


UNWRAPPED_WIDTH = 100_000
out = PlainConsole()
err = PlainConsole(stderr=True)
_state = {"debug": False}


@contextmanager
def handle_errors() -> Iterator[None]:
    """Known errors: one line on stderr and the documented exit code; bugs: exit 1."""
    try:
        yield
    except CmdtoolError as exc:
        if _state["debug"]:  # the traceback, then the same line and the same exit code
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {escape(plain(exc))}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        if _state["debug"]:
            traceback.print_exc()
        err.print("interrupted; the store keeps only complete epochs and results")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if _state["debug"]:
            raise
        err.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(plain(exc))} "
            "(rerun with --debug for the traceback and report it)",
            markup=True,
            highlight=False,
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
        TextColumn("{task.fields[what]}", markup=False),  # a file name, say
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
    for f in getattr(s, "skipped_files", []):
        err.print(f"note: skipped {f['path']}: {f['reason']}", highlight=False)
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
    total = max(int(model.mode_sizes_.sum()) + model.n_constant_, 1)
    for m in range(model.n_modes_):
        table.add_row(
            str(m),
            f"{int(model.mode_sizes_[m]):,}",
            f"{model.mode_sizes_[m] / total:.1%}",
            f"{model.mode_errors_[m]:.4f}",
            str(int(model.ref_index_[m])),
        )
    if model.n_constant_:
        table.add_row(
            "constant",
            f"{model.n_constant_:,}",
            f"{model.n_constant_ / total:.1%}",
            "exact",
            "(none: a = 0, b = the value)",
        )
    out.print(table)
    stats = model.summary_.get("stats_tensors") or []
    if stats:
        out.print(
            f"normalization statistics: {len(stats)} tensor(s), rebuilt '"
            f"{model.summary_.get('stats', 'model')}'",
            highlight=False,
        )
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
        "constant": s.get("constant", 0),
        "stats": s.get("stats", "model"),
        "stats_tensors": s.get("stats_tensors", []),
    }


# ---------------------------------------------------------------------- commands
def _source_location(value: str) -> Path:
    """SOURCE as given: a folder (a Path), or an object-store URL kept as text."""
    from cmdtool.objectstore.url import is_url

    return value if is_url(value) else Path(value)  # type: ignore[return-value]


SourceArg = Annotated[
    Path,
    typer.Argument(
        help="Folder of checkpoints, or an object-store URL (s3://bucket/run).",
        parser=_source_location,
        metavar="SOURCE",
    ),
]


def _store_location(value: str) -> Path:
    """STORE as given: a folder (a Path), or an object-store URL kept as text (a Path
    would fold its ``//``); the store layer tells them apart."""
    from cmdtool.store.objects import is_url

    return value if is_url(value) else Path(value)  # type: ignore[return-value]


StoreArg = Annotated[
    Path,
    typer.Argument(
        help="Trajectory store: a zarr v3 folder, or an object-store URL (s3://bucket/prefix).",
        parser=_store_location,
        metavar="STORE",
    ),
]
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


#: Exit status when the reader of stdout goes away (``cmdtool info S | head -1``): what a
#: shell reports for a program ended by SIGPIPE (128 + 13), as ``yes | head -1`` does.
EXIT_PIPE_CLOSED = 141


class _PipeClosed(BaseException):
    """stdout's reader is gone. A BaseException, like KeyboardInterrupt, so that it passes
    through ``handle_errors`` and click's handlers to :func:`main`."""


class _PipeGuard:
    """``sys.stdout`` that turns a closed pipe into :class:`_PipeClosed`."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            raise _PipeClosed from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise _PipeClosed from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main() -> None:
    """Console-script entry point.

    A closed stdout pipe ends the command quietly (nothing on stderr) with exit status
    :data:`EXIT_PIPE_CLOSED`; SIGPIPE itself stays ignored, so a write to the store is
    never cut short by it (the command stops at its next print, between store writes).
    """
    stdout = sys.stdout
    sys.stdout = _PipeGuard(stdout)  # type: ignore[assignment]
    try:
        try:
            app()
        finally:
            sys.stdout.flush()
    except _PipeClosed:
        # nothing more can reach the reader; keep the interpreter's final flush quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
        sys.stdout = stdout
        sys.exit(EXIT_PIPE_CLOSED)
