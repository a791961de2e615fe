"""OnlineCMD after the warm-up: constant parameters stay outside the modes and are rebuilt
exactly; normalization statistics are rebuilt as post-hoc CMD's default (``gated``)
(issue 12, item 2)."""

from __future__ import annotations

import numpy as np
import torch

from cmdtool.online import OnlineCMD
from tests.conftest import planted

N, T, M, F = 2400, 24, 4, 10  # parameters, epochs, planted modes, warm-up
S = 40  # BatchNorm channels


def _purity(labels: np.ndarray, groups: np.ndarray) -> float:
    """Share of parameters whose found mode's majority planted group is their own."""
    right = 0
    for mode in np.unique(labels):
        members = groups[labels == mode]
        right += np.bincount(members).max()
    return right / labels.size


def _trajectories() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Planted weights (N, T) with 15% exactly constant, and BatchNorm running stats:
    ``running_mean`` following the planted modes, ``running_var`` decaying like a moving
    average from 1 to ~0.05 (a mode of its own, whose affine fit overshoots)."""
    w, groups, _ = planted(N + S, T, M, seed=4, noise=0.02)
    mean, w, groups = w[N:], w[:N], groups[:N]
    rng = np.random.default_rng(9)
    const = np.zeros(N, dtype=bool)
    const[rng.choice(N, size=int(0.15 * N), replace=False)] = True
    w[const] = rng.normal(size=(int(const.sum()), 1))
    t = np.arange(T)
    scale = rng.uniform(0.02, 0.08, size=(S, 1))
    var = scale + (1.0 - scale) * 0.35**t + 0.002 * rng.random((S, T))
    var[: S // 2, T - 6 :] *= 6.0  # after the warm-up half the channels jump: the gate
    return w, groups, const, np.concatenate([mean, var])


def test_constants_stay_out_of_the_modes_and_statistics_are_gated():
    # guards: incremental._finish_warmup (the warm-up's `constant` kept), _update_coefficients
    # (coefficients/mode_totals given the mask) and state_dict (gated_stats)
    w, groups, const, stats = _trajectories()
    w32 = w.astype(np.float32)
    stats32 = stats.astype(np.float32)
    weight = torch.zeros(N, dtype=torch.float32)
    bn = {k: torch.zeros(S, dtype=torch.float32) for k in ("running_mean", "running_var")}
    pairs = [("w", weight), ("bn.running_mean", bn["running_mean"])]
    pairs.append(("bn.running_var", bn["running_var"]))
    cmd = OnlineCMD(pairs, modes=M + 1, samples=600, warmup=F, seed=1)  # + the variances
    gated = kept = 0
    for t in range(T):
        weight.copy_(torch.from_numpy(w32[:, t]))
        bn["running_mean"].copy_(torch.from_numpy(stats32[:S, t]))
        bn["running_var"].copy_(torch.from_numpy(stats32[S:, t]))
        cmd.step()
        if t + 1 < F:
            continue
        if t + 1 == F:
            constant = cmd.constant_.numpy()
            wl = cmd.labels_.numpy()[:N]
            assert np.array_equal(constant[:N], const)
            assert not constant[cmd.ref_index_.numpy()].any()
            assert len(np.unique(wl[~const])) == M  # no planted mode lost
            assert len(np.unique(cmd.labels_.numpy()[N:])) >= 2  # the variances: their own
            assert _purity(wl[~const], groups[~const]) >= 0.99
        state = cmd.state_dict()
        a, b = cmd.a_.numpy(), cmd.b_.numpy()
        assert np.all(a[:N][const] == 0)
        # the constants, exactly, bit for bit, at every epoch after the warm-up
        got = state["w"].numpy()
        assert np.array_equal(got[const], w32[const, t])
        assert np.array_equal(cmd.labels_.numpy()[:N], wl)  # modes fixed after the warm-up
        # the statistics: post-hoc's gated rule recomputed here in float64 per tensor
        flat = np.concatenate([w32[:, t], stats32[:, t]]).astype(np.float64)
        modelled = a * flat[cmd.ref_index_.numpy()][cmd.labels_.numpy()] + b
        for i, name in enumerate(("bn.running_mean", "bn.running_var")):
            m = modelled[N + i * S : N + (i + 1) * S]
            raw = stats32[i * S : (i + 1) * S, t].astype(np.float64)
            far = np.linalg.norm(m - raw) > 0.3 * np.linalg.norm(raw)
            expect = raw if far else m
            if name.endswith("var"):
                expect = np.where(np.isfinite(expect) & (expect >= 0), expect, raw)
                gated += int(far)
                kept += int(not far)
            assert np.allclose(state[name].numpy(), expect, rtol=1e-6, atol=1e-7), (name, t)
        var = state["bn.running_var"]
        assert bool(torch.isfinite(var).all()) and bool((var >= 0).all())
    # both sides of the gate were exercised over the epochs
    assert gated > 0 and kept > 0
    # the overall error counts the constants (exact) in a slot of their own
    assert len(cmd.mode_errors_) == M + 1
    cmd.close()


def test_saved_state_keeps_the_constant_mask(tmp_path):
    w, _, const, _ = _trajectories()
    w32 = w.astype(np.float32)
    weight = torch.zeros(N, dtype=torch.float32)
    cmd = OnlineCMD([("w", weight)], modes=M, samples=600, warmup=F, seed=1)
    for t in range(F + 2):
        weight.copy_(torch.from_numpy(w32[:, t]))
        cmd.step()
    cmd.save(tmp_path / "state.safetensors")
    again = OnlineCMD.resume(tmp_path / "state.safetensors", [("w", weight)])
    for t in range(F + 2, T):
        weight.copy_(torch.from_numpy(w32[:, t]))
        again.step()
        assert np.array_equal(again.constant_.numpy(), const)
        assert np.array_equal(again.state_dict()["w"].numpy()[const], w32[const, t])
        assert np.all(again.a_.numpy()[const] == 0)
    cmd.close()
    again.close()
