"""Running sums of online CMD: fold new epochs into a decomposition in O(N) per epoch.

With the modes and references fixed, the least-squares ``a, b`` of every parameter over
any set of epochs follow from a few sums over those epochs (DESIGN.md, "Online CMD"):

- per parameter i (float64, shape (N,)): ``sum_w = Σ w_i``, ``sum_w2 = Σ w_i²`` and
  ``sum_wr = Σ w_i · (r_m(t) - r_m(t0))``, with ``m = labels[i]`` and ``t0`` the first
  epoch folded, so that the cross sum only sees the reference's movement;
- per mode m (float64, shape (M,)): ``first = r_m(t0)``, ``s1 = Σ (r_m - first)``,
  ``s2 = Σ (r_m - first)²``, and the number of epochs ``count``.

Then ``a = (sum_wr - sum_w · s1/n) / (s2 - s1²/n)`` and ``b = sum_w/n - a · r̄`` (the same
rules as the batch kernel: a constant reference gives ``a = 0``, ``b = w̄``; a column
holding NaN or Inf gets ``a = 0``). Shifting the references by their first value keeps
the sums well conditioned: a constant reference has ``s2`` exactly 0.

Everything here is torch, on any device, so the store's ``cmdtool update`` and the
in-training :class:`cmdtool.online.OnlineCMD` share one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cmdtool.method.kernels import is_flat


def _f64(x: torch.Tensor | np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    return torch.as_tensor(x, device=device).to(torch.float64)


@dataclass
class ReferenceSums:
    """Per-mode sums of the M reference trajectories.

    Attributes
    ----------
    first : Tensor, float64, shape (M,)   each reference's value at the first epoch
    s1 : Tensor, float64, shape (M,)      Σ (r - first)
    s2 : Tensor, float64, shape (M,)      Σ (r - first)²
    count : int                           epochs folded
    """

    first: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    count: int

    @classmethod
    def from_trajectories(
        cls, ref_traj: torch.Tensor | np.ndarray, device: torch.device | None = None
    ) -> ReferenceSums:
        """Sums of ``ref_traj`` (M, T') over its T' epochs."""
        r = _f64(ref_traj, device)
        d = r - r[:, :1]
        return cls(first=r[:, 0].clone(), s1=d.sum(dim=1), s2=(d * d).sum(dim=1), count=r.shape[1])

    def fold(self, values: torch.Tensor | np.ndarray) -> None:
        """Add epochs: ``values`` (k, M) or (M,), the references at the new epochs."""
        d = _f64(values, self.first.device).reshape(-1, self.first.shape[0]) - self.first
        self.s1 += d.sum(dim=0)
        self.s2 += (d * d).sum(dim=0)
        self.count += d.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """r̄ per mode, float64 (M,)."""
        return self.first + self.s1 / self.count

    @property
    def centred_norm2(self) -> torch.Tensor:
        """Σ (r - r̄)² per mode, float64 (M,)."""
        return torch.clamp(self.s2 - self.s1 * self.s1 / self.count, min=0.0)

    @property
    def flat(self) -> torch.Tensor:
        """Constant references (the rule of :func:`cmdtool.method.kernels.is_flat`), bool (M,)."""
        return is_flat(self.centred_norm2, self.mean, self.count)


@dataclass
class ParamSums:
    """Per-parameter running sums (float64, shape (N,) each; see the module docstring)."""

    sum_w: torch.Tensor
    sum_w2: torch.Tensor
    sum_wr: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device: torch.device | None = None) -> ParamSums:
        z = torch.zeros(n, dtype=torch.float64, device=device)
        return cls(z, z.clone(), z.clone())

    def fold(
        self,
        w: torch.Tensor | np.ndarray,
        ref_values: torch.Tensor | np.ndarray,
        refs: ReferenceSums,
        labels: torch.Tensor,
    ) -> None:
        """Add epochs of these parameters.

        Parameters
        ----------
        w : float, shape (k, n) or (n,)     the parameters at the k new epochs
        ref_values : float, shape (k, M) or (M,)  the references at the same epochs
        refs : ReferenceSums                 gives each mode's ``first``
        labels : Tensor, int64, shape (n,)   mode of each parameter
        """
        device = self.sum_w.device
        x = _f64(w, device).reshape(-1, self.sum_w.shape[0])
        d = _f64(ref_values, device).reshape(x.shape[0], -1) - refs.first  # (k, M)
        self.sum_w += x.sum(dim=0)
        self.sum_w2 += (x * x).sum(dim=0)
        self.sum_wr += (x * d[:, labels]).sum(dim=0)


@dataclass
class Coefficients:
    """``a, b`` and the per-parameter fit statistics (float64, shape (n,) each).

    ``err2`` is the sum of squared residuals, ``sq`` the sum of squared values (both 0
    for columns holding NaN or Inf, which ``finite`` marks).
    """

    a: torch.Tensor
    b: torch.Tensor
    err2: torch.Tensor
    sq: torch.Tensor
    finite: torch.Tensor


def coefficients(
    sums: ParamSums,
    refs: ReferenceSums,
    labels: torch.Tensor,
    constant: torch.Tensor | None = None,
) -> Coefficients:
    """The least-squares ``a, b`` over the epochs folded into ``sums`` and ``refs``.

    ``constant`` (bool, (n,)) marks the parameters that were constant over the first
    fit's window: they stay in no mode, with ``a = 0`` and ``b`` their mean over the
    epochs folded (their value, exactly, while they do not move).
    """
    n = refs.count
    mean = sums.sum_w / n
    norm2 = torch.clamp(sums.sum_w2 - sums.sum_w * mean, min=0.0)
    finite = torch.isfinite(norm2) & torch.isfinite(mean)
    d = sums.sum_wr - sums.sum_w * (refs.s1 / n)[labels]  # Σ (w - w̄)(r - r̄)
    rn2 = refs.centred_norm2[labels]
    frozen = refs.flat[labels] | ~finite
    if constant is not None:
        frozen = frozen | constant
    a = torch.where(frozen, 0.0, d / torch.where(rn2 > 0, rn2, torch.ones_like(rn2)))
    b = mean - a * refs.mean[labels]
    err2 = torch.where(finite, torch.clamp(norm2 - a * d, min=0.0), 0.0)
    sq = torch.where(finite, sums.sum_w2, 0.0)
    return Coefficients(a=a, b=b, err2=err2, sq=sq, finite=finite)


def mode_totals(
    labels: torch.Tensor, coef: Coefficients, m: int, constant: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-mode sums of ``err2`` and ``sq`` and finite-column counts: float64, float64,
    int64, each (M + 1,): the M modes, then the ``constant`` parameters (bool, (n,))."""
    group = labels if constant is None else torch.where(constant, m, labels)
    z = torch.zeros(m + 1, dtype=torch.float64, device=labels.device)
    return (
        z.index_add(0, group, coef.err2).cpu().numpy(),
        z.index_add(0, group, coef.sq).cpu().numpy(),
        torch.bincount(group[coef.finite], minlength=m + 1).cpu().numpy().astype(np.int64),
    )


def relative_errors(err2: np.ndarray, sq: np.ndarray) -> tuple[float, np.ndarray]:
    """``sqrt(Σ err2 / Σ sq)`` overall and per slot (0 where there is nothing).

    Given the (M + 1,) totals of a pass, the overall figure covers every parameter,
    constants included; the caller keeps the first M per-slot figures as the modes'.
    """
    total = float(sq.sum())
    rel = float(np.sqrt(err2.sum() / total)) if total > 0 else 0.0
    per_mode = np.sqrt(np.divide(err2, sq, out=np.zeros(len(sq)), where=sq > 0))
    return rel, per_mode
