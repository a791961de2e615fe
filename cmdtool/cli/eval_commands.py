"""Commands that evaluate rebuilt checkpoints: ``evaluate`` (and its CI gate), ``sweep``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cmdtool.cli.app import (
    JsonOpt,
    NameOpt,
    StoreArg,
    app,
    emit_json,
    fmt,
    handle_errors,
    out,
    plain,
    progress_bar,
)

EVAL_HELP = (
    "Function (state dict -> dict of metric -> float): pkg.mod:fn or path/file.py:fn. "
    "The file is run as code, like 'python file.py': use only code you trust."
)
EvalOpt = Annotated[
    str | None,
    typer.Option("--eval", metavar="MODULE:FUNCTION", help=EVAL_HELP),
]



@app.command()
def evaluate(
    store: StoreArg,
    eval_target: Annotated[
        str,
        typer.Option("--eval", metavar="MODULE:FUNCTION", help=EVAL_HELP),
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
            "raw's minus TOL (TOL 0 when not given).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate the raw and the CMD checkpoint of each epoch with a user function."""
    from cmdtool.evaluation import check_gate, parse_gate
    from cmdtool.evaluation import evaluate as run_evaluate

    with handle_errors(), progress_bar("evaluate", not as_json) as bar:
        gate = parse_gate(fail_if_worse) if fail_if_worse is not None else None
        result = run_evaluate(store, eval_target, epochs=epochs, name=name, progress=bar)
    if as_json:
        emit_json(result.to_json())
    else:
        table = Table(title=f"raw and CMD ('{name}') checkpoints")
        table.add_column("epoch", justify="right")
        for m in result.metrics:
            table.add_column(f"{plain(m)} raw", justify="right")
            table.add_column(f"{plain(m)} CMD", justify="right")
        for i, label in enumerate(result.epochs):
            cells = [str(label)]
            for m in result.metrics:
                cells += [fmt(result.raw[m][i]), fmt(result.cmd[m][i])]
            table.add_row(*cells)
        out.print(table)
        out.print(f"metrics from {result.function}, stored in {store}/{name}", highlight=False)
    if gate is not None:
        with handle_errors():
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
        int | None, typer.Option("--samples", help="K. [default: the decomposition's]")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Sampling seed. [default: the decomposition's]")
    ] = None,
    epochs: Annotated[
        str | None,
        typer.Option("--epochs", help="Window A:B (half-open). [default: the decomposition's]"),
    ] = None,
    name: NameOpt = "cmd",
    as_json: JsonOpt = False,
) -> None:
    """Fit CMD for several numbers of modes: error (and metrics) against M."""
    from cmdtool.errors import UsageError
    from cmdtool.evaluation import sweep as run_sweep

    with handle_errors(), progress_bar("sweep", not as_json) as bar:
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
        emit_json(result.to_json())
        return
    table = Table(title=f"sweep of the number of modes (window {result.window})")
    table.add_column("M", justify="right")
    table.add_column("found", justify="right")
    table.add_column("rel. error", justify="right")
    for metric in result.metrics:
        table.add_column(f"{plain(metric)} CMD @ {result.epoch}", justify="right")
    for i, m in enumerate(result.modes):
        cells = [str(m), str(result.n_modes_found[i]), f"{result.relative_error[i]:.4f}"]
        cells += [fmt(result.metrics[k][i]) for k in result.metrics]
        table.add_row(*cells)
    out.print(table)
    for k, v in result.raw_metrics.items():
        out.print(f"raw {k} at epoch {result.epoch}: {fmt(v)}", highlight=False)


