"""Embedded CMD on the server of federated learning (FedAvg), with exact communication
counts (``docs/design.md``, "Online and embedded CMD"; the follow-up paper's federated
experiment).

Each round the server sends the global model to every client, each client trains locally
and sends its model back, and the server averages (FedAvg). :class:`FederatedCMD` runs
:class:`~cmdtool.online.EmbeddedCMD` on the global model, one step per round: after a
warm-up of F rounds it fits CMD once, and every L rounds it freezes the share P of the
not-yet-frozen, non-reference parameters whose ``(a, b)`` moved least. A frozen parameter
travels in neither direction again: the server and every client compute it as
``a·r_m(t) + b`` from its mode's reference ``r_m`` (references are never frozen, so their
M values travel every round with the other unfrozen values) and the ``(a, b)`` sent once,
when it froze. :class:`FederatedClient` is the client's side of that bookkeeping.

What travels, per client and round (numbers, whatever their width):

* server → client: every unfrozen value (the references among them), plus a freezing
  message for the parameters frozen since the last round: their flat index, mode, ``a``
  and ``b`` (:data:`FREEZE_VALUES` = 4 numbers each), and, with the first such message,
  the M references' flat indices;
* client → server: every unfrozen value.

Plain FedAvg sends N values each way per client and round. Every client is assumed to
take part in every round (the freezing messages are not repeated for late joiners).

Typical use::

    server = FederatedCMD(global_model, n_clients=10, warmup=10, every=2, percent=10)
    clients = [FederatedClient(m) for m in client_models]
    for t in range(rounds):
        plan = server.round_plan()
        message = server.broadcast()
        for c in clients:
            c.receive(plan, message)
            train(c.model, mask=c.frozen_masks())   # frozen entries are not trained
        server.aggregate([c.send() for c in clients], weights=n_samples)
    server.history_                                 # exact counts per round
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cmdtool.decomposition import MIN_EPOCHS
from cmdtool.errors import MismatchError, UsageError
from cmdtool.online.embedded import EmbeddedCMD
from cmdtool.online.warmup import NamedParams, named_tensors, param_layout

#: Numbers sent per newly frozen parameter, once: flat index, mode, ``a``, ``b``.
FREEZE_VALUES = 4


@dataclass(frozen=True)
class FreezeMessage:
    """The parameters frozen since the previous round, sent once to every client.

    Attributes
    ----------
    index : Tensor, int64, shape (K,)
        Their flat indices (C order, the model's parameters concatenated).
    labels : Tensor, int64, shape (K,)
        Their modes.
    a, b : Tensor, float64, shape (K,)
        Their coefficients, fixed from now on.
    ref_index : Tensor, int64, shape (M,) or None
        The references' flat indices, with the first message only.
    """

    index: torch.Tensor
    labels: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    ref_index: torch.Tensor | None

    @property
    def size(self) -> int:
        """Numbers in the message."""
        refs = 0 if self.ref_index is None else int(self.ref_index.shape[0])
        return FREEZE_VALUES * int(self.index.shape[0]) + refs


@dataclass(frozen=True)
class RoundPlan:
    """What travels in one round.

    Attributes
    ----------
    round : int
        Round number, from 0.
    send : dict of str to Tensor, bool, the parameter's shape
        True where the value travels (both directions); False where it is frozen and
        computed from the CMD model on both sides.
    n_send : int
        Values sent each way per client (the True entries of ``send``).
    freeze : FreezeMessage or None
        Parameters frozen since the previous round (None: none).
    down_per_client, up_per_client : int
        Numbers sent server → client (``n_send`` + the freezing message) and client →
        server (``n_send``).
    """

    round: int
    send: dict[str, torch.Tensor]
    n_send: int
    freeze: FreezeMessage | None
    down_per_client: int
    up_per_client: int


@dataclass(frozen=True)
class RoundCounts:
    """Numbers communicated in one round, all clients together (exact integers).

    Attributes
    ----------
    round, clients : int
    down, up : int
        Server → clients and clients → server.
    frozen : int
        Parameters frozen (not sent) during the round.
    plain : int
        What plain FedAvg sends in the round, both directions: ``2 · clients · N``.
    """

    round: int
    clients: int
    down: int
    up: int
    frozen: int
    plain: int


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise UsageError(f"{name}={value!r} must be an integer >= {low}")
    return int(value)


class FederatedCMD:
    """The server's side: embedded CMD on the global model and what travels each round.

    Parameters
    ----------
    model_or_named_params : torch.nn.Module or iterable of (str, Tensor)
        The global model (its trainable floating parameters; buffers are not handled).
        Its values are updated in place by :meth:`aggregate`.
    n_clients : int
        C, the clients that take part in every round (>= 1).
    warmup : int, default 10
        F, rounds recorded before the one decomposition (>= 3, <= ``rounds``).
    every : int, default 2
        L, rounds between freezing checks (>= 1).
    percent : float, default 10.0
        P, percent of the not-yet-frozen, non-reference parameters frozen at each check,
        in (0, 100].
    modes, samples, seed, workdir
        As in :class:`~cmdtool.online.OnlineCMD`.
    rounds : int, optional
        Length of the run, only to check that the warm-up fits in it.

    Attributes
    ----------
    cmd_ : EmbeddedCMD
        The embedded CMD model of the global model.
    n_params_ : int
        N.
    history_ : list of RoundCounts
        One entry per aggregated round.

    Raises
    ------
    UsageError
        On a setting out of range (each named in the message).
    """

    def __init__(
        self,
        model_or_named_params: NamedParams,
        n_clients: int,
        *,
        warmup: int = 10,
        every: int = 2,
        percent: float = 10.0,
        modes: int = 10,
        samples: int = 1000,
        seed: int = 0,
        rounds: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.n_clients = _check_int("n_clients", n_clients, 1)
        self.every = _check_int("every (L, rounds between freezing checks)", every, 1)
        self.warmup = _check_int(
            f"warmup (F, rounds; CMD needs >= {MIN_EPOCHS})", warmup, MIN_EPOCHS
        )
        if rounds is not None:
            rounds = _check_int("rounds", rounds, 1)
            if self.warmup > rounds:
                raise UsageError(
                    f"warm-up longer than the run: warmup={self.warmup} > rounds={rounds}; "
                    f"use warmup <= {rounds}"
                )
        if (
            isinstance(percent, bool)
            or not isinstance(percent, int | float | np.floating | np.integer)
            or not math.isfinite(float(percent))
            or not 0.0 < float(percent) <= 100.0
        ):
            raise UsageError(f"percent={percent!r} (P) must be > 0 and <= 100")
        self.percent = float(percent)
        self.rounds = rounds
        self.cmd_ = EmbeddedCMD(
            model_or_named_params,
            every=self.every,
            fraction=self.percent / 100.0,
            modes=modes,
            samples=samples,
            warmup=self.warmup,
            seed=seed,
            workdir=workdir,
            total_epochs=rounds,
        )
        self._params = self.cmd_._params
        self._infos = self.cmd_._infos
        self.n_params_ = self.cmd_.n_params_
        self.history_: list[RoundCounts] = []
        self._announced = torch.zeros(self.n_params_, dtype=torch.bool)
        self._refs_sent = False
        self._plan: RoundPlan | None = None

    # ----------------------------------------------------------------- planning
    @property
    def round_(self) -> int:
        """The current round (rounds aggregated so far)."""
        return len(self.history_)

    @property
    def frozen_(self) -> torch.Tensor:
        """Frozen parameters, bool (N,), on the CPU."""
        return self.cmd_.frozen_.detach().cpu().clone()

    def round_plan(self) -> RoundPlan:
        """What travels in the current round (the same object until :meth:`aggregate`).

        Returns
        -------
        RoundPlan
        """
        if self._plan is not None:
            return self._plan
        frozen = self.frozen_
        send = {
            info.name: ~frozen[info.offset : info.offset + info.size].view(info.shape)
            for info in self._infos
        }
        n_send = int((~frozen).sum())
        new = torch.nonzero(frozen & ~self._announced).squeeze(1)
        freeze: FreezeMessage | None = None
        if int(new.shape[0]):
            cmd = self.cmd_
            freeze = FreezeMessage(
                index=new.clone(),
                labels=cmd.labels_.detach().cpu()[new].clone(),
                a=cmd.a_.detach().cpu().to(torch.float64)[new].clone(),
                b=cmd.b_.detach().cpu().to(torch.float64)[new].clone(),
                ref_index=None if self._refs_sent else cmd.ref_index_.detach().cpu().clone(),
            )
        down = n_send + (0 if freeze is None else freeze.size)
        self._plan = RoundPlan(
            round=self.round_,
            send=send,
            n_send=n_send,
            freeze=freeze,
            down_per_client=down,
            up_per_client=n_send,
        )
        return self._plan

    def broadcast(self) -> dict[str, torch.Tensor]:
        """The values the server sends this round: per tensor, its unfrozen entries.

        Returns
        -------
        dict of str to Tensor, 1-D, the parameter's dtype, on the CPU
            ``param[plan.send[name]]`` (C order), for every tensor.
        """
        plan = self.round_plan()
        return {name: p.detach().cpu()[plan.send[name]].clone() for name, p in self._params}

    # -------------------------------------------------------------- aggregating
    def aggregate(
        self,
        client_updates: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float] | None = None,
    ) -> RoundCounts:
        """FedAvg of the clients' unfrozen values, then one embedded-CMD step.

        The global model's unfrozen entries become the weighted mean (in float64) of the
        clients' values; the step then sets every frozen entry to ``a·r(t) + b`` from
        the references' new values, and at a check freezes more.

        Parameters
        ----------
        client_updates : sequence of C mappings of str to Tensor
            Per client, per tensor: its values at ``plan.send[name]``, 1-D (C order); a
            tensor with nothing to send may be left out.
        weights : sequence of C floats, optional
            Client weights (their sample counts in FedAvg); equal when omitted.

        Returns
        -------
        RoundCounts
            Also appended to ``history_``.

        Raises
        ------
        UsageError
            Not C updates, or bad weights.
        MismatchError
            An update lacks a tensor or has the wrong number of values.
        """
        plan = self.round_plan()
        c = len(client_updates)
        if c != self.n_clients:
            raise UsageError(
                f"{c} client updates for {self.n_clients} clients; every client takes part "
                "in every round"
            )
        w = np.ones(c) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (c,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise UsageError(f"weights must be {c} finite numbers >= 0, not all 0")
        w = w / w.sum()
        means: dict[str, torch.Tensor] = {}
        for name, _ in self._params:
            k = int(plan.send[name].sum())
            if k == 0:
                continue
            acc = torch.zeros(k, dtype=torch.float64)
            for j, upd in enumerate(client_updates):
                v = upd.get(name)
                if v is None:
                    raise MismatchError(f"client {j}'s update lacks the tensor {name!r}")
                if v.dim() != 1 or int(v.shape[0]) != k:
                    raise MismatchError(
                        f"client {j}'s update of {name!r} has shape {tuple(v.shape)}; this "
                        f"round it must hold the {k} unfrozen values, 1-D"
                    )
                acc += float(w[j]) * v.detach().cpu().to(torch.float64)
            means[name] = acc
        with torch.no_grad():
            for name, p in self._params:
                if name in means:
                    mask = plan.send[name].to(p.device)
                    p[mask] = means[name].to(device=p.device, dtype=p.dtype)
        self.cmd_.step()
        if plan.freeze is not None:
            self._announced[plan.freeze.index] = True
            if plan.freeze.ref_index is not None:
                self._refs_sent = True
        counts = RoundCounts(
            round=plan.round,
            clients=c,
            down=c * plan.down_per_client,
            up=c * plan.up_per_client,
            frozen=self.n_params_ - plan.n_send,
            plain=2 * c * self.n_params_,
        )
        self.history_.append(counts)
        self._plan = None
        return counts

    # ------------------------------------------------------------------ summary
    def counts(self) -> dict[str, np.ndarray]:
        """The history as arrays, one entry per round.

        Returns
        -------
        dict of str to ndarray, int64, shape (R,)
            ``round``, ``down``, ``up``, ``frozen``, ``plain``, and ``total`` (down + up).
        """
        keys = ("round", "down", "up", "frozen", "plain")
        out = {k: np.array([getattr(h, k) for h in self.history_], dtype=np.int64) for k in keys}
        out["total"] = out["down"] + out["up"]
        return out

    def close(self) -> None:
        """Release the CMD model's warm-up store and hooks."""
        self.cmd_.close()


class FederatedClient:
    """A client's side: rebuilds the global model from what the server sends.

    Parameters
    ----------
    model_or_named_params : torch.nn.Module or iterable of (str, Tensor)
        The client's copy of the model (same parameters, names and order as the
        server's); :meth:`receive` overwrites it in place.

    Attributes
    ----------
    frozen_ : Tensor, bool, shape (N,)
        Parameters known to be frozen.
    """

    def __init__(self, model_or_named_params: NamedParams) -> None:
        self.model = model_or_named_params
        self._params = named_tensors(model_or_named_params)
        self._infos = param_layout(self._params)
        n = sum(i.size for i in self._infos)
        self.frozen_ = torch.zeros(n, dtype=torch.bool)
        self._labels = torch.zeros(n, dtype=torch.int64)
        self._a = torch.zeros(n, dtype=torch.float64)
        self._b = torch.zeros(n, dtype=torch.float64)
        self._ref_index: torch.Tensor | None = None
        self._send: dict[str, torch.Tensor] | None = None
        self._values: torch.Tensor | None = None  # float64 (N,): frozen values this round

    def receive(self, plan: RoundPlan, values: Mapping[str, torch.Tensor]) -> None:
        """Load the round's global model: the sent values, then the frozen entries from
        ``a·r(t) + b`` with the references just received.

        Parameters
        ----------
        plan : RoundPlan
        values : mapping of str to Tensor
            :meth:`FederatedCMD.broadcast`.
        """
        if plan.freeze is not None:
            f = plan.freeze
            if f.ref_index is not None:
                self._ref_index = f.ref_index.clone()
            self.frozen_[f.index] = True
            self._labels[f.index] = f.labels
            self._a[f.index] = f.a
            self._b[f.index] = f.b
        with torch.no_grad():
            for name, p in self._params:
                mask = plan.send[name].to(p.device)
                if int(mask.sum()):
                    p[mask] = values[name].to(device=p.device, dtype=p.dtype)
            self._values = None
            if bool(self.frozen_.any()):
                assert self._ref_index is not None
                flat = torch.cat(
                    [p.detach().cpu().reshape(-1).to(torch.float32) for _, p in self._params]
                )
                r = flat[self._ref_index].to(torch.float64)
                self._values = self._a * r[self._labels] + self._b
            self._fill_frozen()
        self._send = plan.send

    def _fill_frozen(self) -> None:
        values = self._values
        if values is None:
            return
        for (_, p), info in zip(self._params, self._infos, strict=True):
            sl = slice(info.offset, info.offset + info.size)
            mask = self.frozen_[sl].view(info.shape).to(p.device)
            if bool(mask.any()):
                v = values[sl].view(info.shape).to(device=p.device, dtype=p.dtype)
                p.copy_(torch.where(mask, v, p))

    def frozen_masks(self) -> dict[str, torch.Tensor]:
        """Per tensor, bool of its shape: True where frozen (not to be trained)."""
        return {
            info.name: self.frozen_[info.offset : info.offset + info.size].view(info.shape)
            for info in self._infos
        }

    def restore_frozen(self) -> None:
        """Set the frozen entries back to this round's CMD values (after an optimizer step
        that moved them through momentum or weight decay)."""
        with torch.no_grad():
            self._fill_frozen()

    def send(self) -> dict[str, torch.Tensor]:
        """This client's update: per tensor, its values at the round's ``send`` mask.

        Returns
        -------
        dict of str to Tensor, 1-D, on the CPU
        """
        if self._send is None:
            raise UsageError("send() before receive(): load the round's global model first")
        return {name: p.detach().cpu()[self._send[name]].clone() for name, p in self._params}
