"""Torch kernels of the streamed pass: assign a row block to modes and fit a, b (steps 5-6).

Everything here works on one block of columns at a time, on any torch device, with the
centred statistics in float64.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
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
    mode_ids : Tensor, float32, shape (M, 1)  0 .. M-1, the assignment's tie-break column
    """

    lhs: torch.Tensor
    norm2: torch.Tensor
    mean: torch.Tensor
    drift: torch.Tensor
    flat: torch.Tensor
    inv_norm: torch.Tensor
    first: torch.Tensor
    mode_ids: torch.Tensor

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
            mode_ids=torch.arange(r.shape[0], dtype=torch.float32, device=device)[:, None],
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


#: Columns per sub-block of the float32 passes on the CPU: a (T' x SUB_COLUMNS) float32
#: slice stays in the cache between the passes over it (mean, shift, product, squares,
#: assignment), so that the block is read from memory once.
SUB_COLUMNS = 8192
#: Sub-blocks per group of the float64 fit on the CPU: its per-column float64 vectors
#: (GROUP_SUBS * SUB_COLUMNS * 8 bytes each) stay in the L2 cache.
GROUP_SUBS = 4


def fit_block(
    x: torch.Tensor, refs: References, *, width: int | None = None, workers: int = 1
) -> BlockFit:
    """Assign each column of ``x`` to its most correlated reference and fit a, b.

    The block is shifted by its float32 column means, so the float32 passes see only
    deviations (exact for near-constant trajectories, by Sterbenz' lemma); the per-column
    statistics are then combined in float64, with ``y = x - m``:
    ``mean = m + S1/T``, ``||x - mean||^2 = S2 - S1^2/T``,
    ``<x - mean, r_c> = <y, r_c> - (S1/T) sum(r_c)``.

    The work runs over cache-sized pieces (:data:`SUB_COLUMNS` columns for the float32
    passes, :data:`GROUP_SUBS` of them for the float64 fit; the whole block on a GPU) on
    ``workers`` threads, each torch operation on one thread (call it with
    ``torch.set_num_threads(1)`` when ``workers > 1``). The pieces do not depend on
    ``workers``, and the per-mode totals are added piece by piece in column order, so
    neither do the results.

    Parameters
    ----------
    x : Tensor, float32, shape (T', n), C-contiguous, on the references' device
        Trajectories of n parameters over the window. Overwritten (used as scratch).
    refs : References
    width : int, optional
        Columns per float32 sub-block; default :data:`SUB_COLUMNS` on the CPU, n on a GPU.
    workers : int
        Threads sharing the pieces.

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
    t, n = x.shape
    m = refs.n_modes
    if width is None:
        width = n if x.device.type != "cpu" else SUB_COLUMNS
    width = max(1, min(width, n))
    group = width * (GROUP_SUBS if x.device.type == "cpu" else 1)
    out = _Output.empty(n, m, x.device)
    starts = list(range(0, n, group))
    if workers > 1 and len(starts) > 1:
        share = -(-len(starts) // workers)

        def run(first: int) -> None:
            scratch = _Scratch(t, m, width, group, x.device)
            for g0 in starts[first : first + share]:
                _fit_group(x, g0, min(g0 + group, n), width, refs, out, scratch)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmdtool-fit") as pool:
            list(pool.map(run, range(0, len(starts), share)))
    else:
        scratch = _Scratch(t, m, width, group, x.device)
        for g0 in starts:
            _fit_group(x, g0, min(g0 + group, n), width, refs, out, scratch)
    return out.result(starts, m)


@dataclass
class _Output:
    """The block's results, filled piece by piece (the fields of :class:`BlockFit`,
    per-mode totals per group start)."""

    labels: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    constant: torch.Tensor
    sum_w: torch.Tensor
    sum_w2: torch.Tensor
    sum_wr: torch.Tensor
    totals: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    @classmethod
    def empty(cls, n: int, m: int, device: torch.device) -> _Output:
        def f(dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(n, dtype=dtype, device=device)

        return cls(
            labels=f(torch.int32), a=f(torch.float32), b=f(torch.float32),
            constant=f(torch.bool), sum_w=f(torch.float64), sum_w2=f(torch.float64),
            sum_wr=f(torch.float64), totals={},
        )

    def result(self, starts: list[int], m: int) -> BlockFit:
        e2 = torch.zeros(m + 1, dtype=torch.float64, device=self.a.device)
        s2 = torch.zeros_like(e2)
        ct = torch.zeros(m + 1, dtype=torch.int64, device=self.a.device)
        for s in starts:  # piece by piece, in column order
            e2 += self.totals[s][0]
            s2 += self.totals[s][1]
            ct += self.totals[s][2]
        return BlockFit(
            labels=self.labels.cpu().numpy(),
            a=self.a.cpu().numpy(),
            b=self.b.cpu().numpy(),
            constant=self.constant.cpu().numpy(),
            err2=e2.cpu().numpy(),
            sq=s2.cpu().numpy(),
            count=ct.cpu().numpy().astype(np.int64),
            sum_w=self.sum_w.cpu().numpy(),
            sum_w2=self.sum_w2.cpu().numpy(),
            sum_wr=self.sum_wr.cpu().numpy(),
        )


class _Scratch:
    """One worker's reused buffers for the float32 passes over sub-blocks of ``width``
    columns (fresh allocations of this size cost page faults on every operation)."""

    def __init__(self, t: int, m: int, width: int, group: int, device: torch.device) -> None:
        f32 = torch.float32
        self.sq = torch.empty(t, width, dtype=f32, device=device)
        self.p = torch.empty(group // width + 1, m + 1, width, dtype=f32, device=device)
        self.score = torch.empty(m, width, dtype=f32, device=device)
        self.pick = torch.empty(m, width, dtype=f32, device=device)
        self.eq = torch.empty(m, width, dtype=torch.bool, device=device)
        self.best = torch.empty(width, dtype=f32, device=device)
        self.none = torch.full((m, 1), float(m), dtype=f32, device=device)


def _fit_group(
    x: torch.Tensor, g0: int, g1: int, width: int, refs: References, out: _Output,
    scratch: _Scratch,
) -> None:
    """Columns ``g0:g1`` of ``x``: the float32 passes per sub-block of ``width``
    columns, then the float64 fit of the group, into ``out``."""
    m, t = refs.n_modes, x.shape[0]
    w = g1 - g0
    shift = torch.empty(w, dtype=torch.float32, device=x.device)
    s2 = torch.empty(w, dtype=torch.float32, device=x.device)
    d_best = torch.empty(w, dtype=torch.float32, device=x.device)
    lab = torch.empty(w, dtype=torch.float32, device=x.device)
    k = 0
    for s in range(0, w, width):
        e = min(s + width, w)
        c = e - s
        y = x[:, g0 + s : g0 + e]
        torch.mean(y, dim=0, out=shift[s:e])
        y.sub_(shift[s:e])
        p = scratch.p[k, :, :c]
        torch.mm(refs.lhs, y, out=p)  # (M + 1, c): <y, r_c> per mode, then S1
        sq = scratch.sq[:, :c]
        torch.sum(torch.mul(y, y, out=sq), dim=0, out=s2[s:e])
        score = torch.abs(p[:m], out=scratch.score[:, :c]).mul_(refs.inv_norm[:, None])
        best = torch.amax(score, dim=0, out=scratch.best[:c])
        # the lowest mode reaching the best score (all-zero scores: mode 0; NaN: none)
        eq = torch.eq(score, best, out=scratch.eq[:, :c])
        pick = torch.where(eq, refs.mode_ids, scratch.none, out=scratch.pick[:, :c])
        ls = torch.amin(pick, dim=0, out=lab[s:e]).clamp_(max=m - 1).long()
        torch.gather(p, 0, ls[None, :], out=d_best[None, s:e])
        k += 1
    pk = scratch.p[:k]
    if k * width == w:
        s1, d_first = pk[:, m].reshape(w), pk[:, 0].reshape(w)
    else:
        s1 = torch.cat([pk[i, m, : min(width, w - i * width)] for i in range(k)])
        d_first = torch.cat([pk[i, 0, : min(width, w - i * width)] for i in range(k)])
    const = torch.zeros(w, dtype=torch.bool, device=x.device)
    hi = torch.zeros(w, dtype=torch.float32, device=x.device)
    lo = torch.zeros(w, dtype=torch.float32, device=x.device)
    shift64 = shift.to(torch.float64)
    s2_64 = s2.to(torch.float64)
    # a constant column has every |y| <= (max - min) + rounding <= 2 CONST_RTOL |shift|;
    # only such columns (usually few) get their exact extremes: y is exact there by
    # Sterbenz' lemma (each value within a few ulps of the shift), so y + shift is x
    bound = (2.0 * CONST_RTOL) * shift64.abs()
    idx = (s2_64 <= (4.0 * t) * bound * bound).nonzero()[:, 0]
    if idx.numel():
        part = x[:, g0:g1].index_select(1, idx)
        hi[idx] = part.amax(dim=0) + shift[idx]
        lo[idx] = part.amin(dim=0) + shift[idx]
        const[idx] = constant_columns(hi[idx], lo[idx])
    s1_64 = s1.to(torch.float64)
    mean = shift64 + s1_64 / t
    norm2 = torch.clamp(s2_64 - s1_64 * s1_64 / t, min=0.0)
    finite = torch.isfinite(norm2) & torch.isfinite(mean)
    flat_x = is_flat(norm2, mean, t) | const
    labels = torch.where(flat_x, 0, lab.long())
    dot = torch.where(flat_x, d_first, d_best).to(torch.float64)  # <y, r_label>
    d = dot - s1_64 / t * refs.drift.index_select(0, labels)
    rn2 = refs.norm2.index_select(0, labels)
    frozen = refs.flat.index_select(0, labels) | ~finite | const
    a = torch.where(frozen, 0.0, d / torch.where(rn2 > 0, rn2, 1.0))
    b = mean - a * refs.mean.index_select(0, labels)
    # an exactly constant column is rebuilt bit for bit: b is its value, not a rounded mean
    if idx.numel():
        b = torch.where(const & (hi == lo), hi.to(torch.float64), b)
    resid = torch.where(finite, torch.clamp(norm2 - a * d, min=0.0), 0.0)
    sq = torch.where(finite, norm2 + t * mean * mean, 0.0)
    grp = torch.where(const, m, labels)  # slot M of the totals: the constant columns
    # running sums from the shifted statistics: x = y + shift, and
    # Σ y (r - first) = <y, r_c> + (mean_r - first) S1
    gap = (refs.mean - refs.first).index_select(0, labels)
    zeros = torch.zeros(m + 1, dtype=torch.float64, device=x.device)
    out.labels[g0:g1] = labels
    out.a[g0:g1] = a
    out.b[g0:g1] = b
    out.constant[g0:g1] = const
    torch.mul(shift64, t, out=out.sum_w[g0:g1]).add_(s1_64)
    out.sum_w2[g0:g1] = s2_64 + shift64 * (2.0 * s1_64 + t * shift64)
    out.sum_wr[g0:g1] = dot + gap * (s1_64 + t * shift64)
    out.totals[g0] = (
        zeros.index_add(0, grp, resid),
        zeros.index_add(0, grp, sq),
        torch.bincount(grp[finite], minlength=m + 1),
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
