"""Normalization variances of the rebuilt checkpoints of the runs beyond the sample
(issue 12, "Done when" 1): every ingested epoch of every run of
``scripts/make_extra_runs.py``, trained here small by the script's own code, default
settings."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from cmdtool.decomposition import CMD
from cmdtool.decomposition.normstats import store_stats
from cmdtool.ingestion import ingest
from cmdtool.reconstruction import rebuild_state

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
#: run -> (training examples, epochs): small enough for a fast test
RUNS = {"cnn1": (96, 4), "cnn2": (96, 4), "mlp": (64, 4), "transformer": (32, 4)}


@pytest.fixture
def extra_runs():
    """The script's module; torch's global settings it changes are put back after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    sys.path.insert(0, str(SCRIPTS))
    try:
        import make_extra_runs

        yield make_extra_runs
    finally:
        sys.path.remove(str(SCRIPTS))
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("name", list(RUNS))
def test_no_rebuilt_variance_is_negative_or_non_finite(tmp_path, extra_runs, name):
    n_train, epochs = RUNS[name]
    folder = extra_runs.make(tmp_path, name, epochs, n_train=n_train)
    if name.startswith("cnn"):
        net = extra_runs.build_cnn()
    elif name == "mlp":
        net = extra_runs.build_mlp()
    else:
        net = extra_runs.TinyTransformer()
    # the normalization variances, from the network itself: BatchNorm's running_var
    # buffers (LayerNorm keeps no running statistics: the MLP and transformer have none)
    expected = {n for n, _ in net.named_buffers() if re.search(r"(^|\.)running_var$", n)}
    assert (len(expected) == 2) == name.startswith("cnn")

    store = tmp_path / f"{name}.zarr"
    ingest(folder / "run", store)
    model = CMD().fit(store)  # default settings: 10 modes, K = 1000, --stats gated
    variances = {t.name for t in store_stats(model.store_) if t.variance}
    assert variances == expected
    labels = model.store_.labels
    assert len(labels) == epochs  # every ingested epoch is checked below
    for label in labels:
        state = rebuild_state(model, label)
        for key in expected:
            v = state[key]
            assert bool(torch.isfinite(v).all()), (name, label, key)
            assert float(v.min()) >= 0.0, (name, label, key, float(v.min()))
        for key, v in state.items():  # and nothing else rebuilt non-finite either
            if v.is_floating_point():
                assert bool(torch.isfinite(v).all()), (name, label, key)
