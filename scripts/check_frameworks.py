"""Train tiny runs with the real frameworks, ingest them, rebuild them and load them back.

Optional: needs ``transformers`` and ``lightning`` (``pip install transformers lightning``;
they are not dependencies of cmdtool). Variants: Hugging Face ``Trainer`` (GPT-2 with
tied embeddings, ``save_strategy="epoch"`` then ``trainer.save_model()``; labels by step
and by epoch), Lightning ``ModelCheckpoint(save_top_k=-1, save_last=True)``, Lightning
with ``WeightAveraging`` (raw and averaged weights), ``torch.compile``,
``torch.optim.swa_utils.AveragedModel``, a ``torch.save``'d GPT-2 state dict (tied
weights), and ``torch.distributed.checkpoint``. For each: ``ingest`` without options,
check the stored rows against the source files, ``decompose``, ``reconstruct --layout
source`` from the model and load the result with the framework's own loader
(``AutoModelForCausalLM.from_pretrained``, ``LightningModule.load_from_checkpoint``,
``load_state_dict``, ``torch.distributed.checkpoint.load``). Prints a Markdown table.

    python scripts/check_frameworks.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cmdtool
from cmdtool import CMD, ingest, reconstruct
from cmdtool.checkpoints import discover, open_checkpoint

EPOCHS = 4
warnings.filterwarnings("ignore")


def data(n: int = 32, seq: int = 8, vocab: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, seq), generator=g)


def rows_match_sources(store: Path, source: Path, **kw: Any) -> float:
    """Largest |stored - source| over every epoch and tensor (float32), read back with
    ``reconstruct --raw`` (flat) against the source files opened by cmdtool's readers."""
    out = Path(tempfile.mkdtemp())
    try:
        reconstruct(store, out, epochs="all", raw=True, fmt="pt")
        worst = 0.0
        state = kw.pop("state", "raw")
        for entry in discover(source, **kw):
            back = torch.load(out / f"epoch_{entry.label}.pt", weights_only=True)
            with open_checkpoint(entry, state=state) as ckpt:
                for name in ckpt:
                    t = ckpt[name]
                    if t.is_floating_point():
                        d = (
                            (back[name].double() - t.double()).abs().max().item()
                            if t.numel()
                            else 0
                        )
                        worst = max(worst, d)
        return worst
    finally:
        shutil.rmtree(out)


def check(
    name: str,
    source: Path,
    work: Path,
    load_back: Callable[[list[str]], str],
    **ingest_kw: Any,
) -> dict[str, Any]:
    store = work / f"{name}.zarr"
    t0 = time.perf_counter()
    row: dict[str, Any] = {"variant": name}
    try:
        labels_kw = {"labels": ingest_kw["label_by"]} if "label_by" in ingest_kw else {}
        s = ingest(source, store, **ingest_kw)
        row["epochs"] = ", ".join(map(str, s.added))
        row["skipped"] = ", ".join(f["path"] for f in s.skipped_files) or "-"
        row["N"] = s.n_params
        row["tensors from"] = ", ".join(s.state_keys)
        disc_kw = {**labels_kw, **({"state": ingest_kw["state"]} if "state" in ingest_kw else {})}
        row["max abs(row - source)"] = f"{rows_match_sources(store, source, **disc_kw):.1e}"
        CMD(n_modes=3, n_samples=min(200, s.n_params)).fit(store)
        rebuilt = reconstruct(store, work / f"{name}-rebuilt", epochs="all", layout="source")
        row["rebuilt"] = Path(rebuilt.files[-1]).name
        row["loaded back with"] = load_back(rebuilt.files)
        row["result"] = "ok"
    except Exception as exc:  # report, keep going
        row["result"] = f"FAILED: {type(exc).__name__}: {str(exc)[:150]}"
    row["s"] = f"{time.perf_counter() - t0:.1f}"
    return row


# ------------------------------------------------------------------- variants


def hf_trainer(work: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    ids = data()
    dataset = [{"input_ids": x, "labels": x} for x in ids]
    out = work / "hf"
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=8,
        save_strategy="epoch",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        learning_rate=1e-2,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    trainer.save_model()
    return out


def hf_load(files: list[str]) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(files[-1])
    with torch.no_grad():
        logits = model(data()[:2]).logits
    assert torch.isfinite(logits).all()
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    return f"AutoModelForCausalLM.from_pretrained (tied: {tied})"


class Lit:
    """Built lazily: lightning is optional."""

    cls: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.cls is None:
            import lightning.pytorch as pl

            class TinyLit(pl.LightningModule):
                def __init__(self, width: int = 8) -> None:
                    super().__init__()
                    self.save_hyperparameters()
                    self.model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))

                def training_step(self, batch: Any, _: int) -> torch.Tensor:
                    x, y = batch
                    return nn.functional.mse_loss(self.model(x), y)

                def configure_optimizers(self) -> Any:
                    return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

            cls.cls = TinyLit
        return cls.cls


def lightning_run(work: Path, averaging: bool) -> Path:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16
    )
    out = work / ("lightning-avg" if averaging else "lightning")
    callbacks: list[Any] = [ModelCheckpoint(dirpath=out, save_top_k=-1, save_last=True)]
    if averaging:
        from lightning.pytorch.callbacks import WeightAveraging

        callbacks.append(WeightAveraging())
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Lit.get()(), loader)
    return out


def lightning_load(files: list[str]) -> str:
    model = Lit.get().load_from_checkpoint(files[-1], weights_only=True)
    assert torch.isfinite(model.model(torch.randn(2, 4))).all()
    return "LightningModule.load_from_checkpoint"


def plain_run(work: Path, name: str, wrap: Callable[[nn.Module], nn.Module]) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    wrapped = wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = work / name
    out.mkdir()
    x = torch.randn(64, 4)
    for epoch in range(1, EPOCHS + 1):
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if isinstance(wrapped, torch.optim.swa_utils.AveragedModel):
            wrapped.update_parameters(model)
        torch.save(wrapped.state_dict(), out / f"epoch_{epoch}.pt")
    return out


def state_dict_load(make: Callable[[], nn.Module]) -> Callable[[list[str]], str]:
    def load(files: list[str]) -> str:
        target = make()
        target.load_state_dict(torch.load(files[-1], weights_only=True))
        return "load_state_dict (strict)"

    return load


def gpt2_state_dicts(work: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = work / "gpt2-pt"
    out.mkdir()
    for epoch in range(1, EPOCHS + 1):
        loss = model(data()[:8], labels=data()[:8]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.save(model.state_dict(), out / f"epoch_{epoch}.pt")
    return out


def gpt2_load(files: list[str]) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    sd = torch.load(files[-1], weights_only=True)
    shared = sd["lm_head.weight"].untyped_storage().data_ptr() == (
        sd["transformer.wte.weight"].untyped_storage().data_ptr()
    )
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    )
    model.load_state_dict(sd)
    return f"load_state_dict (lm_head shares wte: {shared})"


def dcp_run(work: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    out = work / "dcp"
    x = torch.randn(64, 4)
    for epoch in range(1, EPOCHS + 1):
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        dcp.save(state, checkpoint_id=str(out / f"step-{epoch * 10}"), no_dist=True)
    return out


def dcp_load(files: list[str]) -> str:
    import torch.distributed.checkpoint as dcp

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=files[-1], no_dist=True)
    model.load_state_dict(state["model"])
    return "torch.distributed.checkpoint.load"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cmdtool-frameworks-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rows = []
    import lightning
    import transformers

    versions = (
        f"cmdtool {cmdtool.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, lightning {lightning.__version__}"
    )
    hf = hf_trainer(work)
    rows.append(check("HF Trainer + save_model", hf, work, hf_load))
    rows.append(check("HF Trainer, --labels epoch", hf, work, hf_load, label_by="epoch"))
    lit = lightning_run(work, averaging=False)
    rows.append(check("Lightning save_last", lit, work, lightning_load))
    avg = lightning_run(work, averaging=True)
    rows.append(check("Lightning WeightAveraging (raw)", avg, work, lightning_load))
    rows.append(
        check(
            "Lightning WeightAveraging (--state averaged)",
            avg,
            work,
            lightning_load,
            state="averaged",
        )
    )

    def plain() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    comp = plain_run(work, "compile", lambda m: torch.compile(m, backend="eager"))
    rows.append(
        check(
            "torch.compile",
            comp,
            work,
            state_dict_load(lambda: torch.compile(plain(), backend="eager")),
        )
    )
    swa = plain_run(work, "averaged", torch.optim.swa_utils.AveragedModel)
    rows.append(
        check(
            "AveragedModel",
            swa,
            work,
            state_dict_load(lambda: torch.optim.swa_utils.AveragedModel(plain())),
        )
    )
    rows.append(check("GPT-2 torch.save (tied)", gpt2_state_dicts(work), work, gpt2_load))
    rows.append(check("torch.distributed.checkpoint", dcp_run(work), work, dcp_load))

    cols = [
        "variant",
        "epochs",
        "skipped",
        "tensors from",
        "N",
        "max abs(row - source)",
        "rebuilt",
        "loaded back with",
        "result",
        "s",
    ]
    print(f"\n{versions}; {EPOCHS} epochs each, 3 modes\n")
    print("| " + " | ".join(cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    (work / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
