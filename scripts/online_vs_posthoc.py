"""Online, embedded and post-hoc CMD on the sample task (the follow-up paper's comparison).

    python scripts/online_vs_posthoc.py [--epochs 60] [--seed 0] [--out table.md]

Trains the sample CNN on scikit-learn's digits with the recipe of
``scripts/make_sample_checkpoints.py`` (same seed: the SGD run is the shipped sample run)
twice:

1. plain SGD. ``OnlineCMD`` with warm-up 10 and with warm-up 20 follow it (they only read
   the parameters), and one checkpoint per epoch goes to a temporary folder; after the run,
   post-hoc CMD (``cmdtool ingest`` + ``decompose``, 10 modes, K = 1000, all epochs) is
   fitted on those checkpoints;
2. embedded CMD: the same seed with ``EmbeddedCMD(warmup=20, every=5, fraction=0.1)``
   freezing parameters to their CMD values as training goes (SGD with momentum and weight
   decay, passed to it so that frozen entries stay put).

Held-out accuracy per epoch of: the raw SGD weights, post-hoc CMD, online CMD (its
``state_dict()``: the CMD values of the parameters; BatchNorm running statistics, which
are buffers, come from the live model), and the embedded run's own weights, with the
share of parameters frozen. Prints a markdown table (every 5th epoch, then the mean and
standard deviation over the last 10 epochs) and the measured cost of ``step()``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sample_checkpoints"))
sys.path.insert(0, str(REPO / "scripts"))
from digits_cnn import accuracy, build_model  # noqa: E402
from make_sample_checkpoints import load_split, train_epoch  # noqa: E402

from cmdtool.decomposition import CMD  # noqa: E402
from cmdtool.ingestion import ingest  # noqa: E402
from cmdtool.online import EmbeddedCMD, OnlineCMD  # noqa: E402
from cmdtool.reconstruction import rebuild_state  # noqa: E402

COLUMNS = ["SGD", "post-hoc CMD", "online F=10", "online F=20", "embedded", "frozen"]


def _setup(seed: int, lr: float, weight_decay: float) -> tuple[nn.Module, torch.optim.SGD]:
    torch.manual_seed(seed)
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    return model, opt


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _with_params(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict with its parameters replaced (buffers kept)."""
    return {**_snapshot(model), **{k: v.detach() for k, v in params.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    x_tr, y_tr, x_te, y_te, _, _ = load_split(args.seed)
    heldout = Path(tempfile.mkdtemp(prefix="cmdtool-online-")) / "heldout.safetensors"
    save_file({"x": x_te, "y": y_te}, str(heldout))
    loss_fn = nn.CrossEntropyLoss()
    acc: dict[str, dict[int, float]] = {c: {} for c in COLUMNS}
    epoch_s: list[float] = []
    step_s: dict[str, list[float]] = {"warm-up": [], "end of warm-up": [], "after": []}

    def timed_step(cmd: OnlineCMD) -> None:
        t0 = time.perf_counter()
        cmd.step()
        dt = time.perf_counter() - t0
        phase = (
            "after"
            if cmd.n_epochs_ > cmd.warmup
            else "end of warm-up"
            if cmd.n_epochs_ == cmd.warmup
            else "warm-up"
        )
        step_s[phase].append(dt)

    # 1. plain SGD, followed by online CMD; checkpoints for post-hoc CMD
    run_dir = heldout.parent / "run"
    run_dir.mkdir()
    model, opt = _setup(args.seed, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    online = {
        f: OnlineCMD(model, warmup=f, modes=10, samples=1000, total_epochs=args.epochs)
        for f in (10, 20)
    }
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        train_epoch(model, opt, loss_fn, x_tr, y_tr, gen, args.batch_size)
        epoch_s.append(time.perf_counter() - t0)
        state = _snapshot(model)
        save_file(state, str(run_dir / f"epoch_{epoch:03d}.safetensors"))
        acc["SGD"][epoch] = accuracy(state, heldout=heldout)
        for f, cmd in online.items():
            timed_step(cmd)
            if cmd.warmup_finished_:
                acc[f"online F={f}"][epoch] = accuracy(
                    _with_params(model, cmd.state_dict()), heldout=heldout
                )
        print(f"epoch {epoch:3d}  SGD {acc['SGD'][epoch]:.4f}", file=sys.stderr)
    for cmd in online.values():
        cmd.close()

    store = heldout.parent / "store.zarr"
    ingest(run_dir, store)
    posthoc = CMD(10, n_samples=1000).fit(store)
    for epoch in range(1, args.epochs + 1):
        acc["post-hoc CMD"][epoch] = accuracy(rebuild_state(posthoc, epoch), heldout=heldout)

    # 2. embedded CMD
    model, opt = _setup(args.seed, args.lr, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    embedded = EmbeddedCMD(
        model, opt, warmup=20, every=5, fraction=0.1, modes=10, samples=1000,
        total_epochs=args.epochs,
    )  # fmt: skip
    for epoch in range(1, args.epochs + 1):
        train_epoch(model, opt, loss_fn, x_tr, y_tr, gen, args.batch_size)
        embedded.step()
        acc["embedded"][epoch] = accuracy(_snapshot(model), heldout=heldout)
        acc["frozen"][epoch] = embedded.frozen_fraction_ if embedded.warmup_finished_ else 0.0
    embedded.close()

    table = _table(acc, args.epochs)
    mean_epoch = statistics.mean(epoch_s)
    timing = (
        f"\nTraining epoch (1 thread): {mean_epoch * 1e3:.0f} ms. OnlineCMD.step(): "
        f"{statistics.mean(step_s['after']) * 1e3:.2f} ms after warm-up "
        f"({statistics.mean(step_s['after']) / mean_epoch:.2%} of an epoch), "
        f"{statistics.mean(step_s['warm-up']) * 1e3:.1f} ms during warm-up (one store row), "
        f"{statistics.mean(step_s['end of warm-up']) * 1e3:.0f} ms at the end of warm-up "
        "(the one decomposition).\n"
    )
    print(table + timing)
    if args.out:
        args.out.write_text(table + timing)
    return 0


def _table(acc: dict[str, dict[int, float]], epochs: int) -> str:
    def cell(col: str, epoch: int) -> str:
        v = acc[col].get(epoch)
        if v is None:
            return "warm-up"
        return f"{v:.1%}" if col == "frozen" else f"{v:.4f}"

    lines = [
        "| epoch | " + " | ".join(COLUMNS) + " |",
        "| ---: | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    shown = sorted({*range(5, epochs + 1, 5), epochs})
    for e in shown:
        lines.append(f"| {e} | " + " | ".join(cell(c, e) for c in COLUMNS) + " |")
    last = range(max(1, epochs - 9), epochs + 1)
    stats = []
    for c in COLUMNS:
        vals = [acc[c][e] for e in last if e in acc[c]]
        if c == "frozen" or len(vals) < 2:
            stats.append(cell(c, epochs))
        else:
            # ± the population standard deviation (ddof=0), as cmdtool compare and the README
            stats.append(f"{statistics.mean(vals):.4f} ± {statistics.pstdev(vals):.4f}")
    lines.append(f"| last {len(last)} (mean ± std) | " + " | ".join(stats) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
