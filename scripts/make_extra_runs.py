"""Train the runs beyond the shipped sample (issue 12), one checkpoint per epoch.

    python scripts/make_extra_runs.py OUT [--which cnn1,cnn2,mlp,transformer] [--epochs E]

- ``cnn<S>``: the sample CNN (``sample_checkpoints/digits_cnn.py``) with the sample's
  recipe (``scripts/make_sample_checkpoints.py``) and training seed S;
- ``mlp``: an MLP with LayerNorm and dropout on the same digits data (seed 0);
- ``transformer``: a 2-layer pre-LayerNorm transformer with a tied embedding, trained in
  bfloat16 (weights and activations) on a synthetic task, sorting 8 digits of 0..15.

Each run is written to ``OUT/<name>/run/epoch_NNN.safetensors`` with its held-out data
in ``OUT/<name>/heldout.safetensors``; :func:`evaluator` returns the held-out accuracy
function of a run. Nothing is downloaded (the digits ship inside scikit-learn). CPU,
deterministic, one thread.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "sample_checkpoints"))
from digits_cnn import build_model as build_cnn  # noqa: E402
from make_sample_checkpoints import augment, load_split, train_epoch  # noqa: E402

SORT_LEN, SORT_VOCAB = 8, 16


def build_mlp() -> nn.Module:
    """64 -> 128 -> LayerNorm -> GELU -> dropout -> 64 -> LayerNorm -> GELU -> 10."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.LayerNorm(128),
        nn.GELU(),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.LayerNorm(64),
        nn.GELU(),
        nn.Dropout(0.2),
        nn.Linear(64, 10),
    )


class TinyTransformer(nn.Module):
    """2 pre-LN encoder layers, d = 32, 4 heads, learned positions, tied embedding."""

    def __init__(self, vocab: int = SORT_VOCAB, length: int = SORT_LEN, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(length, d))
        layer = nn.TransformerEncoderLayer(
            d, 4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        h = self.norm(self.layers(h))
        return h @ self.embed.weight.T  # tied output projection


def sort_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of SORT_LEN tokens and their sorted versions, int64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, SORT_VOCAB, (n, SORT_LEN), generator=gen)
    return x, torch.sort(x, dim=1).values


def _save(state: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))


def _split(seed: int, n_train: int | None) -> tuple[torch.Tensor, ...]:
    """The digits split of ``load_split``, the training part cut to ``n_train`` images."""
    x_tr, y_tr, x_te, y_te, _, _ = load_split(seed)
    return x_tr[:n_train], y_tr[:n_train], x_te, y_te


def make_cnn(out: Path, seed: int, epochs: int, n_train: int | None = None) -> None:
    """The sample's recipe with another training seed (``n_train``: the first training
    images only, for tests)."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = _split(seed, n_train)
    save_file({"x": x_te, "y": y_te}, str(out / "heldout.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    model = build_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for epoch in range(1, epochs + 1):
        train_epoch(model, opt, nn.CrossEntropyLoss(), x_tr, y_tr, gen, 16)
        _save(model.state_dict(), out / "run" / f"epoch_{epoch:03d}.safetensors")


def make_mlp(out: Path, epochs: int, seed: int = 0, n_train: int | None = None) -> None:
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = _split(seed, n_train)
    save_file({"x": x_te, "y": y_te}, str(out / "heldout.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    model = build_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), 16):
            idx = perm[i : i + 16]
            loss = loss_fn(model(augment(x_tr[idx], gen)), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        _save(model.state_dict(), out / "run" / f"epoch_{epoch:03d}.safetensors")


def make_transformer(out: Path, epochs: int, seed: int = 0, n_train: int | None = None) -> None:
    """bf16 weights and activations (plain SGD updates rounded to bf16 each step);
    ``n_train`` training sequences (default 2048)."""
    torch.manual_seed(seed)
    x_tr, y_tr = sort_data(2048 if n_train is None else n_train, seed)
    x_te, y_te = sort_data(512, seed + 1000)
    save_file({"x": x_te, "y": y_te}, str(out / "heldout.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    model = TinyTransformer().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), 64):
            idx = perm[i : i + 64]
            logits = model(x_tr[idx])
            loss = loss_fn(logits.float().reshape(-1, SORT_VOCAB), y_tr[idx].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        _save(model.state_dict(), out / "run" / f"epoch_{epoch:03d}.safetensors")


def evaluator(kind: str, heldout: Path) -> Callable[[Mapping[str, torch.Tensor]], float]:
    """Held-out accuracy of a state dict of run ``kind`` (``cnn``, ``mlp``,
    ``transformer``: token accuracy), with the model in eval mode."""
    data = load_file(str(heldout))
    x, y = data["x"], data["y"]
    if kind == "transformer":
        model: nn.Module = TinyTransformer().to(torch.bfloat16)
    else:
        model = build_cnn() if kind == "cnn" else build_mlp()

    @torch.no_grad()
    def accuracy(state: Mapping[str, torch.Tensor]) -> float:
        model.load_state_dict(dict(state), strict=True)
        model.eval()
        pred = model(x).argmax(dim=-1)
        return float((pred == y).float().mean())

    return accuracy


def make(out: Path, name: str, epochs: int, n_train: int | None = None) -> Path:
    """Train run ``name`` (``cnnS``, ``mlp``, ``transformer``) into ``out/name``; with
    ``n_train``, on that many training examples only (the small runs of the tests)."""
    folder = out / name
    (folder / "run").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if name.startswith("cnn"):
        make_cnn(folder, int(name[3:]), epochs, n_train)
    elif name == "mlp":
        make_mlp(folder, epochs, n_train=n_train)
    elif name == "transformer":
        make_transformer(folder, epochs, n_train=n_train)
    else:
        raise SystemExit(f"unknown run {name!r}: cnnS, mlp or transformer")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--which", default="cnn1,cnn2,mlp,transformer")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args(argv)
    for name in args.which.split(","):
        folder = make(args.out, name, args.epochs)
        print(f"{name}: {args.epochs} epochs -> {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
