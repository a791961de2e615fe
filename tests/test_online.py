"""Online and embedded CMD inside real training loops (cmdtool.online).

Real torch models and optimizers, real zarr stores; each test keeps its own history of
the parameters to check the O(N) running state against float64 numpy.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math

import numpy as np
import pytest
import torch
from torch import nn

from cmdtool.decomposition import CMD
from cmdtool.errors import MismatchError, UsageError
from cmdtool.method.sampling import sample_indices
from cmdtool.online import EmbeddedCMD, OnlineCMD, WarmupError
from cmdtool.store import POOL_SIZE, EpochInfo, ParamInfo, TrajectoryStore
from tests.cmd_reference import _affine

N_FEATURES = 6


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, 12), nn.Tanh(), nn.Linear(12, 4))


def _batches(epoch: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same minibatches for a given epoch in every run (seeded by the epoch)."""
    g = torch.Generator().manual_seed(1000 + epoch)
    out = []
    for _ in range(n):
        x = torch.randn(32, N_FEATURES, generator=g)
        y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        out.append((x, y))
    return out


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, epoch: int) -> None:
    for x, y in _batches(epoch):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def _rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _batch_cmd(tmp_path, model, snapshots, modes, samples, seed) -> CMD:
    """Post-hoc CMD on a store holding just these epochs, laid out in parameter order."""
    infos, off = [], 0
    for name, p in model.named_parameters():
        infos.append(ParamInfo(name, tuple(p.shape), "float32", off))
        off += p.numel()
    sizes = [p.size for p in infos]
    pool = sample_indices(sizes, min(POOL_SIZE, off), seed=0)
    with TrajectoryStore.create(tmp_path / "batch.zarr", infos, pool_index=pool) as st:
        for t, w in enumerate(snapshots):
            row = st.begin_epoch()
            st.write_row_block(row, 0, w)
            st.write_pool_row(row, w[pool])
            st.commit_epoch(EpochInfo(label=t + 1, source=f"epoch {t + 1}"))
        return CMD(modes, n_samples=min(samples, off), seed=seed, device="cpu").fit(st)


# ---------------------------------------------------------------------------- online
def test_online_matches_float64_least_squares_and_batch_cmd(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    warmup, extra, modes, samples, seed = 8, 14, 4, 100, 3
    est = OnlineCMD(model, modes=modes, samples=samples, warmup=warmup, seed=seed)
    history = []
    for epoch in range(warmup + extra):
        _train_epoch(model, opt, epoch)
        est.step()
        history.append(_flat(model).numpy().copy())
        if epoch + 1 == warmup:
            batch = _batch_cmd(tmp_path, model, history, modes, samples, seed)
            assert np.array_equal(est.labels_.numpy(), batch.labels_.astype(np.int64))
            assert np.array_equal(est.ref_index_.numpy(), batch.ref_index_)
            assert est.n_modes_ == batch.n_modes_
            # right after the warm-up the fit is the batch one (float32 there)
            assert _rel(est.a_.numpy(), batch.a_.astype(np.float64)) <= 1e-5

    assert est.n_epochs_ == warmup + extra
    w = np.stack(history, axis=1).astype(np.float64)  # (N, T), this test's own history
    labels = est.labels_.numpy()
    ref_index = est.ref_index_.numpy()
    refs = w[ref_index][labels]
    a, b = _affine(w, refs)
    assert est.a_.dtype == torch.float64 and est.a_.shape == (w.shape[0],)
    assert _rel(est.a_.numpy(), a) <= 1e-5
    assert _rel(est.b_.numpy(), b) <= 1e-5
    resid = w - (a[:, None] * refs + b[:, None])
    assert est.relative_error_ == pytest.approx(np.linalg.norm(resid) / np.linalg.norm(w), abs=1e-4)
    assert est.mode_errors_.shape == (est.n_modes_,)

    # the CMD weights at the last epoch, in the parameters' names, shapes and dtypes
    sd = est.state_dict()
    expect = a * w[ref_index][labels][:, -1] + b
    got = torch.cat([sd[n].reshape(-1) for n, _ in model.named_parameters()]).double().numpy()
    assert _rel(got, expect) <= 1e-5
    for name, p in model.named_parameters():
        assert sd[name].shape == p.shape and sd[name].dtype == p.dtype
    model.load_state_dict(sd)  # complete: the model has no buffers
    assert est.partial_fit() is est and est.n_epochs_ == warmup + extra + 1


def _tensor_elements(obj, seen=None) -> int:
    """Elements of every tensor and array reachable from obj's own state."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, np.ndarray):
        return obj.size
    if isinstance(obj, dict):
        return sum(_tensor_elements(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple | set):
        return sum(_tensor_elements(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_tensor_elements(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if type(obj).__module__.startswith("cmdtool") and hasattr(obj, "__dict__"):
        return sum(_tensor_elements(v, seen) for v in vars(obj).values())
    return 0


def test_state_stays_o_n_and_temporary_workdir_is_removed(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    warmup = 5
    est = OnlineCMD(model, modes=3, samples=60, warmup=warmup)
    assert est.workdir_ is None  # nothing on disk before the first epoch
    counts = {}
    for epoch in range(warmup + 20):
        _train_epoch(model, opt, epoch)
        est.step()
        if epoch + 1 < warmup:
            assert (est.workdir_ / "warmup.zarr" / "zarr.json").is_file()
            assert est.workdir_.name.startswith("cmdtool-online-")
        else:
            assert not est.workdir_.exists()
        counts[epoch + 1] = _tensor_elements(est)
    assert counts[warmup + 1] == counts[warmup + 20]
    n = est.n_params_
    assert counts[warmup + 20] < 12 * n  # a handful of (N,) tensors, no (N, T)

    # a temporary folder also goes away with the object mid-warm-up
    other = OnlineCMD(model, modes=3, samples=60, warmup=warmup)
    other.step()
    folder = other.workdir_
    assert folder.exists()
    del other
    gc.collect()
    assert not folder.exists()

    # a workdir given by the user is kept: a normal store with the warm-up decomposition
    kept = OnlineCMD(model, modes=3, samples=60, warmup=3, workdir=tmp_path / "work")
    for _ in range(4):
        kept.step()
    with TrajectoryStore.open(tmp_path / "work" / "warmup.zarr") as st:
        assert st.n_epochs == 3 and st.result_names() == ["cmd"]
        assert [p.name for p in st.params] == [n for n, _ in model.named_parameters()]
    fitted = CMD.load(tmp_path / "work" / "warmup.zarr")
    assert np.array_equal(fitted.ref_index_, kept.ref_index_.numpy())


def test_parameters_that_are_modelled():
    model = _model()
    model[0].bias.requires_grad_(False)
    est = OnlineCMD(model, modes=2, samples=20, warmup=3)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert est.n_params_ == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # (name, tensor) pairs: plain tensors too, non-float ones left out
    pairs = [("x", torch.randn(5, 3)), ("step", torch.tensor(3)), ("y", torch.randn(7))]
    est2 = OnlineCMD(pairs, modes=2, samples=10, warmup=3)
    for _ in range(3):
        pairs[0][1].add_(torch.randn(5, 3))
        pairs[2][1].mul_(1.1)
        est2.step()
    assert sorted(est2.state_dict()) == ["x", "y"]
    assert est2.state_dict()["x"].shape == (5, 3)
    est.close()
    assert names == ["0.weight", "2.weight", "2.bias"]


# -------------------------------------------------------------------------- embedded
def test_embedded_freezes_least_moving_parameters_and_holds_them():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    warmup, every, fraction = 5, 2, 0.25
    est = EmbeddedCMD(
        model, opt, every=every, fraction=fraction, modes=3, samples=80, warmup=warmup
    )
    n = est.n_params_
    history: list[np.ndarray] = []
    prev_ab = None
    checks = 0
    for epoch in range(warmup + 4 * every + 1):
        frozen = est.frozen_.clone()
        before = _flat(model).clone()
        for x, y in _batches(epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            assert torch.all(_flat_grad(model)[frozen] == 0)
            opt.step()
            now = _flat(model)
            assert torch.equal(now[frozen], before[frozen])  # not moved by the optimizer
        assert not torch.equal(now[~frozen], before[~frozen])  # the others train
        n_before = int(frozen.sum())
        est.step()
        history.append(_flat(model).double().numpy().copy())
        if epoch + 1 < warmup:
            assert not est.frozen_.any()
            continue

        a, b = est.a_.numpy(), est.b_.numpy()
        labels, ref_index = est.labels_.numpy(), est.ref_index_.numpy()
        w = _flat(model)
        r = w[est.ref_index_].double()
        cmd = (est.a_ * r[est.labels_] + est.b_).to(torch.float32)
        assert torch.equal(w[est.frozen_], cmd[est.frozen_])  # exactly a·r(t) + b
        assert not est.frozen_[est.ref_index_].any()
        frozen_now = est.frozen_.numpy()
        assert np.all(frozen_now[frozen.numpy()])  # never unfrozen
        if prev_ab is not None:  # frozen (a, b) stay as they were when frozen
            assert np.array_equal(a[frozen.numpy()], prev_ab[2][frozen.numpy()])

        since = epoch + 1 - warmup
        if since == 0:
            prev_ab = (a.copy(), b.copy(), a.copy())
            assert est.frozen_fraction_ == 0
        elif since % every:
            assert int(est.frozen_.sum()) == n_before
        else:
            checks += 1
            cand = n - n_before - len(ref_index)
            k = max(1, math.floor(fraction * cand + 0.5))
            assert int(est.frozen_.sum()) == n_before + k
            assert est.frozen_fraction_ == pytest.approx((n_before + k) / n)
            # the newly frozen moved least, measured independently from the history
            traj = np.stack(history, axis=1)[ref_index]  # (M, t)
            er, er2 = traj.mean(axis=1)[labels], (traj**2).mean(axis=1)[labels]
            da, db = a - prev_ab[0], b - prev_ab[1]
            move = np.sqrt(np.clip(da * da * er2 + 2 * da * db * er + db * db, 0, None))
            new = frozen_now & ~frozen.numpy()
            rest = ~frozen_now
            rest[ref_index] = False
            assert move[new].max() <= move[rest].min() * (1 + 1e-6) + 1e-12
            prev_ab = (a.copy(), b.copy(), a.copy())
    assert checks == 4
    est.close()
    # hooks removed: the frozen entries train again
    frozen = est.frozen_.clone()
    before = _flat(model).clone()
    _train_epoch(model, opt, 99)
    assert not torch.equal(_flat(model)[frozen], before[frozen])


def test_embedded_without_optimizer_masks_gradients_and_resets_at_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    est = EmbeddedCMD(model, every=1, fraction=0.5, modes=2, samples=40, warmup=3)
    for epoch in range(5):
        _train_epoch(model, opt, epoch)
        est.step()
    frozen = est.frozen_.clone()
    assert frozen.any()
    _train_epoch(model, opt, 5)
    assert torch.all(_flat_grad(model)[frozen] == 0)
    est.step()
    w = _flat(model)
    r = w[est.ref_index_].double()
    cmd = (est.a_ * r[est.labels_] + est.b_).to(torch.float32)
    assert torch.equal(w[frozen], cmd[frozen])


# ---------------------------------------------------------------------------- resume
def _make(cls, model, opt, **kw):
    settings = {"modes": 3, "samples": 80, "warmup": 5, "seed": 1, **kw}
    if cls is EmbeddedCMD:
        return EmbeddedCMD(model, opt, every=2, fraction=0.3, **settings)
    return OnlineCMD(model, **settings)


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def _results(est, model):
    out = {f"sd.{k}": v.clone() for k, v in est.state_dict().items()}
    out.update(a=est.a_.clone(), b=est.b_.clone(), labels=est.labels_.clone(), w=_flat(model))
    if isinstance(est, EmbeddedCMD):
        out["frozen"] = est.frozen_.clone()
    return out, est.relative_error_, est.n_epochs_


@pytest.mark.parametrize("cls", [OnlineCMD, EmbeddedCMD])
@pytest.mark.parametrize("stop", [3, 8])  # mid-warm-up, after warm-up (and a freeze)
def test_save_and_resume_give_identical_results(tmp_path, cls, stop):
    epochs = 12
    model = _model()
    opt = _opt(model)
    est = _make(cls, model, opt)
    for epoch in range(epochs):
        _train_epoch(model, opt, epoch)
        est.step()
    expected = _results(est, model)
    est.close()

    model = _model()
    opt = _opt(model)
    est = _make(cls, model, opt)
    for epoch in range(stop):
        _train_epoch(model, opt, epoch)
        est.step()
    path = tmp_path / "online.safetensors"
    est.save(path)
    assert (tmp_path / "online.safetensors.warmup.zarr").is_dir() == (stop < 5)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    est.close()
    del est, model, opt

    model = _model(seed=7)  # other initial values, replaced by the saved ones
    model.load_state_dict(saved_model)
    opt = _opt(model)
    opt.load_state_dict(saved_opt)
    kw = {"optimizer": opt} if cls is EmbeddedCMD else {}
    est = cls.resume(path, model, **kw)
    assert est.n_epochs_ == stop
    for epoch in range(stop, epochs):
        _train_epoch(model, opt, epoch)
        est.step()
    got = _results(est, model)
    assert got[1] == expected[1] and got[2] == expected[2]
    assert got[0].keys() == expected[0].keys()
    for key, value in expected[0].items():
        assert torch.equal(got[0][key], value), key
    est.close()
    # a saved file stays usable: resuming twice starts from the same state
    again = cls.resume(path, _model(), **kw)
    assert again.n_epochs_ == stop
    again.close()


@pytest.mark.parametrize("stop", [3, 8])  # mid-warm-up, after warm-up (and a freeze)
def test_to_state_and_from_state_continue_in_memory(tmp_path, stop):
    """The in-memory form of save/resume (used by the training-framework callbacks)."""
    epochs = 10
    model = _model()
    opt = _opt(model)
    est = _make(EmbeddedCMD, model, opt)
    for epoch in range(epochs):
        _train_epoch(model, opt, epoch)
        est.step()
    expected = _results(est, model)
    est.close()

    model = _model()
    opt = _opt(model)
    est = _make(EmbeddedCMD, model, opt)
    for epoch in range(stop):
        _train_epoch(model, opt, epoch)
        est.step()
    meta, tensors = est.to_state()
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    if stop < 5:
        assert tensors == {} and not meta["warmup_finished"]
        est.copy_warmup(tmp_path / "warm.zarr")
    else:
        before = {k: v.clone() for k, v in tensors.items()}
        _train_epoch(model, opt, stop)
        est.step()  # the state taken is a copy: later steps leave it alone
        assert all(torch.equal(tensors[k], v) for k, v in before.items())
    est.close()
    del est

    model = _model(seed=7)
    model.load_state_dict(saved_model)
    opt = _opt(model)
    opt.load_state_dict(saved_opt)
    est = EmbeddedCMD.from_state(
        meta, tensors, model, optimizer=opt, warmup_store=tmp_path / "warm.zarr"
    )
    for epoch in range(stop, epochs):
        _train_epoch(model, opt, epoch)
        est.step()
    got = _results(est, model)
    assert got[1] == expected[1] and got[2] == expected[2]
    for key, value in expected[0].items():
        assert torch.equal(got[0][key], value), key
    est.close()
    with pytest.raises(MismatchError, match="differ from the saved ones"):
        EmbeddedCMD.from_state(meta, tensors, nn.Linear(3, 2), optimizer=None)


# ------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_clear_errors(tmp_path):
    model = _model()
    with pytest.raises(UsageError, match="warm-up 2 is shorter than 3 epochs"):
        OnlineCMD(model, warmup=2)
    with pytest.raises(UsageError, match="warm-up longer than the run"):
        OnlineCMD(model, warmup=10, total_epochs=5)
    with pytest.raises(UsageError, match=r"modes=20 must be >= 1 and <= .* 10"):
        OnlineCMD(model, modes=20, samples=10)
    with pytest.raises(UsageError, match="no floating-point parameter"):
        OnlineCMD([("steps", torch.zeros(3, dtype=torch.int64))])
    with pytest.raises(UsageError, match="no floating-point parameter"):
        OnlineCMD(_model().requires_grad_(False))
    with pytest.raises(UsageError, match="fraction=0"):
        EmbeddedCMD(model, fraction=0.0)

    est = OnlineCMD(model, modes=2, samples=20, warmup=10, total_epochs=10)
    for _ in range(3):
        est.step()
    with pytest.raises(UsageError, match="OnlineCMD has seen 3 of 10 warm-up epochs"):
        est.state_dict()
    with pytest.raises(WarmupError):
        _ = est.a_
    assert not hasattr(est, "labels_")

    model[2].weight.data = torch.zeros(5, 12)
    with pytest.raises(MismatchError, match=r"'2\.weight' has shape \(5, 12\), it had \(4, 12\)"):
        est.step()
    model[2].weight = nn.Parameter(torch.zeros(4, 12))
    with pytest.raises(MismatchError, match=r"'2\.weight' was replaced"):
        est.step()
    est.close()
    with pytest.raises(UsageError, match="closed"):
        est.step()
    with pytest.raises(UsageError, match="closed during the warm-up"):
        est.save(tmp_path / "closed.safetensors")

    # resuming with another model, or a missing file
    small = _model()
    est = OnlineCMD(small, modes=2, samples=20, warmup=3)
    for _ in range(3):
        est.step()
    est.save(tmp_path / "s.safetensors")
    other = nn.Sequential(nn.Linear(N_FEATURES, 5))
    with pytest.raises(MismatchError, match="differ from the saved ones"):
        OnlineCMD.resume(tmp_path / "s.safetensors", other)
    with pytest.raises(UsageError, match="saved by OnlineCMD"):
        EmbeddedCMD.resume(tmp_path / "s.safetensors", small)
    with pytest.raises(FileNotFoundError):
        OnlineCMD.resume(tmp_path / "missing.safetensors", small)
