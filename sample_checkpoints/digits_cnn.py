"""The small CNN of the shipped sample run, and its held-out evaluation.

Trained by ``scripts/make_sample_checkpoints.py`` on scikit-learn's 8x8 digits; one
checkpoint per epoch lies in ``run/epoch_NNN.safetensors`` next to this file, and the
held-out split (already normalised as in training) in ``heldout.safetensors``.

Only torch and safetensors are needed here. Nothing is loaded at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

HERE = Path(__file__).resolve().parent
HELDOUT_PATH = HERE / "heldout.safetensors"
RUN_DIR = HERE / "run"


def build_model() -> nn.Module:
    """Conv(1->8)-BN-ReLU-Conv(8->16)-BN-ReLU-MaxPool-Linear(256->32)-ReLU-Linear(32->10)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


@lru_cache(maxsize=4)
def _load_heldout_cached(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(path)
    return tensors["x"], tensors["y"]


def load_heldout(path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out split: ``x`` float32 (n, 1, 8, 8) normalised, ``y`` int64 (n,)."""
    p = Path(path) if path is not None else HELDOUT_PATH
    if not p.is_file():
        raise FileNotFoundError(
            f"held-out split not found at {p}; "
            "run `python scripts/make_sample_checkpoints.py` to create it"
        )
    return _load_heldout_cached(str(p.resolve()))


@torch.no_grad()
def accuracy(state_dict: Mapping[str, torch.Tensor], *, heldout: str | Path | None = None) -> float:
    """Held-out accuracy (0..1) of the model with these weights (eval mode, strict load)."""
    x, y = load_heldout(heldout)
    model = build_model()
    model.load_state_dict(dict(state_dict), strict=True)
    model.eval()
    pred = model(x).argmax(dim=1)
    return float((pred == y).float().mean())


def evaluate(
    state_dict: Mapping[str, torch.Tensor], *, heldout: str | Path | None = None
) -> dict[str, float]:
    """Held-out metrics of one checkpoint: ``{"accuracy": ...}``."""
    return {"accuracy": accuracy(state_dict, heldout=heldout)}
