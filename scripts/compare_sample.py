"""The README's "Compare" table and figure: ``cmdtool compare`` on the shipped sample.

    python scripts/compare_sample.py [--out docs/compare_sample.png] [--ranks 2,10]

Ingests ``sample_checkpoints/run`` into a temporary store, runs the library call under
``cmdtool compare STORE --ranks 2,10 --eval sample_checkpoints/digits_cnn.py:evaluate``
(all five methods, every epoch; CMD fitted with the defaults: 10 modes, K = 1000, seed
0), prints the markdown table (relative error over the window, stored values, seconds,
held-out accuracy over the last 10 epochs: mean ± standard deviation) and saves a
two-panel figure: relative error per epoch of every method, and held-out accuracy per
epoch (the paper's Fig. 5).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "compare_sample.png"))
    parser.add_argument("--ranks", default="2,10")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmdtool import compare, ingest
    from cmdtool.evaluation import load_eval_function
    from cmdtool.report.compare import draw_errors, draw_metric

    fn = load_eval_function(str(REPO / "sample_checkpoints" / "digits_cnn.py") + ":evaluate")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store.zarr"
        ingest(REPO / "sample_checkpoints" / "run", store)
        res = compare(store, ranks=args.ranks, eval=fn)
    cmp = res.to_json()
    n_ep = len(res.epochs)
    metric = res.metrics[0]
    print(f"| method | rank | rel. error | stored values | seconds | {metric}, last 10 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    raw = res.raw_metric[metric] if res.raw_metric else None
    if raw:
        print(f"| stored (SGD) | | 0 | {res.n_params * n_ep:,} | | "
              f"{raw['last_mean']:.4f} ± {raw['last_spread']:.4f} |")  # fmt: skip
    for m in res.methods:
        acc = (m.metric or {}).get(metric) or {}
        rank = "" if m.rank is None else str(m.rank)
        print(
            f"| {m.method} | {rank} | {m.relative_error:.4f} | {m.stored_values:,} | "
            f"{m.seconds:.2f} | {acc.get('last_mean', float('nan')):.4f} ± "
            f"{acc.get('last_spread', float('nan')):.4f} |"
        )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8))
    draw_errors(ax1, cmp)
    draw_metric(ax2, cmp, metric)
    ax1.set_title("relative error per epoch")
    ax2.set_title(f"held-out {metric} per epoch")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
