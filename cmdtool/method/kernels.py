"""Torch kernels of the streamed pass: assign a row block to modes and fit a, b (steps 5-6).

Everything here works on one block of columns at a time, on any torch device, with the
centred statistics in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# A trajectory whose centred norm is below this fraction of its magnitude (times sqrt(T))
# is constant up to float32 rounding: |corr| is 0 and a is 0 (the same rule as
# cmdtool.method.clustering.centred_unit_rows).
FLAT_RTOL = 1e-12
#: The constant rule of steps 2-6 (``docs/design.md``, "Constant parameters and
#: normalization statistics"): a trajectory is constant over the window when
#: ``max - min <= CONST_RTOL * max(|max|, |min|)``, exact values compared in float64.
#: It depends only on the window's extreme float32 values, so the sampled trajectories
#: (:func:`cmdtool.method.clustering.constant_rows`) and the streamed pass agree exactly.
CONST_RTOL = 4.0 * float(np.finfo(np.float32).eps)


def constant_columns(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Columns constant up to float32 rounding, from their max and min over the window.

    Parameters
    ----------
    hi, lo : Tensor, float32, shape (n,)
        Largest and smallest value of each column over the window.

    Returns
    -------
    Tensor, bool, shape (n,)
        ``max - min <= CONST_RTOL * max(|max|, |min|)`` in float64 (exactly equal values
        always qualify); False for columns holding NaN or Inf.
    """
    h, l_ = hi.to(torch.float64), lo.to(torch.float64)
    scale = torch.maximum(h.abs(), l_.abs())
    return torch.isfinite(h) & torch.isfinite(l_) & (h - l_ <= CONST_RTOL * scale)


def is_flat(norm2: torch.Tensor, mean: torch.Tensor, t: int) -> torch.Tensor:
    """Constant trajectories: centred norm at rounding level of the mean, or non-finite."""
    limit = FLAT_RTOL * torch.clamp(mean.abs(), min=1e-30) * (t**0.5)
    return ~torch.isfinite(norm2) | (torch.sqrt(torch.clamp(norm2, min=0.0)) <= limit)


@dataclass(frozen=True)
class References:
    """The M reference trajectories over the window, prepared once per fit.

    Attributes
    ----------
    lhs : Tensor, float32, shape (M + 1, T')
        The centred references, and a row of ones (which gives column sums).
    norm2 : Tensor, float64, shape (M,)   squared norms of the float32 centred rows
    mean : Tensor, float64, shape (M,)
    drift : Tensor, float64, shape (M,)   sums of the float32 centred rows (~0)
    flat : Tensor, bool, shape (M,)       constant references
    inv_norm : Tensor, float32, shape (M,)  1 / norm, 0 for constant references
    first : Tensor, float64, shape (M,)   values at the window's first epoch (the shift
        of the running sums, :mod:`cmdtool.method.running`)
    """

    lhs: torch.Tensor
    norm2: torch.Tensor
    mean: torch.Tensor
    drift: torch.Tensor
    flat: torch.Tensor
    inv_norm: torch.Tensor
    first: torch.Tensor

    @classmethod
    def from_trajectories(cls, ref_traj: np.ndarray, device: torch.device) -> References:
        """``ref_traj``: (M, T') reference trajectories."""
        r = torch.as_tensor(np.asarray(ref_traj, dtype=np.float64), device=device)
        mean = r.mean(dim=1)
        centred = (r - mean[:, None]).to(torch.float32)
        c64 = centred.to(torch.float64)
        norm2 = (c64 * c64).sum(dim=1)
        ones = torch.ones(1, r.shape[1], dtype=torch.float32, device=device)
        flat = is_flat(((r - mean[:, None]) ** 2).sum(dim=1), mean, r.shape[1])
        inv = torch.where(flat | (norm2 <= 0), 0.0, 1.0 / torch.sqrt(norm2))
        return cls(
            lhs=torch.cat([centred, ones]),
            norm2=norm2,
            mean=mean,
            drift=c64.sum(dim=1),
            flat=flat,
            inv_norm=inv.to(torch.float32),
            first=r[:, 0].clone(),
        )

    @property
    def n_modes(self) -> int:
        return int(self.norm2.shape[0])


@dataclass
class BlockFit:
    """Per-column results of one block, on the host.

    Attributes
    ----------
    labels : ndarray, int32, shape (n,)   (0 for constant columns)
    a, b : ndarray, float32, shape (n,)
    constant : ndarray, bool, shape (n,)  columns constant over the window
        (:func:`constant_columns`): ``a = 0``, ``b`` = the constant, in no mode
    err2 : ndarray, float64, shape (M + 1,)   sum of squared residuals per mode; the
        last slot holds the constant columns
    sq : ndarray, float64, shape (M + 1,)     sum of squared values, the same way
    count : ndarray, int64, shape (M + 1,)    parameters per mode, then constants
    sum_w, sum_w2, sum_wr : ndarray, float64, shape (n,)
        The running sums of :mod:`cmdtool.method.running` over the window: ``Σ x``, ``Σ x²``
        and ``Σ x · (r - r(t0))`` with the column's own reference.
    """

    labels: np.ndarray
    a: np.ndarray
    b: np.ndarray
    constant: np.ndarray
    err2: np.ndarray
    sq: np.ndarray
    count: np.ndarray
    sum_w: np.ndarray
    sum_w2: np.ndarray
    sum_wr: np.ndarray


def fit_block(x: torch.Tensor, refs: References) -> BlockFit:
    """Assign each column of ``x`` to its most correlated reference and fit a, b.

    The block is shifted by its float32 column means, so the float32 passes see only
    deviations (exact for near-constant trajectories, by Sterbenz' lemma); the per-column
    statistics are then combined in float64, with ``y = x - m``:
    ``mean = m + S1/T``, ``||x - mean||^2 = S2 - S1^2/T``,
    ``<x - mean, r_c> = <y, r_c> - (S1/T) sum(r_c)``.

    Parameters
    ----------
    x : Tensor, float32, shape (T', n), on the references' device
        Trajectories of n parameters over the window. Overwritten (used as scratch).
    refs : References

    Returns
    -------
    BlockFit
        Labels (ties and all-zero rows to the lowest mode), least-squares ``a``, ``b``
        (``a = 0``, ``b = mean`` for a constant reference), and per-mode sums of the
        squared residuals and values over the window. Constant columns
        (:func:`constant_columns`) get label 0, ``a = 0`` and ``b`` = their mean (their
        value, bit for bit, when exactly constant) and are totalled in slot M. Columns
        holding NaN or Inf get label 0, ``a = 0``, ``b = mean`` (non-finite) and are left
        out of the sums.
    """
    m = refs.n_modes
    t = x.shape[0]
    hi, lo = x.amax(dim=0), x.amin(dim=0)
    const = constant_columns(hi, lo)
    shift = x.mean(dim=0)
    y = x.sub_(shift)
    prod = refs.lhs @ y  # (M + 1, n) float32: <y, r_c> per mode, and S1
    s1 = prod[m].to(torch.float64)
    s2 = y.mul_(y).sum(dim=0).to(torch.float64)
    mean = shift.to(torch.float64) + s1 / t
    norm2 = torch.clamp(s2 - s1 * s1 / t, min=0.0)
    finite = torch.isfinite(norm2) & torch.isfinite(mean)
    flat_x = is_flat(norm2, mean, t) | const
    # |corr| times the column's own norm (which leaves the argmax alone); the drift term
    # of the exact dot product is ~1e-7 of it and only matters for the chosen mode below
    score = prod[:m].abs() * refs.inv_norm[:, None]
    labels = torch.where(flat_x, 0, torch.argmax(score, dim=0))
    d = prod.gather(0, labels[None, :])[0].to(torch.float64) - s1 / t * refs.drift[labels]
    rn2 = refs.norm2[labels]
    a = torch.where(
        refs.flat[labels] | ~finite | const, 0.0, d / torch.where(rn2 > 0, rn2, 1.0)
    )
    b = mean - a * refs.mean[labels]
    # an exactly constant column is rebuilt bit for bit: b is its value, not a rounded mean
    b = torch.where(const & (hi == lo), hi.to(torch.float64), b)
    resid = torch.where(finite, torch.clamp(norm2 - a * d, min=0.0), 0.0)
    sq = torch.where(finite, norm2 + t * mean * mean, 0.0)
    group = torch.where(const, m, labels)  # slot M of the totals: the constant columns
    # running sums from the shifted statistics: x = y + shift, and
    # Σ y (r - first) = <y, r_c> + (mean_r - first) S1
    shift64 = shift.to(torch.float64)
    gap = (refs.mean - refs.first)[labels]
    sum_wr = prod.gather(0, labels[None, :])[0].to(torch.float64) + gap * s1 + shift64 * t * gap
    zeros = torch.zeros(m + 1, dtype=torch.float64, device=x.device)
    return BlockFit(
        labels=labels.to(torch.int32).cpu().numpy(),
        a=a.to(torch.float32).cpu().numpy(),
        b=b.to(torch.float32).cpu().numpy(),
        constant=const.cpu().numpy(),
        err2=zeros.index_add(0, group, resid).cpu().numpy(),
        sq=zeros.index_add(0, group, sq).cpu().numpy(),
        count=torch.bincount(group[finite], minlength=m + 1).cpu().numpy().astype(np.int64),
        sum_w=(t * shift64 + s1).cpu().numpy(),
        sum_w2=(s2 + 2.0 * shift64 * s1 + t * shift64 * shift64).cpu().numpy(),
        sum_wr=sum_wr.cpu().numpy(),
    )


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a DeviceError."""
    from cmdtool.errors import DeviceError, UsageError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device}: no CUDA device is available here; use --device cpu"
            )
        return torch.device(device)
    raise UsageError(f"--device {device!r} is not one of auto, cpu, cuda")
