"""Train the sample CNN on scikit-learn's digits and save one checkpoint per epoch.

    python scripts/make_sample_checkpoints.py [--out sample_checkpoints] [--epochs 60] [--seed 0]

Writes ``<out>/heldout.safetensors`` (the held-out split, normalised as in training)
and ``<out>/run/epoch_001.safetensors`` ... (``model.state_dict()`` after each epoch,
BatchNorm buffers included). The digits ship inside scikit-learn: no download.

The training is deliberately noisy late on (constant, fairly high learning rate, small
batches, augmentation) so that the raw per-epoch checkpoints fluctuate on held-out
accuracy; that is the trajectory CMD is meant to smooth. Deterministic on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "sample_checkpoints"))
from digits_cnn import accuracy, build_model  # noqa: E402

HELDOUT_FRACTION = 0.3
SHIFT = 1  # random shifts of up to +-SHIFT pixels
NOISE = 0.1  # Gaussian noise std (in normalised units)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random +-SHIFT pixel translation (zero fill) and Gaussian noise, per image."""
    n = x.shape[0]
    padded = nn.functional.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT))
    dx = torch.randint(0, 2 * SHIFT + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * SHIFT + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])[:, :, None]  # (n, 8, 1)
    cols = (dx[:, None] + torch.arange(8)[None, :])[:, None, :]  # (n, 1, 8)
    idx = torch.arange(n)[:, None, None]
    out = padded[:, 0][idx, rows, cols][:, None]
    return out + NOISE * torch.randn(out.shape, generator=gen)


def load_split(
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """Digits split and normalised as in training: x_tr, y_tr, x_te, y_te, mean, std."""
    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=HELDOUT_FRACTION, stratify=y, random_state=seed
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return (
        torch.from_numpy((x_tr - mean) / std)[:, None].contiguous(),
        torch.from_numpy(y_tr),
        torch.from_numpy((x_te - mean) / std)[:, None].contiguous(),
        torch.from_numpy(y_te),
        mean,
        std,
    )


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    gen: torch.Generator,
    batch_size: int,
) -> float:
    """One epoch of augmented mini-batch training; returns the summed loss."""
    model.train()
    n = len(x_tr)
    perm = torch.randperm(n, generator=gen)
    total = 0.0
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        if len(idx) < 2:  # BatchNorm needs more than one sample
            continue
        xb = augment(x_tr[idx], gen)
        loss = loss_fn(model(xb), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "sample_checkpoints",
        help="folder for heldout.safetensors and run/ (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-identical results whatever the machine's core count

    x_tr, y_tr, x_te, y_te, mean, std = load_split(args.seed)

    out: Path = args.out
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("epoch_*.safetensors"):
        old.unlink()
    heldout = out / "heldout.safetensors"
    save_file(
        {"x": x_te, "y": y_te},
        str(heldout),
        metadata={"normalisation": f"(pixel/16 - {mean!r}) / {std!r}"},
    )

    gen = torch.Generator().manual_seed(args.seed)
    model = build_model()
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
    )
    loss_fn = nn.CrossEntropyLoss()
    n = len(x_tr)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        total = train_epoch(model, opt, loss_fn, x_tr, y_tr, gen, args.batch_size)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(run_dir / f"epoch_{epoch:03d}.safetensors"))
        acc = accuracy(state, heldout=heldout)
        print(f"epoch {epoch:3d}  loss {total / n:.4f}  held-out acc {acc:.4f}")
    print(f"{args.epochs} epochs in {time.perf_counter() - start:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
