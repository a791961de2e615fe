"""cmdtool.online.federated: the server's embedded CMD, what travels, exact counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cmdtool.errors import MismatchError, UsageError
from cmdtool.online.federated import FederatedClient, FederatedCMD

C = 3


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))  # N = 25 + 12 = 37


def names_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def flat_np(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def synthetic_updates(
    server: FederatedCMD, model: nn.Module, t: int, rng: np.random.Generator
) -> list[dict[str, torch.Tensor]]:
    """Per client: the global values at the send mask plus a drift shared by a few groups
    of parameters (so that trajectories correlate) and client noise."""
    plan = server.round_plan()
    out = []
    for j in range(C):
        upd = {}
        for k, (name, p) in enumerate(model.named_parameters()):
            mask = plan.send[name].numpy()
            base = p.detach().numpy()[mask].astype(np.float64)
            drift = 0.1 * (k % 2 + 1) * np.sin(0.3 * t + np.arange(base.size) % 3)
            noise = 0.01 * rng.standard_normal(base.size)
            upd[name] = torch.from_numpy((base + drift + noise + 0.001 * j).astype(np.float32))
        out.append(upd)
    return out


def drive(rounds: int, *, warmup: int = 3, every: int = 1, percent: float = 30.0):
    """Run the server over synthetic rounds; keep each plan, the updates and the model
    after aggregation."""
    model = tiny_model()
    server = FederatedCMD(
        model, C, warmup=warmup, every=every, percent=percent, modes=2, samples=37, rounds=rounds
    )
    rng = np.random.default_rng(1)
    log = []
    for t in range(rounds):
        plan = server.round_plan()
        before = flat_np(model)
        updates = synthetic_updates(server, model, t, rng)
        weights = [1.0, 2.0, 3.0]
        counts = server.aggregate(updates, weights=weights)
        log.append((plan, updates, weights, before, flat_np(model), counts))
    return model, server, log


def test_counts_match_masks_both_directions():
    model, server, log = drive(8)
    n = 37
    announced = np.zeros(n, dtype=bool)
    refs_sent = False
    totals = []
    for plan, _, _, _, _, counts in log:
        send = np.concatenate([plan.send[name].numpy().ravel() for name, _ in names_shapes(model)])
        frozen = ~send
        new = frozen & ~announced
        down_one = int(send.sum()) + 4 * int(new.sum())
        if new.any() and not refs_sent:
            down_one += server.cmd_.n_modes_  # the references' indices, once
            refs_sent = True
        announced |= frozen
        assert counts.up == C * int(send.sum())
        assert counts.down == C * down_one
        assert counts.frozen == int(frozen.sum())
        assert counts.plain == 2 * C * n
        totals.append(counts.up + counts.down)
    got = server.counts()
    assert got["total"].dtype == np.int64
    assert got["total"].tolist() == totals
    assert announced.sum() > 0  # something froze: the counts above were not all trivial
    # plan: 3 warm-up rounds, then each round 30% of the candidates: sends fall
    assert got["up"][-1] < got["up"][2]


def test_aggregate_is_weighted_mean_and_frozen_follow_cmd_model():
    model, server, log = drive(8)
    a = np.zeros(37)
    b = np.zeros(37)
    labels = np.zeros(37, dtype=np.int64)
    frozen = np.zeros(37, dtype=bool)
    ref_index = None
    checked = 0
    prev_after = None
    for i, (plan, updates, weights, _, after, _) in enumerate(log):
        if plan.freeze is not None:
            f = plan.freeze
            if f.ref_index is not None:
                ref_index = f.ref_index.numpy()
            idx = f.index.numpy()
            a[idx], b[idx], labels[idx] = f.a.numpy(), f.b.numpy(), f.labels.numpy()
            frozen[idx] = True
            # frozen at the end of the previous round: they held a*r+b from then on
            r = prev_after[ref_index].astype(np.float64)
            np.testing.assert_array_equal(
                prev_after[idx], (a[idx] * r[labels[idx]] + b[idx]).astype(np.float32)
            )
        # entries that freeze at the end of this round are announced in the next plan
        nxt = log[i + 1][0] if i + 1 < len(log) else None
        still = (
            np.concatenate([nxt.send[n].numpy().ravel() for n, _ in names_shapes(model)])
            if nxt is not None
            else ~server.frozen_.numpy()
        )
        w = np.asarray(weights) / np.sum(weights)
        offset = 0
        for name, shape in names_shapes(model):
            size = int(np.prod(shape))
            mask = plan.send[name].numpy().ravel()
            mean = sum(
                wj * u[name].numpy().astype(np.float64) for wj, u in zip(w, updates, strict=True)
            )
            keep = still[offset : offset + size][mask]
            np.testing.assert_array_equal(
                after[offset : offset + size][mask][keep], mean.astype(np.float32)[keep]
            )
            offset += size
        assert server.history_[plan.round].frozen == int(frozen.sum())  # not sent this round
        # every entry frozen before this round holds a*r(t)+b with r the new references
        if frozen.any():
            r = after[ref_index].astype(np.float64)
            want = (a * r[labels] + b).astype(np.float32)
            np.testing.assert_array_equal(after[frozen], want[frozen])
            checked += 1
        prev_after = after
    assert checked >= 3


def test_frozen_stay_frozen_and_references_never_freeze():
    model, server, log = drive(9, percent=40.0)
    prev = np.zeros(37, dtype=bool)
    for plan, *_ in log:
        frozen = ~np.concatenate([plan.send[n].numpy().ravel() for n, _ in names_shapes(model)])
        assert not (prev & ~frozen).any()  # once frozen, frozen in every later round
        prev = frozen
    assert prev.sum() > 0
    assert not prev[server.cmd_.ref_index_.numpy()].any()
    # a frozen entry is not taken from the clients: values sent there change nothing
    plan = server.round_plan()
    assert plan.freeze is None or plan.freeze.index.numel() > 0


def test_client_rebuilds_the_global_model_exactly():
    model = tiny_model()
    server = FederatedCMD(model, C, warmup=3, every=1, percent=50.0, modes=2, samples=37)
    client = FederatedClient(tiny_model(seed=5))  # starts from other values
    rng = np.random.default_rng(2)
    for t in range(7):
        plan = server.round_plan()
        client.receive(plan, server.broadcast())
        np.testing.assert_array_equal(flat_np(client.model), flat_np(model))
        np.testing.assert_array_equal(client.frozen_.numpy(), server.frozen_.numpy())
        server.aggregate(synthetic_updates(server, model, t, rng))
    assert bool(server.frozen_.any())


def train_locally(model: nn.Module, client: FederatedClient, x, y, steps: int = 5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masks = client.frozen_masks()
    params = dict(model.named_parameters())
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for name, m in masks.items():
            params[name].grad.masked_fill_(m, 0.0)
        opt.step()
    client.restore_frozen()


def test_end_to_end_three_clients_fedavg():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(12, 4, generator=gen) for _ in range(C)]
    ys = [torch.randint(0, 2, (12,), generator=gen) for _ in range(C)]
    sizes = [12, 12, 12]
    model = tiny_model()
    server = FederatedCMD(model, C, warmup=3, every=1, percent=30.0, modes=2, samples=37, rounds=6)
    models = [tiny_model(seed=10 + j) for j in range(C)]
    clients = [FederatedClient(m) for m in models]
    for _ in range(6):
        plan = server.round_plan()
        msg = server.broadcast()
        for m, cl, x, y in zip(models, clients, xs, ys, strict=True):
            cl.receive(plan, msg)
            start = flat_np(m)
            train_locally(m, cl, x, y)
            fz = cl.frozen_.numpy()
            np.testing.assert_array_equal(flat_np(m)[fz], start[fz])  # frozen: not trained
        sent = [cl.send() for cl in clients]
        locals_ = [flat_np(m) for m in models]
        server.aggregate(sent, weights=sizes)
        send = np.concatenate([plan.send[n].numpy().ravel() for n, _ in names_shapes(model)])
        want = np.mean(np.stack([v.astype(np.float64) for v in locals_]), axis=0)
        keep = send & ~server.frozen_.numpy()  # not frozen by this round's check
        np.testing.assert_array_equal(flat_np(model)[keep], want.astype(np.float32)[keep])
        assert sum(v.numel() for v in sent[0].values()) == int(send.sum())
    c = server.counts()
    assert c["up"].sum() == C * sum(37 - f for f in c["frozen"])
    assert c["frozen"][-1] > 0
    server.close()


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"percent": 0.0}, "percent"),
        ({"percent": 100.5}, "percent"),
        ({"percent": float("nan")}, "percent"),
        ({"every": 0}, "every"),
        ({"warmup": 2}, "warmup"),
        ({"warmup": 6, "rounds": 5}, "warm-up longer than the run"),
        ({"n_clients": 0}, "n_clients"),
    ],
)
def test_bad_settings_are_usage_errors(kwargs, culprit):
    settings = {"n_clients": C, "warmup": 3, "every": 1, "percent": 10.0, "modes": 2}
    settings.update(kwargs)
    model = tiny_model()
    before = flat_np(model)
    with pytest.raises(UsageError, match=culprit):
        FederatedCMD(model, settings.pop("n_clients"), **settings)
    np.testing.assert_array_equal(flat_np(model), before)


def test_bad_updates_leave_the_global_model_untouched():
    model = tiny_model()
    server = FederatedCMD(model, C, warmup=3, modes=2, samples=37)
    good = [{n: p.detach().reshape(-1).clone() for n, p in model.named_parameters()}] * C
    before = flat_np(model)
    with pytest.raises(UsageError, match="2 client updates for 3 clients"):
        server.aggregate(good[:2])
    with pytest.raises(MismatchError, match=r"lacks the tensor '2\.bias'"):
        server.aggregate([good[0], good[1], {k: v for k, v in good[2].items() if k != "2.bias"}])
    short = dict(good[2], **{"0.weight": torch.zeros(3)})
    with pytest.raises(MismatchError, match=r"'0\.weight' has shape \(3,\)"):
        server.aggregate([good[0], good[1], short])
    with pytest.raises(UsageError, match="weights"):
        server.aggregate(good, weights=[1.0, -1.0, 1.0])
    np.testing.assert_array_equal(flat_np(model), before)
    assert server.history_ == [] and server.cmd_.n_epochs_ == 0
    with pytest.raises(UsageError, match="send\\(\\) before receive"):
        FederatedClient(tiny_model()).send()
