"""cmdtool.integrations.lightning.CMDCallback inside real ``lightning.Trainer.fit`` runs
(tiny MLP, synthetic data, CPU)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from cmdtool.errors import MismatchError, UsageError  # noqa: E402
from cmdtool.integrations.lightning import CMDCallback  # noqa: E402
from cmdtool.online import OnlineCMD  # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self, hidden: int = 6, train: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 3))
        self.train_opt = train
        if not train:
            self.net.requires_grad_(False)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        if not self.train_opt:
            return None
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if not self.train_opt:
            return None
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-2)


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _trainer(tmp_path, epochs, callbacks, checkpoint=None, **kw):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[*callbacks, *([checkpoint] if checkpoint else [])],
        logger=CSVLogger(tmp_path / "logs", name="t"),
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
        **kw,
    )


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class Snapshots(Callback):
    """Per-epoch parameter snapshots taken at the epoch's end (after CMD's step)."""

    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(_params(pl_module))


def _metrics(tmp_path):
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    out: dict[int, dict[str, float]] = {}
    for r in rows:
        for k, v in r.items():
            if v not in ("", None) and k not in ("epoch", "step"):
                out.setdefault(int(r["epoch"]), {})[k] = float(v)
    return out


def test_import_cmdtool_needs_no_framework():
    code = (
        "import sys, cmdtool, cmdtool.integrations, cmdtool.integrations.common;"
        "cmdtool.OnlineCMD;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate')"
        " if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_online_fit_logs_what_an_independent_online_cmd_computes(tmp_path):
    epochs, warmup = 6, 3
    cb = CMDCallback("online", warmup=warmup, modes=3, samples=40, seed=2)
    snaps = Snapshots()
    model = Tiny()
    _trainer(tmp_path, epochs, [cb, snaps]).fit(model, _data())

    # an OnlineCMD fed by the test with the recorded snapshots
    own = [(n, t.clone()) for n, t in snaps.epochs[0].items()]
    oracle = OnlineCMD(own, modes=3, samples=40, warmup=warmup, seed=2)
    logged = _metrics(tmp_path)
    for epoch, snap in enumerate(snaps.epochs):
        for name, t in own:
            t.copy_(snap[name])
        oracle.step()
        if epoch + 1 < warmup:
            assert "cmd/relative_error" not in logged[epoch]
            continue
        got = logged[epoch]
        assert math.isclose(got["cmd/relative_error"], oracle.relative_error_, rel_tol=1e-6)
        assert got["cmd/modes"] == oracle.n_modes_
        assert got["cmd/epochs"] == epoch + 1
    _, mine = cb.cmd.to_state()
    _, theirs = oracle.to_state()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    # the CMD weights written as a Lightning checkpoint at the end
    ckpt = torch.load(cb.weights_path, weights_only=True)
    for name, value in oracle.state_dict().items():
        assert torch.equal(ckpt["state_dict"][name], value), name
    restored = Tiny.load_from_checkpoint(cb.weights_path, weights_only=True)
    assert torch.equal(restored.net[0].weight, oracle.state_dict()["net.0.weight"])
    # training weights stay the model's (not the CMD weights)
    assert torch.equal(model.net[0].weight, snaps.epochs[-1]["net.0.weight"])


class FrozenWatch(Callback):
    """Placed before CMDCallback: frozen entries must not move during any batch."""

    def __init__(self, cmd_cb):
        self.cmd_cb = cmd_cb
        self.moved = 0
        self.checked = 0
        self.before = None
        self.val_before = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cmd = self.cmd_cb.cmd
        if cmd is None or not cmd.warmup_finished_ or not bool(cmd.frozen_.any()):
            return
        now = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        self.moved += int((now != self.before)[cmd.frozen_].sum())
        self.checked += int(cmd.frozen_.sum())

    def on_validation_start(self, trainer, pl_module):  # before the CMD weights go in
        self.val_before.append(_params(pl_module))


class ValidationWatch(Callback):
    """Placed after CMDCallback: sees the weights validation runs on, and after it."""

    def __init__(self, cmd_cb, val):
        self.cmd_cb, self.val = cmd_cb, val
        self.during, self.after, self.loss = [], [], []

    def on_validation_start(self, trainer, pl_module):
        self.during.append(_params(pl_module))
        x, y = self.val.dataset.tensors
        with torch.no_grad():
            self.loss.append(float(nn.functional.cross_entropy(pl_module(x), y)))

    def on_validation_end(self, trainer, pl_module):
        self.after.append(_params(pl_module))


def test_embedded_fit_freezes_and_validates_on_cmd_weights(tmp_path):
    epochs, warmup, percent = 7, 3, 30.0
    cb = CMDCallback(
        "embedded",
        warmup=warmup,
        modes=3,
        samples=40,
        every=1,
        percent=percent,
        validate=True,
        save_weights=False,
    )
    val = torch.utils.data.DataLoader(_data(64, seed=5).dataset, batch_size=64)
    frozen_watch, val_watch = FrozenWatch(cb), ValidationWatch(cb, val)
    model = Tiny()
    trainer = _trainer(tmp_path, epochs, [frozen_watch, cb, val_watch], num_sanity_val_steps=0)
    trainer.fit(model, _data(), val)

    # frozen entries never moved under SGD with momentum and weight decay
    assert frozen_watch.checked > 0 and frozen_watch.moved == 0
    logged = _metrics(tmp_path)
    n = sum(p.numel() for p in model.parameters())
    m = cb.cmd.n_modes_
    frozen = 0
    for epoch in range(epochs):
        since = epoch + 1 - warmup
        if since > 0:  # every=1: a check after each post-warm-up epoch
            cand = n - frozen - m
            frozen += max(1, math.floor(percent / 100 * cand + 0.5))
        assert logged[epoch]["cmd/frozen_fraction"] == pytest.approx(frozen / n, abs=1e-7)
    # validation: training weights before == after, CMD weights during (after warm-up)
    for epoch in range(epochs):
        before, during, after = (
            frozen_watch.val_before[epoch],
            val_watch.during[epoch],
            val_watch.after[epoch],
        )
        assert all(torch.equal(before[k], after[k]) for k in before)
        swapped = any(not torch.equal(before[k], during[k]) for k in before)
        assert swapped == (epoch + 1 >= warmup), epoch
        # the logged val_loss is the loss of the weights validation ran on
        assert logged[epoch]["val_loss"] == pytest.approx(val_watch.loss[epoch], rel=1e-5)
    cmd_weights = cb.cmd.state_dict()
    assert all(torch.equal(val_watch.during[-1][k], v) for k, v in cmd_weights.items())


def _state(cb):
    meta, tensors = cb.cmd.to_state()
    return meta, tensors


SETTINGS = dict(warmup=4, modes=3, samples=40, every=1, percent=30.0, save_weights=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted 7-epoch fit with a checkpoint per epoch, shared by the resumes."""
    folder = tmp_path_factory.mktemp("pl_run")
    ck = ModelCheckpoint(dirpath=folder / "ck", filename="{epoch}", save_top_k=-1)
    cb = CMDCallback("embedded", **SETTINGS)
    _trainer(folder / "a", 7, [cb], checkpoint=ck).fit(Tiny(), _data())
    return folder, _state(cb)


@pytest.mark.parametrize("resume_epoch", [1, 4])  # mid-warm-up (2 epochs done), after it
def test_resume_from_lightning_checkpoint_gives_the_same_cmd_state(
    tmp_path, uninterrupted, resume_epoch
):
    folder, (meta, expected) = uninterrupted
    cb2 = CMDCallback("embedded", **SETTINGS)
    model = Tiny(seed=9)  # other weights: the checkpoint's replace them
    path = folder / "ck" / f"epoch={resume_epoch}.ckpt"
    _trainer(tmp_path / "b", 7, [cb2]).fit(model, _data(), ckpt_path=path)
    meta2, got = _state(cb2)
    assert meta2 == meta
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_bad_input_is_one_clear_error_and_training_state_is_untouched(tmp_path):
    for kw, match in [
        ({"warmup": 2}, "warmup=2 is shorter than 3"),
        ({"percent": 0}, "percent=0"),
        ({"percent": 100.5}, "percent=100.5"),
        ({"every": 0}, "every=0"),
    ]:
        with pytest.raises(MisconfigurationException, match=match) as info:
            CMDCallback("embedded", **kw)
        assert isinstance(info.value, UsageError)

    model = Tiny()
    before = _params(model)
    with pytest.raises(MisconfigurationException, match="warm-up longer than the run"):
        _trainer(tmp_path, 3, [CMDCallback(warmup=5)]).fit(model, _data())
    assert all(torch.equal(before[k], v) for k, v in _params(model).items())

    with pytest.raises(MisconfigurationException, match="no trainable floating-point"):
        _trainer(tmp_path, 3, [CMDCallback(warmup=3)]).fit(Tiny(train=False), _data())

    # a callback state taken on another model
    cb = CMDCallback("embedded", warmup=3, modes=2, samples=20, save_weights=False)
    _trainer(tmp_path / "a", 3, [cb]).fit(Tiny(hidden=6), _data())
    other = CMDCallback("embedded", warmup=3, modes=2, samples=20, save_weights=False)
    other.load_state_dict(cb.state_dict())
    model = Tiny(hidden=5)
    before = _params(model)
    with pytest.raises(MisconfigurationException, match="differ from the saved ones") as info:
        _trainer(tmp_path / "b", 3, [other]).fit(model, _data())
    assert isinstance(info.value, MismatchError)
    assert all(torch.equal(before[k], v) for k, v in _params(model).items())
    # and one made with other settings
    third = CMDCallback("embedded", warmup=3, modes=2, samples=20, percent=50.0)
    third.load_state_dict(cb.state_dict())
    with pytest.raises(
        MisconfigurationException, match=r"saved fraction=0.1 \(now 0.5\)"
    ):
        _trainer(tmp_path / "c", 3, [third]).fit(Tiny(hidden=6), _data())
