"""The shipped sample run: CMD-rebuilt checkpoints against the raw ones (the papers' claim)."""

import importlib.util

import numpy as np
import torch
from safetensors.torch import load_file

from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from cmdtool.reconstruction import rebuild_state
from tests.conftest import SAMPLE


def _digits_module():
    spec = importlib.util.spec_from_file_location("digits_cnn", SAMPLE / "digits_cnn.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def _accuracy(model, state, x, y) -> float:
    model.load_state_dict(state, strict=True)
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


def test_cmd_beats_raw_on_the_last_ten_epochs(tmp_path):
    digits = _digits_module()
    held = load_file(SAMPLE / "heldout.safetensors")
    x, y = held["x"], held["y"]
    net = digits.build_model()
    store = tmp_path / "sample.zarr"
    summary = ingest(SAMPLE / "run", store)
    assert len(summary.added) >= 50
    model = CMD(10, n_samples=1000).fit(store)
    labels = model.store_.labels[-10:]
    raw, cmd = [], []
    for label in labels:
        raw.append(
            _accuracy(net, load_file(SAMPLE / "run" / f"epoch_{label:03d}.safetensors"), x, y)
        )
        cmd.append(_accuracy(net, rebuild_state(model, label), x, y))
    raw_a, cmd_a = np.array(raw), np.array(cmd)
    print(
        f"\nheld-out accuracy over epochs {labels[0]}..{labels[-1]}: "
        f"raw mean {raw_a.mean():.4f} std {raw_a.std():.4f}; "
        f"CMD mean {cmd_a.mean():.4f} std {cmd_a.std():.4f}"
    )
    assert cmd_a.mean() >= raw_a.mean()
    assert cmd_a.std() < raw_a.std()
