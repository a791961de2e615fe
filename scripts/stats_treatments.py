"""Normalization-statistics treatments side by side (issue 12; the README table).

    python scripts/stats_treatments.py WORK [--runs sample,cnn1,cnn2,mlp,transformer]
                                            [--epochs 60] [--seeds 0]

For each run (the shipped sample, then the runs of ``scripts/make_extra_runs.py``,
trained into WORK when missing): ingest, ``CMD(10, K = 1000)`` for each sampling seed,
then the held-out accuracy of the raw checkpoint and of the CMD checkpoint at every
epoch with each ``--stats`` treatment. Prints one Markdown row per (run, treatment):
last-10 mean ± std, minimum over the epochs, worst epoch against raw. Also checks that
no rebuilt checkpoint at any epoch holds a negative or non-finite variance.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from make_extra_runs import evaluator, make  # noqa: E402

from cmdtool.decomposition import CMD  # noqa: E402
from cmdtool.ingestion import ingest  # noqa: E402
from cmdtool.reconstruction import raw_state, rebuild_state  # noqa: E402
from cmdtool.store.normstats import STATS_CHOICES  # noqa: E402

VAR = re.compile(r"(^|\.)running_var$")


def run_folder(work: Path, name: str, epochs: int) -> tuple[Path, str]:
    if name == "sample":
        return REPO / "sample_checkpoints", "cnn"
    folder = work / name
    if not (folder / "run").is_dir() or len(list((folder / "run").iterdir())) < epochs:
        shutil.rmtree(folder, ignore_errors=True)
        make(work, name, epochs)
    return folder, "cnn" if name.startswith("cnn") else name


def measure(work: Path, name: str, epochs: int, seeds: list[int]) -> list[str]:
    folder, kind = run_folder(work, name, epochs)
    acc = evaluator(kind, folder / "heldout.safetensors")
    store = work / f"{name}.zarr"
    if not store.exists():
        ingest(folder / "run", store)
    rows: list[str] = []
    for seed in seeds:
        model = CMD(10, n_samples=1000, seed=seed).fit(store, name=f"s{seed}")
        labels = model.store_.labels
        raw = np.array([acc(raw_state(model.store_, t)) for t in labels])
        has_stats = bool(model.summary_.get("stats_tensors"))
        choices = STATS_CHOICES if has_stats else ("gated",)
        if seed == seeds[0]:
            rows.append(_row(name, seed, "raw checkpoints", raw, raw, model))
        for stats in choices:
            cmd = []
            for t in labels:
                state = rebuild_state(model, t, stats=stats)
                for k, v in state.items():
                    if VAR.search(k) and not (torch.isfinite(v).all() and (v >= 0).all()):
                        raise SystemExit(f"{name} epoch {t} --stats {stats}: bad variance {k}")
                cmd.append(acc(state))
            what = stats if has_stats else "CMD (no running statistics)"
            rows.append(_row(name, seed, what, np.array(cmd), raw, model))
            print(rows[-1], flush=True)
    return rows


def _row(name: str, seed: int, what: str, a: np.ndarray, raw: np.ndarray, model: CMD) -> str:
    last = a[-10:]
    return (
        f"| {name} | {seed} | {what} | {last.mean():.4f} ± {last.std():.4f} | "
        f"{np.nanmin(a):.4f} | {np.nanmin(a - raw):+.4f} | {model.n_constant_} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--runs", default="sample,cnn1,cnn2,mlp,transformer")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = [
        "| run | sampling seed | statistics | last 10: mean ± std | min over epochs "
        "| worst epoch - raw | constant params |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.runs.split(","):
        rows += measure(args.work, name, args.epochs, seeds)
    print("\n".join(rows))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
