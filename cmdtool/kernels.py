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
# cmdtool.clustering.centred_unit_rows).
FLAT_RTOL = 1e-12


def _flat(norm2: torch.Tensor, absmax: torch.Tensor, t: int) -> torch.Tensor:
    limit = FLAT_RTOL * torch.clamp(absmax, min=1e-30) * (t**0.5)
    return ~torch.isfinite(norm2) | (torch.sqrt(norm2) <= limit)


@dataclass(frozen=True)
class References:
    """The M reference trajectories over the window, prepared once per fit.

    Attributes
    ----------
    centred : Tensor, float64, shape (T', M)
    norm2 : Tensor, float64, shape (M,)   squared norms after centring
    mean : Tensor, float64, shape (M,)
    flat : Tensor, bool, shape (M,)       constant references
    """

    centred: torch.Tensor
    norm2: torch.Tensor
    mean: torch.Tensor
    flat: torch.Tensor

    @classmethod
    def from_trajectories(cls, ref_traj: np.ndarray, device: torch.device) -> References:
        """``ref_traj``: (M, T') reference trajectories."""
        r = torch.as_tensor(np.asarray(ref_traj, dtype=np.float64), device=device).T
        mean = r.mean(dim=0)
        centred = r - mean
        norm2 = (centred * centred).sum(dim=0)
        flat = _flat(norm2, r.abs().amax(dim=0), r.shape[0])
        return cls(centred=centred, norm2=norm2, mean=mean, flat=flat)

    @property
    def n_modes(self) -> int:
        return int(self.norm2.shape[0])


@dataclass
class BlockFit:
    """Per-column results of one block, on the host.

    Attributes
    ----------
    labels : ndarray, int32, shape (n,)
    a, b : ndarray, float32, shape (n,)
    err2 : ndarray, float64, shape (M,)   sum of squared residuals per mode
    sq : ndarray, float64, shape (M,)     sum of squared values per mode
    count : ndarray, int64, shape (M,)    parameters per mode
    """

    labels: np.ndarray
    a: np.ndarray
    b: np.ndarray
    err2: np.ndarray
    sq: np.ndarray
    count: np.ndarray


def fit_block(x: torch.Tensor, refs: References) -> BlockFit:
    """Assign each column of ``x`` to its most correlated reference and fit a, b.

    Parameters
    ----------
    x : Tensor, shape (T', n), any float dtype, on the references' device
        Trajectories of n parameters over the window.
    refs : References

    Returns
    -------
    BlockFit
        Labels (ties and all-zero rows to the lowest mode), least-squares ``a``, ``b``
        (``a = 0``, ``b = mean`` for a constant reference), and per-mode sums of the
        squared residuals and values over the window. Columns holding NaN or Inf get
        label 0, ``a = 0``, ``b = mean`` (non-finite) and are left out of the sums.
    """
    m = refs.n_modes
    x64 = x.to(torch.float64)
    t = x64.shape[0]
    mean = x64.mean(dim=0)
    xc = x64 - mean
    norm2 = (xc * xc).sum(dim=0)
    finite = torch.isfinite(norm2)
    flat_x = _flat(norm2, x64.abs().amax(dim=0), t)
    dots = xc.T @ refs.centred  # (n, M)
    denom = torch.sqrt(torch.clamp(norm2, min=0.0))[:, None] * torch.sqrt(refs.norm2)[None, :]
    corr = dots.abs() / torch.where(denom > 0, denom, torch.ones_like(denom))
    corr = torch.where(flat_x[:, None] | refs.flat[None, :], torch.zeros_like(corr), corr)
    labels = torch.argmax(corr, dim=1)
    d = dots.gather(1, labels[:, None])[:, 0]
    rn2 = refs.norm2[labels]
    ref_flat = refs.flat[labels]
    a = torch.where(ref_flat, torch.zeros_like(d), d / torch.where(ref_flat, 1.0, rn2))
    a = torch.where(finite, a, torch.zeros_like(a))
    b = mean - a * refs.mean[labels]
    resid = torch.clamp(norm2 - a * d, min=0.0)
    resid = torch.where(finite, resid, torch.zeros_like(resid))
    sq = torch.where(finite, (x64 * x64).sum(dim=0), torch.zeros_like(norm2))
    zeros = torch.zeros(m, dtype=torch.float64, device=x.device)
    err2 = zeros.index_add(0, labels, resid)
    sqm = zeros.index_add(0, labels, sq)
    count = torch.bincount(labels[finite], minlength=m)
    return BlockFit(
        labels=labels.to(torch.int32).cpu().numpy(),
        a=a.to(torch.float32).cpu().numpy(),
        b=b.to(torch.float32).cpu().numpy(),
        err2=err2.cpu().numpy(),
        sq=sqm.cpu().numpy(),
        count=count.cpu().numpy().astype(np.int64),
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
