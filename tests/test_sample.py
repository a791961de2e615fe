"""The shipped sample run: CMD-rebuilt checkpoints against the raw ones (the papers' claim)."""

import importlib.util
import re

import numpy as np
import torch
from safetensors.torch import load_file

from cmdtool.decomposition import CMD
from cmdtool.ingestion import ingest
from cmdtool.reconstruction import rebuild_state
from tests.conftest import REPO, SAMPLE


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


def _readme_claim() -> dict[str, str]:
    """The figures the README prints for the sample, as text (their printed precision)."""
    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    m = re.search(
        r"Held-out accuracy over the last 10 epochs \(checked by `tests/test_sample\.py`\): "
        r"raw checkpoints (?P<raw_mean>\d\.\d+) ± (?P<raw_std>\d\.\d+), CMD-rebuilt "
        r"\((?P<modes>\d+) modes, K = (?P<samples>\d+), seed (?P<seed>\d+)\) "
        r"(?P<cmd_mean>\d\.\d+) ± (?P<cmd_std>\d\.\d+)",
        text,
    )
    assert m is not None, "README.md no longer states the sample's held-out accuracy"
    return m.groupdict()


def _as_printed(value: float, printed: str) -> str:
    return f"{value:.{len(printed.split('.')[1])}f}"


def test_cmd_beats_raw_on_the_last_ten_epochs(tmp_path):
    # guards: the README's figures for the sample (mean ± population std, numpy's default
    # ddof=0) and the papers' claim that CMD-rebuilt checkpoints generalise better
    claim = _readme_claim()
    digits = _digits_module()
    held = load_file(SAMPLE / "heldout.safetensors")
    x, y = held["x"], held["y"]
    net = digits.build_model()
    store = tmp_path / "sample.zarr"
    summary = ingest(SAMPLE / "run", store)
    assert len(summary.added) >= 50
    modes, samples, seed = (int(claim[k]) for k in ("modes", "samples", "seed"))
    model = CMD(modes, n_samples=samples, seed=seed).fit(store)
    labels = model.store_.labels[-10:]
    raw, cmd = [], []
    for label in labels:
        raw.append(
            _accuracy(net, load_file(SAMPLE / "run" / f"epoch_{label:03d}.safetensors"), x, y)
        )
        cmd.append(_accuracy(net, rebuild_state(model, label), x, y))
    raw_a, cmd_a = np.array(raw), np.array(cmd)
    got = {
        "raw_mean": raw_a.mean(),
        "raw_std": raw_a.std(),  # population standard deviation
        "cmd_mean": cmd_a.mean(),
        "cmd_std": cmd_a.std(),
    }
    print(
        f"\nheld-out accuracy over epochs {labels[0]}..{labels[-1]}: "
        f"raw mean {got['raw_mean']:.4f} std {got['raw_std']:.4f} "
        f"(sample std {raw_a.std(ddof=1):.4f}); "
        f"CMD mean {got['cmd_mean']:.4f} std {got['cmd_std']:.4f} "
        f"(sample std {cmd_a.std(ddof=1):.4f})"
    )
    for key, value in got.items():
        assert _as_printed(value, claim[key]) == claim[key], (key, value, claim)
    assert cmd_a.mean() >= raw_a.mean()
    assert cmd_a.std() < raw_a.std()


def test_every_epoch_rebuilt_usable_and_sampling_seeds(tmp_path):
    # guards: the default --stats treatment (reconstruction/stats.py, gated) and the
    # variance guard (method/normstats.safe_variances): issue 12's "Done when"
    digits = _digits_module()
    held = load_file(SAMPLE / "heldout.safetensors")
    x, y = held["x"], held["y"]
    net = digits.build_model()
    store = tmp_path / "sample.zarr"
    ingest(SAMPLE / "run", store)
    raw = {}
    for path in sorted((SAMPLE / "run").glob("epoch_*.safetensors")):
        raw[int(path.stem.split("_")[1])] = _accuracy(net, load_file(path), x, y)
    means = []
    for seed in range(5):
        model = CMD(10, n_samples=1000, seed=seed).fit(store, name=f"s{seed}")
        assert model.summary_["stats"] == "gated"
        labels = model.store_.labels if seed == 0 else model.store_.labels[-10:]
        cmd = {}
        for label in labels:
            state = rebuild_state(model, label)
            for name, v in state.items():
                if name.endswith("running_var"):
                    assert torch.isfinite(v).all() and (v >= 0).all(), (seed, label, name)
            cmd[label] = _accuracy(net, state, x, y)
        if seed == 0:
            worst = min(cmd[t] - raw[t] for t in labels)
            print(f"\nseed 0: worst epoch CMD - raw {worst:+.4f}")
            assert worst >= -0.15
        last = np.array([cmd[t] for t in labels[-10:]])
        raw_last = np.array([raw[t] for t in labels[-10:]])
        print(
            f"sampling seed {seed}: CMD last-10 {last.mean():.4f} ± {last.std():.4f} "
            f"(raw {raw_last.mean():.4f} ± {raw_last.std():.4f})"
        )
        assert last.mean() >= raw_last.mean() and last.std() < raw_last.std()
        means.append(last.mean())
    print("CMD last-10 means, seeds 0-4:", " ".join(f"{m:.4f}" for m in means))
    assert min(means) >= 0.98
