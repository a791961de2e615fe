"""cmdtool.integrations.transformers.CMDCallback inside real ``transformers.Trainer.train``
runs (a tiny BERT built from a config: no download; synthetic tokens; CPU)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from cmdtool.errors import MismatchError, UsageError  # noqa: E402
from cmdtool.integrations.transformers import STATE_NAME, CMDCallback  # noqa: E402
from cmdtool.online import OnlineCMD  # noqa: E402

STEPS_PER_EPOCH = 3  # 48 examples, batches of 16


class Net(torch.nn.Module):
    """A plain module the Trainer trains (a dict with the loss out), faster than BERT."""

    def __init__(self, hidden=8):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)
        )

    def forward(self, input_ids=None, labels=None):
        logits = self.net(self.emb(input_ids).mean(dim=1))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def _net(seed=0, hidden=8):
    torch.manual_seed(seed)
    return Net(hidden)


def _model(seed=0, hidden=8):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=16,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 16, (n, 6), generator=g)
        self.labels = (self.ids == 3).any(dim=1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _args(tmp_path, epochs, **kw):
    base = dict(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=5e-3,
        weight_decay=0.01,
        logging_strategy="epoch",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return TrainingArguments(**{**base, **kw})


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Snapshots(TrainerCallback):
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, args, state, control, model=None, **kw):
        self.epochs.append(_params(model))


def test_online_train_logs_what_an_independent_online_cmd_computes(tmp_path):
    epochs, warmup = 5, 3
    model = _model()
    cb = CMDCallback("online", warmup=warmup, modes=3, samples=60, seed=4)
    snaps = Snapshots()
    trainer = Trainer(model=model, args=_args(tmp_path, epochs), train_dataset=Tokens(32))
    trainer.add_callback(cb)
    trainer.add_callback(snaps)
    trainer.train()

    logged = [e for e in trainer.state.log_history if "cmd/epochs" in e]
    assert [e["cmd/epochs"] for e in logged] == list(range(1, epochs + 1))
    own = [(n, t.clone()) for n, t in snaps.epochs[0].items()]
    oracle = OnlineCMD(own, modes=3, samples=60, warmup=warmup, seed=4)
    for epoch, snap in enumerate(snaps.epochs):
        for name, t in own:
            t.copy_(snap[name])
        oracle.step()
        if epoch + 1 < warmup:
            assert "cmd/relative_error" not in logged[epoch]
        else:
            assert logged[epoch]["cmd/relative_error"] == oracle.relative_error_
            assert logged[epoch]["cmd/modes"] == oracle.n_modes_
            assert logged[epoch]["epoch"] == epoch + 1
    _, mine = cb.cmd.to_state()
    _, theirs = oracle.to_state()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    # the CMD weights as a save_pretrained folder; the model keeps its training weights
    written = load_file(str(cb.weights_path / "model.safetensors"))
    for name, value in oracle.state_dict().items():
        assert torch.equal(written[name], value), name
    again = BertForSequenceClassification.from_pretrained(str(cb.weights_path))
    assert torch.equal(again.classifier.weight, oracle.state_dict()["classifier.weight"])
    assert torch.equal(model.classifier.weight, snaps.epochs[-1]["classifier.weight"])


class Watch(TrainerCallback):
    """Added after CMDCallback: frozen entries per optimizer step, weights around the CMD
    evaluation."""

    def __init__(self, cb, data):
        self.cb, self.data = cb, data
        self.moved = self.checked = 0
        self.before_step = None
        self.before, self.during, self.after, self.loss, self.cmd_loss = [], [], [], [], []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.before_step = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    def on_step_end(self, args, state, control, model=None, **kw):
        cmd = self.cb.cmd
        if cmd is None or not cmd.warmup_finished_ or not bool(cmd.frozen_.any()):
            return
        now = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        self.moved += int((now != self.before_step)[cmd.frozen_].sum())
        self.checked += int(cmd.frozen_.sum())

    def on_log(self, args, state, control, logs=None, model=None, **kw):
        if "cmd/epochs" in logs:  # logged by CMDCallback right before its evaluation
            self.before.append(_params(model))

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
        if "cmd_eval_loss" not in metrics:
            return
        self.during.append(_params(model))
        self.cmd_loss.append(metrics["cmd_eval_loss"])
        with torch.no_grad():
            out = model(input_ids=self.data.ids, labels=self.data.labels)
        self.loss.append(float(out["loss"]))

    def on_epoch_end(self, args, state, control, model=None, **kw):
        self.after.append(_params(model))


def test_embedded_train_freezes_and_validates_on_cmd_weights(tmp_path):
    epochs, warmup, percent = 6, 3, 25.0
    model = _net()
    val = Tokens(32, seed=7)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, epochs, eval_strategy="epoch"),
        train_dataset=Tokens(),
        eval_dataset=val,
    )
    cb = CMDCallback(
        "embedded",
        warmup=warmup,
        modes=3,
        samples=60,
        every=1,
        percent=percent,
        trainer=trainer,
        validate=True,
        save_weights=False,
    )
    watch = Watch(cb, val)
    trainer.add_callback(cb)
    trainer.add_callback(watch)
    trainer.train()

    assert watch.checked > 0 and watch.moved == 0  # AdamW with weight decay: frozen stay put
    logged = [e for e in trainer.state.log_history if "cmd/epochs" in e]
    n = sum(p.numel() for p in model.parameters())
    m, frozen = cb.cmd.n_modes_, 0
    for epoch in range(epochs):
        if epoch + 1 > warmup:
            frozen += max(1, math.floor(percent / 100 * (n - frozen - m) + 0.5))
        assert logged[epoch]["cmd/frozen_fraction"] == frozen / n
    # CMD evaluation from the end of the warm-up on, on the CMD weights, then swapped back
    n_eval = epochs - warmup + 1
    assert len(watch.during) == len(watch.loss) == n_eval
    assert len([e for e in trainer.state.log_history if "cmd_eval_loss" in e]) == n_eval
    assert len([e for e in trainer.state.log_history if "eval_loss" in e]) == epochs
    for i in range(n_eval):
        before, during, after = (
            watch.before[warmup - 1 + i],
            watch.during[i],
            watch.after[warmup - 1 + i],
        )
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert any(not torch.equal(before[k], during[k]) for k in before)
        assert watch.cmd_loss[i] == pytest.approx(watch.loss[i], rel=1e-5)
    assert all(torch.equal(watch.during[-1][k], v) for k, v in cb.cmd.state_dict().items())


def _run(tmp_path, epochs, resume=None, seed=0, **cb_kw):
    model = _net(seed)
    args = _args(tmp_path, epochs, save_strategy="epoch" if resume is None else "no")
    trainer = Trainer(model=model, args=args, train_dataset=Tokens())
    cb = CMDCallback(
        "embedded",
        warmup=4,
        modes=3,
        samples=60,
        every=1,
        percent=25.0,
        save_weights=False,
        **cb_kw,
    )
    trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=resume)
    return cb, model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted 7-epoch run with a checkpoint per epoch, shared by the resumes."""
    folder = tmp_path_factory.mktemp("hf_run")
    cb, _ = _run(folder, 7)
    return folder, cb.cmd.to_state()


@pytest.mark.parametrize("resume_epoch", [2, 5])  # mid-warm-up, after it
def test_resume_from_trainer_checkpoint_gives_the_same_cmd_state(uninterrupted, resume_epoch):
    run_dir, (meta, expected) = uninterrupted
    folder = run_dir / f"checkpoint-{resume_epoch * STEPS_PER_EPOCH}"
    assert (folder / STATE_NAME).is_file()
    assert (folder / (STATE_NAME + ".warmup.zarr")).is_dir() == (resume_epoch < 4)
    cb2, _ = _run(run_dir, 7, resume=str(folder), seed=9)
    meta2, got = cb2.cmd.to_state()
    assert meta2 == meta
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_bad_input_is_one_clear_error_and_training_state_is_untouched(tmp_path):
    for kw, match in [
        ({"warmup": 2}, "warmup=2 is shorter than 3"),
        ({"percent": -1}, "percent=-1"),
        ({"percent": 150}, "percent=150"),
        ({"every": 0}, "every=0"),
        ({"validate": True}, "validate=True needs the Trainer"),
    ]:
        with pytest.raises(UsageError, match=match):
            CMDCallback("embedded", **kw)

    model = _net()
    before = _params(model)
    trainer = Trainer(model=model, args=_args(tmp_path / "a", 3), train_dataset=Tokens())
    trainer.add_callback(CMDCallback(warmup=5))
    with pytest.raises(UsageError, match="warm-up longer than the run"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in _params(model).items())

    frozen = _net().requires_grad_(False)
    dummy = torch.nn.Parameter(torch.zeros(1))
    trainer = Trainer(
        model=frozen,
        args=_args(tmp_path / "b", 3),
        train_dataset=Tokens(),
        optimizers=(torch.optim.SGD([dummy], lr=0.1), None),
    )
    trainer.add_callback(CMDCallback(warmup=3))
    with pytest.raises(UsageError, match="no trainable floating-point"):
        trainer.train()

    # resuming with the CMD state of another model
    _run(tmp_path / "d", 4)  # hidden 8: checkpoints with their CMD states
    model_b = _net(hidden=12)
    args = _args(tmp_path / "e", 1, save_strategy="epoch")
    Trainer(model=model_b, args=args, train_dataset=Tokens()).train()  # no CMD
    folder = tmp_path / "e" / f"checkpoint-{STEPS_PER_EPOCH}"
    shutil.copy(tmp_path / "d" / f"checkpoint-{STEPS_PER_EPOCH}" / STATE_NAME, folder)
    model_c = _net(hidden=12)
    trainer = Trainer(model=model_c, args=_args(tmp_path / "e", 4), train_dataset=Tokens())
    trainer.add_callback(
        CMDCallback("embedded", warmup=4, modes=3, samples=60, every=1, percent=25.0)
    )
    with pytest.raises(MismatchError, match="differ from the saved ones"):
        trainer.train(resume_from_checkpoint=str(folder))
    saved = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in _params(model_c).items() if k in saved)
