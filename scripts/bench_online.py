"""Benchmark online CMD: ``OnlineCMD.step()`` against a training epoch, and ``update``
against the length of the history; writes the "Online CMD" section of BENCHMARKS.md.

    python scripts/bench_online.py [--out BENCHMARKS.md] [--n 1000000]

1. The sample CNN (``sample_checkpoints/digits_cnn.py``, 9,850 parameters) trained with
   the sample's recipe, ``OnlineCMD(warmup=10)`` stepping after each epoch: the mean and
   largest ``step()`` time after the warm-up, during it (one store row per epoch) and the
   one step that ends it (the decomposition), each against the mean epoch time. Torch
   uses 1 thread, as the sample's training does.
2. ``update`` on a planted store of N parameters (rows written with the store API): for
   histories of T0 = 10, 40 and 160 epochs, decomposed over those, then k = 1, 4 and 16
   new epochs appended and folded in one after the other; wall time of each ``update``
   and, for scale, of a batch ``decompose`` over the same longer window.

The section between the markers below in ``--out`` is replaced; the rest is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sample_checkpoints"))
sys.path.insert(0, str(REPO / "scripts"))
from digits_cnn import build_model  # noqa: E402
from make_sample_checkpoints import load_split, train_epoch  # noqa: E402

from cmdtool.decomposition import CMD  # noqa: E402
from cmdtool.decomposition.update import update  # noqa: E402
from cmdtool.ingestion import create_store  # noqa: E402
from cmdtool.online import OnlineCMD  # noqa: E402
from cmdtool.store import EpochInfo, ParamInfo, TrajectoryStore  # noqa: E402

BEGIN = "<!-- bench_online.py begin -->"
END = "<!-- bench_online.py end -->"
STEP_LIMIT = 0.02  # step() under 2% of a training epoch
REPEATS = 3  # best of, for update


def bench_step(epochs: int, warmup: int) -> list[str]:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x_tr, y_tr, _, _, _, _ = load_split(0)
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    cmd = OnlineCMD(model, warmup=warmup, modes=10, samples=1000)
    epoch_s: list[float] = []
    steps: dict[str, list[float]] = {"during warm-up": [], "ending warm-up": [], "after": []}
    for e in range(1, epochs + 1):
        t0 = time.perf_counter()
        train_epoch(model, opt, loss_fn, x_tr, y_tr, gen, 16)
        epoch_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cmd.step()
        dt = time.perf_counter() - t0
        key = "after" if e > warmup else "ending warm-up" if e == warmup else "during warm-up"
        steps[key].append(dt)
    cmd.close()
    epoch = statistics.mean(epoch_s)
    after = statistics.mean(steps["after"])
    lines = [
        f"Sample CNN ({cmd.n_params_:,} parameters), {epochs} epochs, warm-up {warmup}, "
        f"torch 1 thread: one training epoch takes {epoch * 1e3:.0f} ms "
        f"(min {min(epoch_s) * 1e3:.0f}, max {max(epoch_s) * 1e3:.0f}).",
        "",
        "| `OnlineCMD.step()` | calls | mean | max | mean / epoch |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, vals in steps.items():
        mean = statistics.mean(vals)
        lines.append(
            f"| {key} | {len(vals)} | {mean * 1e3:.2f} ms | {max(vals) * 1e3:.2f} ms | "
            f"{mean / epoch:.2%} |"
        )
    verdict = "PASS" if after / epoch < STEP_LIMIT else "**FAIL**"
    lines += [
        "",
        f"Target `step()` < 2% of an epoch (after the warm-up): {after / epoch:.2%}, {verdict}. "
        "The warm-up steps write one row to the warm-up store; the step ending the warm-up "
        "runs the one decomposition (sampling, linkage of K = 1000, the streamed pass).",
    ]
    return lines


def _append_rows(st: TrajectoryStore, first_label: int, rows: np.ndarray) -> None:
    for i, row in enumerate(rows):
        label = first_label + i
        st.append_epoch([(0, row)], EpochInfo(label=label, source=f"planted/{label}"))


def bench_update(n: int, histories: list[int], news: list[int], folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    t_max = max(histories) + sum(news)
    profiles = np.cumsum(rng.normal(size=(10, t_max)), axis=1).astype(np.float32)
    groups = rng.integers(0, 10, size=n)
    a = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32)

    def rows(t0: int, t1: int) -> np.ndarray:
        out = np.empty((t1 - t0, n), dtype=np.float32)
        for i, t in enumerate(range(t0, t1)):
            out[i] = a * profiles[groups, t] + b + 0.1 * rng.normal(size=n).astype(np.float32)
        return out

    lines = [
        f"`update` on a planted store, N = {n:,} ({n * 4 / 1e6:.0f} MB per epoch), 10 modes, "
        "K = 1000; each history decomposed first, then k new epochs appended and folded in "
        "(one `update` per line, in this order). The batch `decompose` over the same "
        "longer window is shown for scale.",
        "",
        f"| epochs before | new epochs k | `update` (best of {REPEATS}) | rows read "
        "| batch `decompose` |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for t0 in histories:
        path = folder / f"h{t0}.zarr"
        info = ParamInfo("w", (n,), "float32", 0)
        with create_store(path, [info]) as st:
            _append_rows(st, 1, rows(0, t0))
        CMD(10, n_samples=1000).fit(path)
        done = t0
        for k in news:
            with TrajectoryStore.open(path, mode="r+") as st:
                _append_rows(st, done + 1, rows(done, done + k))
            before = done
            done += k
            saved = folder / "cmd-before-update"
            shutil.copytree(path / "cmd", saved)
            times = []
            for _ in range(REPEATS):  # the same update again from the saved decomposition
                shutil.rmtree(path / "cmd")
                shutil.copytree(saved, path / "cmd")
                t_start = time.perf_counter()
                s = update(path)
                times.append(time.perf_counter() - t_start)
            shutil.rmtree(saved)
            upd = min(times)
            t_start = time.perf_counter()
            CMD(10, n_samples=1000).fit(path, name="batch")
            batch = time.perf_counter() - t_start
            lines.append(f"| {before} | {k} | {upd:.3f} s | {s.rows_read} | {batch:.3f} s |")
    lines += [
        "",
        "`update` reads the k new rows and the decomposition's O(N) arrays (labels, three "
        "float64 sums: 28 bytes per parameter) and writes a new decomposition (36 bytes per "
        "parameter), so its time depends on N and k, not on the epochs before.",
    ]
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)

    lines = [
        BEGIN,
        "## Online CMD (`scripts/bench_online.py`)",
        "",
        f"Machine: {machine()}. Run: `python scripts/bench_online.py` "
        f"({time.strftime('%Y-%m-%d')}).",
        "",
        *bench_step(args.epochs, warmup=10),
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="cmdtool-bench-online-") as tmp:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        lines += bench_update(args.n, [10, 40, 160], [1, 4, 16], Path(tmp))
    lines.append(END)
    section = "\n".join(lines) + "\n"
    print(section)
    text = args.out.read_text() if args.out.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        marker = "<!-- bench.py output below -->"
        head, sep, tail = text.partition(marker)
        text = head + section + "\n" + sep + tail if sep else text + "\n" + section
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
