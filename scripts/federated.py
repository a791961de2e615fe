"""FedAvg on a non-IID split of scikit-learn's digits, with and without embedded CMD on
the server (``cmdtool.online.federated``), counting the parameters communicated exactly.

A plain in-process simulation (no Flower: see the README, "Federated learning"). C
clients each hold mostly two or three classes; each round every client trains the global
model for E local epochs and sends it back; the server averages (weighted by sample
counts). With embedded CMD the server freezes, after a warm-up of F rounds and every L
rounds, the P% of the remaining parameters that moved least; frozen parameters are
neither sent nor trained. Held-out accuracy is measured each round on a validation split
(used to choose F, L, P) and a test split (reported).

Usage::

    python scripts/federated.py                       # the README table and figure
    python scripts/federated.py --seeds 0 --rounds 20 # a quick look
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmdtool.online.federated import FederatedClient, FederatedCMD  # noqa: E402


@dataclass
class Data:
    x_train: np.ndarray  # float32 (n, 64)
    y_train: np.ndarray  # int64 (n,)
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(split_seed: int = 0) -> Data:
    """Digits, scaled to [0, 1]; 25% test and 15% validation, stratified, fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=split_seed
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.2, stratify=y_rest, random_state=split_seed
    )
    return Data(
        x_train,
        y_train,
        torch.from_numpy(x_val),
        torch.from_numpy(y_val),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
    )


def major_classes(client: int, n_clients: int, n_classes: int = 10) -> list[int]:
    """Client c's main classes: two (even c) or three (odd c) consecutive ones."""
    start = (client * n_classes) // n_clients
    return [(start + j) % n_classes for j in range(2 + client % 2)]


def partition(
    y: np.ndarray, n_clients: int, rng: np.random.Generator, major_share: float = 0.85
) -> list[np.ndarray]:
    """Non-IID split: ``major_share`` of each class goes to the clients holding it as a
    main class, the rest (and classes nobody holds) uniformly to all clients.

    Returns
    -------
    list of C int64 arrays of sample indices
    """
    owners: dict[int, list[int]] = {}
    for c in range(n_clients):
        for k in major_classes(c, n_clients):
            owners.setdefault(k, []).append(c)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for k in np.unique(y):
        idx = rng.permutation(np.nonzero(y == k)[0])
        own = owners.get(int(k), [])
        n_major = round(major_share * len(idx)) if own else 0
        for j, i in enumerate(idx[:n_major]):
            parts[own[j % len(own)]].append(int(i))
        for i in idx[n_major:]:
            parts[int(rng.integers(n_clients))].append(int(i))
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch: int,
    gen: torch.Generator,
    client: FederatedClient | None = None,
) -> None:
    """E epochs of minibatch SGD; with ``client``, frozen entries are not trained."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    masks = client.frozen_masks() if client is not None else {}
    params = dict(model.named_parameters())
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch):
            b = order[s : s + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[b]), y[b]).backward()
            for name, m in masks.items():
                g = params[name].grad
                if g is not None and bool(m.any()):
                    g.masked_fill_(m, 0.0)
            opt.step()
    if client is not None:
        client.restore_frozen()


def run(
    seed: int, data: Data, args: argparse.Namespace, *, with_cmd: bool
) -> dict[str, np.ndarray]:
    """One FedAvg run. Per round: val/test accuracy, numbers sent down/up, frozen count."""
    rng = np.random.default_rng(seed)
    parts = partition(data.y_train, args.clients, rng)
    torch.manual_seed(seed)
    global_model = make_model(args.hidden)
    n = sum(p.numel() for p in global_model.parameters())
    models = [make_model(args.hidden) for _ in range(args.clients)]
    xs = [torch.from_numpy(data.x_train[p]) for p in parts]
    ys = [torch.from_numpy(data.y_train[p]) for p in parts]
    sizes = [len(p) for p in parts]
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[float]] = {k: [] for k in ("val", "test", "down", "up", "frozen")}
    server = clients = None
    if with_cmd:
        server = FederatedCMD(
            global_model,
            args.clients,
            warmup=args.warmup,
            every=args.every,
            percent=args.percent,
            modes=args.modes,
            seed=seed,
            rounds=args.rounds,
        )
        clients = [FederatedClient(m) for m in models]
    for _ in range(args.rounds):
        if server is not None and clients is not None:
            plan = server.round_plan()
            message = server.broadcast()
            for m, cl, x, y in zip(models, clients, xs, ys, strict=True):
                cl.receive(plan, message)
                local_train(
                    m,
                    x,
                    y,
                    epochs=args.local_epochs,
                    lr=args.lr,
                    batch=args.batch,
                    gen=gen,
                    client=cl,
                )
            counts = server.aggregate([cl.send() for cl in clients], weights=sizes)
            down, up, frozen = counts.down, counts.up, counts.frozen
        else:
            state = global_model.state_dict()
            for m, x, y in zip(models, xs, ys, strict=True):
                m.load_state_dict(state)
                local_train(
                    m, x, y, epochs=args.local_epochs, lr=args.lr, batch=args.batch, gen=gen
                )
            w = np.asarray(sizes, dtype=np.float64) / sum(sizes)
            with torch.no_grad():
                for name, p in global_model.named_parameters():
                    acc = torch.zeros(p.shape, dtype=torch.float64)
                    for wj, m in zip(w, models, strict=True):
                        acc += float(wj) * dict(m.named_parameters())[name].double()
                    p.copy_(acc)
            down = up = args.clients * n
            frozen = 0
        out["val"].append(accuracy(global_model, data.x_val, data.y_val))
        out["test"].append(accuracy(global_model, data.x_test, data.y_test))
        out["down"].append(down)
        out["up"].append(up)
        out["frozen"].append(frozen)
    if server is not None:
        server.close()
    res = {k: np.asarray(v) for k, v in out.items()}
    for k in ("down", "up", "frozen"):
        res[k] = res[k].astype(np.int64)
    res["n_params"] = np.int64(n)  # type: ignore[assignment]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=10, help="F, rounds")
    ap.add_argument("--every", type=int, default=5, help="L, rounds between checks")
    ap.add_argument("--percent", type=float, default=20.0, help="P, percent frozen per check")
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--table", type=Path, default=ROOT / "docs" / "federated.md")
    ap.add_argument("--csv", type=Path, default=ROOT / "docs" / "federated.csv")
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "federated.png")
    ap.add_argument("--no-output", action="store_true", help="print only, write nothing")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_data()
    t0 = time.process_time()
    plain = [run(s, data, args, with_cmd=False) for s in seeds]
    cmd = [run(s, data, args, with_cmd=True) for s in seeds]
    cpu = time.process_time() - t0
    rounds = np.arange(1, args.rounds + 1)

    def stack(runs: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
        return np.stack([r[key] for r in runs])  # (seeds, rounds)

    acc_p, acc_c = stack(plain, "test"), stack(cmd, "test")
    val_p, val_c = stack(plain, "val"), stack(cmd, "val")
    # communication is the same for every seed of plain FedAvg; for CMD it may differ
    com_p = np.cumsum(stack(plain, "down") + stack(plain, "up"), axis=1)
    com_c = np.cumsum(stack(cmd, "down") + stack(cmd, "up"), axis=1)
    saved = 1.0 - com_c.astype(np.float64) / com_p
    frozen = stack(cmd, "frozen") / int(plain[0]["n_params"])

    show = sorted({*range(10, args.rounds + 1, 10), args.warmup, args.rounds})
    lines = [
        f"FedAvg, {args.clients} clients (non-IID digits), N = {int(plain[0]['n_params'])} "
        f"parameters, E = {args.local_epochs}, seeds {args.seeds}; embedded CMD: "
        f"F = {args.warmup}, L = {args.every}, P = {args.percent:g}%, M = {args.modes}",
        "",
        "| round | FedAvg test acc | CMD test acc | FedAvg params sent (cum.) "
        "| CMD params sent (cum.) | share saved | frozen |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def pm(a: np.ndarray) -> str:
        return f"{100 * a.mean():.2f} ± {100 * a.std():.2f}"

    for r in show:
        i = r - 1
        lines.append(
            f"| {r} | {pm(acc_p[:, i])} | {pm(acc_c[:, i])} | {int(com_p[0, i]):,} "
            f"| {int(com_c[:, i].mean()):,} | {100 * saved[:, i].mean():.1f}% "
            f"| {100 * frozen[:, i].mean():.1f}% |"
        )
    last5 = slice(max(0, args.rounds - 5), args.rounds)
    lines += [
        "",
        f"Final test accuracy: FedAvg {pm(acc_p[:, -1])}, embedded CMD {pm(acc_c[:, -1])} "
        f"(difference {100 * (acc_c[:, -1] - acc_p[:, -1]).mean():+.2f} points; mean of the "
        f"last 5 rounds: {100 * acc_p[:, last5].mean():.2f} vs {100 * acc_c[:, last5].mean():.2f})",
        f"Final validation accuracy: FedAvg {pm(val_p[:, -1])}, embedded CMD {pm(val_c[:, -1])}",
        f"Parameters communicated: embedded CMD sends {100 * (1 - saved[:, -1].mean()):.1f}% "
        f"of plain FedAvg's ({100 * saved[:, -1].mean():.1f}% fewer)",
        f"CPU time {cpu:.1f} s (user+sys of this process)",
        "(± is the population standard deviation over the seeds; accuracy in percent)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.no_output:
        return 0
    args.table.write_text(text + "\n")
    with args.csv.open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(
            ["seed", "round", "method", "val_acc", "test_acc", "down", "up", "cum_params", "frozen"]
        )
        for name, runs in (("fedavg", plain), ("cmd", cmd)):
            for s, r in zip(seeds, runs, strict=True):
                cum = np.cumsum(r["down"] + r["up"])
                for i in range(args.rounds):
                    wr.writerow(
                        [
                            s,
                            i + 1,
                            name,
                            f"{r['val'][i]:.6f}",
                            f"{r['test'][i]:.6f}",
                            int(r["down"][i]),
                            int(r["up"][i]),
                            int(cum[i]),
                            int(r["frozen"][i]),
                        ]
                    )
    figure(args, rounds, acc_p, acc_c, com_p, com_c, frozen)
    print(f"wrote {args.table}, {args.csv}, {args.figure}")
    return 0


def figure(
    args: argparse.Namespace,
    rounds: np.ndarray,
    acc_p: np.ndarray,
    acc_c: np.ndarray,
    com_p: np.ndarray,
    com_c: np.ndarray,
    frozen: np.ndarray,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for acc, label, col in ((acc_p, "FedAvg", "C0"), (acc_c, "FedAvg + embedded CMD", "C1")):
        m, s = 100 * acc.mean(0), 100 * acc.std(0)
        ax1.plot(rounds, m, label=label, color=col)
        ax1.fill_between(rounds, m - s, m + s, color=col, alpha=0.2)
    ax1.axvline(args.warmup, color="grey", ls=":", lw=1)
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_ylim(max(0.0, float(100 * acc_p.mean(0)[len(rounds) // 5]) - 15), 100)
    ax1.legend(loc="lower right")
    ax2.plot(rounds, com_p[0] / 1e6, label="FedAvg", color="C0")
    ax2.plot(rounds, com_c.mean(0) / 1e6, label="FedAvg + embedded CMD", color="C1")
    ax2.set_xlabel("round")
    ax2.set_ylabel("parameters communicated, cumulative (millions)")
    ax3 = ax2.twinx()
    ax3.plot(rounds, 100 * frozen.mean(0), color="C2", ls="--", label="frozen (%)")
    ax3.set_ylabel("frozen parameters (%)", color="C2")
    ax3.set_ylim(0, 100)
    ax2.legend(loc="upper left")
    fig.suptitle(
        f"{args.clients} clients, non-IID digits; F={args.warmup}, L={args.every}, "
        f"P={args.percent:g}%"
    )
    fig.tight_layout()
    fig.savefig(args.figure, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
