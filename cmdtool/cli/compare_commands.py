"""``cmdtool compare``: CMD side by side with PCA, exact DMD, EMA and SWA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cmdtool.cli.app import (
    ClusterOpt,
    JsonOpt,
    NameOpt,
    StoreArg,
    app,
    emit_json,
    handle_errors,
    out,
    plain,
    progress_bar,
)

EVAL_HELP = (
    "Function (state dict -> dict of metric -> float): pkg.mod:fn or path/file.py:fn, run "
    "on every rebuilt checkpoint. The file is run as code: use only code you trust."
)


def _pm(entry: dict[str, object] | None) -> str:
    if not entry:
        return "-"
    mean, spread = entry.get("last_mean"), entry.get("last_spread")
    if not isinstance(mean, float | int):
        return "nan"
    return f"{mean:.4f} ± {spread:.4f}" if isinstance(spread, float | int) else f"{mean:.4f}"


@app.command()
def compare(
    store: StoreArg,
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated: cmd, pca, dmd, ema, swa.")
    ] = "cmd,pca,dmd,ema,swa",
    ranks: Annotated[
        str | None,
        typer.Option(
            "--ranks",
            help="PCA components d and DMD ranks r, each >= 1 and < the window's epochs "
            "[default: 1,2,5,10, those below the window's epochs]",
        ),
    ] = None,
    epochs: Annotated[
        str | None,
        typer.Option(
            "--epochs",
            help="Window A:B (labels, half-open). [default: the decomposition's, else all]",
        ),
    ] = None,
    stride: Annotated[
        int | None, typer.Option("--stride", help="Every S-th epoch of the window.")
    ] = None,
    eval_target: Annotated[
        str | None, typer.Option("--eval", metavar="MODULE:FUNCTION", help=EVAL_HELP)
    ] = None,
    name: NameOpt = "cmd",
    write: Annotated[
        Path | None,
        typer.Option(
            "--write", metavar="OUT", help="Write OUT/<method>[-<rank>]/epoch_<label>.safetensors."
        ),
    ] = None,
    ema_decay: Annotated[
        float, typer.Option("--ema-decay", help="EMA decay beta, 0 < beta < 1.")
    ] = 0.9,
    swa_epochs: Annotated[
        int | None,
        typer.Option(
            "--swa-epochs",
            help="SWA averages the last k epochs (1 <= k <= window) [default: min(10, window/4)]",
        ),
    ] = None,
    cluster: ClusterOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare CMD with PCA, exact DMD, EMA and SWA on the same window, out of core."""
    from cmdtool.baselines.settings import check_settings

    with handle_errors(), progress_bar("compare", not as_json) as bar:
        # bad options fail here, before torch is imported and before anything is written
        check_settings(
            store, methods=methods, ranks=ranks, epochs=epochs, stride=stride, name=name,
            write=write, ema_decay=ema_decay, swa_epochs=swa_epochs,
        )  # fmt: skip
        from cmdtool.baselines.comparison import compare as run_compare

        fn = None
        if eval_target is not None:
            from cmdtool.evaluation import load_eval_function

            fn = load_eval_function(eval_target)
        result = run_compare(
            store,
            methods=methods,
            ranks=ranks,
            epochs=epochs,
            stride=stride,
            eval=fn,
            name=name,
            write=write,
            cluster=cluster,
            ema_decay=ema_decay,
            swa_epochs=swa_epochs,
            progress=bar,
        )
        if eval_target is not None:
            result.function = eval_target
    if as_json:
        data = result.to_json()
        data["function"] = eval_target
        data["stored"] = result.stored
        data["written"] = len(result.written)
        emit_json(data)
        return
    n_ep = len(result.epochs)
    table = Table(
        title=f"compare on epochs {result.epochs[0]}..{result.epochs[-1]} "
        f"({n_ep} epochs, stride {result.stride}), N = {result.n_params:,}"
    )
    table.add_column("method")
    table.add_column("rank", justify="right")
    table.add_column("rel. error", justify="right")
    table.add_column("stored values", justify="right")
    table.add_column("seconds", justify="right")
    for metric in result.metrics:
        table.add_column(f"{plain(metric)} last {min(10, n_ep)}", justify="right")
    if result.raw_metric is not None:
        cells = ["stored (raw)", "", "", f"{result.n_params * n_ep:,}", ""]
        cells += [_pm(result.raw_metric.get(m)) for m in result.metrics]
        table.add_row(*cells)
    for m in result.methods:
        cells = [
            m.method,
            "" if m.rank is None else str(m.rank),
            f"{m.relative_error:.4f}",
            f"{m.stored_values:,}",
            f"{m.seconds:.2f}",
        ]
        cells += [_pm((m.metric or {}).get(k)) for k in result.metrics]
        table.add_row(*cells)
    out.print(table)
    if result.stored:
        out.print(f"stored in {store}/{result.name} (cmdtool report shows it)", highlight=False)
    else:
        out.print(
            f"not stored: the store has no decomposition {name!r} (add cmd to --methods)",
            highlight=False,
        )
    if result.written:
        out.print(f"wrote {len(result.written)} checkpoint(s) under {write}", highlight=False)
