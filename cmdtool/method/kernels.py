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

    The product of the pass is taken with the *unit* centred references, so that its
    absolute values are the scores of the assignment as they come (no scaling pass);
    the fit rescales the chosen mode's product in float64 with the per-mode table.

    Attributes
    ----------
    lhs : Tensor, float32, shape (M + 1, T')
        ``u_c = (r_c - mean_c) / ||r_c - mean_c||`` (centred in float64, rounded to
        float32; a row of zeros for a constant reference), and a row of ones (which gives
        column sums).
    table : Tensor, float64, shape (5, M)
        Per mode, gathered once per piece for the fit: ``Σ u_c`` (the float32 rows'
        drift, ~0); ``k_c = 1 / <r_c - mean_c, u_c>`` (``a`` per unit of
        ``<x - mean, u_c>``; 0 for a constant reference); ``||r_c - mean_c||² k_c``
        (``<v, r_c - mean_c>`` per unit of ``<v, u_c>``, ~``||r_c - mean_c||``);
        ``mean_c``; ``mean_c - first_c``.
    norm2 : Tensor, float64, shape (M,)   squared centred norms (float64)
    mean : Tensor, float64, shape (M,)
    flat : Tensor, bool, shape (M,)       constant references (:func:`is_flat`)
    first : Tensor, float64, shape (M,)   values at the window's first epoch (the shift
        of the running sums, :mod:`cmdtool.method.running`)
    mode_ids : Tensor, float32, shape (M, 1)  0 .. M-1, the assignment's tie-break column
    none : Tensor, float32, shape (M, 1)      M everywhere (the step of a mode not at the best)
    """

    lhs: torch.Tensor
    table: torch.Tensor
    norm2: torch.Tensor
    mean: torch.Tensor
    flat: torch.Tensor
    first: torch.Tensor
    mode_ids: torch.Tensor
    none: torch.Tensor

    @classmethod
    def from_trajectories(cls, ref_traj: np.ndarray, device: torch.device) -> References:
        """``ref_traj``: (M, T') reference trajectories."""
        r = torch.as_tensor(np.asarray(ref_traj, dtype=np.float64), device=device)
        m, t = r.shape
        mean = r.mean(dim=1)
        c64 = r - mean[:, None]
        norm2 = (c64 * c64).sum(dim=1)
        flat = is_flat(norm2, mean, t)
        norm = torch.sqrt(norm2)
        unit = torch.where(flat[:, None], 0.0, c64 / torch.where(flat, 1.0, norm)[:, None])
        u32 = unit.to(torch.float32)
        u64 = u32.to(torch.float64)
        # a = <x - mean, u_c> / <r_c - mean_c, u_c>: exact for x in the span of r_c,
        # whatever the rounding of u_c
        cu = (c64 * u64).sum(dim=1)
        coef = torch.where(flat, 0.0, 1.0 / torch.where(flat, 1.0, cu))
        first = r[:, 0].clone()
        ones = torch.ones(1, t, dtype=torch.float32, device=device)
        ids = torch.arange(m, dtype=torch.float32, device=device)[:, None]
        return cls(
            lhs=torch.cat([u32, ones]),
            table=torch.stack([u64.sum(dim=1), coef, norm2 * coef, mean, mean - first]),
            norm2=norm2,
            mean=mean,
            flat=flat,
            first=first,
            mode_ids=ids,
            none=torch.full_like(ids, float(m)),
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


#: Bytes per sub-block of the float32 passes on the CPU (shift, product, squares,
#: assignment): the default sub-block is the largest power of two of columns, between
#: 256 and 8192, whose (T' x width) float32 slice fits in it (T' = 50: 8192 columns,
#: T' = 150: 2048). Wider, torch's per-operation overhead shrinks against the work;
#: narrower, the slice stays nearer the core (measured: at T' = 150, 2048 columns ran
#: 1.3x faster than 8192, at T' = 50, 4096 no faster than 8192).
SUB_BYTES = 2 << 20
#: Columns per group of the float64 fit on the CPU with the default sub-blocks.
GROUP_COLUMNS = 32768
#: Sub-blocks per group when ``width`` is given.
GROUP_SUBS = 4


def sub_columns(t: int) -> int:
    """The default sub-block width on the CPU for a window of ``t`` epochs."""
    fit = max(1, SUB_BYTES // (4 * max(t, 1)))
    return 1 << max(8, min(13, fit.bit_length() - 1))


def fit_block(
    x: torch.Tensor, refs: References, *, width: int | None = None, workers: int = 1
) -> BlockFit:
    """Assign each column of ``x`` to its most correlated reference and fit a, b.

    Each column is shifted by its own value at the window's middle epoch (one row, not
    a pass over the block: the column-mean shift cost 1.05x the time at T' = 50 and
    1.5x at T' = 150), so the float32 passes see only deviations (exact for
    near-constant trajectories, by Sterbenz' lemma: every value of such a column is
    within a factor 2 of the shift). The per-column statistics are then combined in
    float64, with ``y = x - x[T'//2]``, ``S1 = Σ y``, ``S2 = Σ y²``:
    ``mean = shift + S1/T``, ``||x - mean||^2 = S2 - S1^2/T``,
    ``<x - mean, u_c> = <y, u_c> - (S1/T) Σ u_c``.

    The work runs over pieces (:func:`sub_columns` columns for the float32 passes,
    :data:`GROUP_COLUMNS` for the float64 fit; the whole block on a GPU) on
    ``workers`` threads, each torch operation on one thread (call it with
    ``torch.set_num_threads(1)`` when ``workers > 1``). The pieces do not depend on
    ``workers``, and the per-mode totals are added piece by piece in column order, so
    neither do the results.

    Parameters
    ----------
    x : Tensor, float32, shape (T', n), C-contiguous, on the references' device
        Trajectories of n parameters over the window. Left unchanged (the shifted
        sub-blocks live in per-worker scratch buffers).
    refs : References
    width : int, optional
        Columns per float32 sub-block, :data:`GROUP_SUBS` of them per float64 group;
        default on the CPU :func:`sub_columns` in groups of :data:`GROUP_COLUMNS`, on a
        GPU the whole block.
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
    cpu = x.device.type == "cpu"
    if width is None:
        width = min(sub_columns(t), n) if cpu else n
        group = max(width, GROUP_COLUMNS // width * width) if cpu else n
    else:
        width = max(1, min(width, n))
        group = width * (GROUP_SUBS if cpu else 1)
    out = _Output.empty(n, m, x.device)
    starts = list(range(0, n, group))
    if workers > 1 and len(starts) > 1:
        share = -(-len(starts) // workers)

        def run(first: int) -> None:
            scratch = _Scratch(t, m, width, min(group, n), x.device)
            for g0 in starts[first : first + share]:
                _fit_group(x, g0, min(g0 + group, n), width, refs, out, scratch)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cmdtool-fit") as pool:
            list(pool.map(run, range(0, len(starts), share)))
    else:
        scratch = _Scratch(t, m, width, min(group, n), x.device)
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
    """One worker's reused buffers: the float32 results of a group's sub-blocks, and
    the assignment's temporaries per sub-block of ``width`` columns (fresh allocations
    of this size cost page faults on every operation)."""

    def __init__(self, t: int, m: int, width: int, group: int, device: torch.device) -> None:
        f32 = torch.float32
        self.p = torch.empty(m + 1, group, dtype=f32, device=device)  # <y, u_c>, then S1
        self.s2 = torch.empty(group, dtype=f32, device=device)
        self.shift = torch.empty(group, dtype=f32, device=device)
        self.lab = torch.empty(group, dtype=f32, device=device)
        # the shifted sub-block, off x so that x is never written back to memory (rows
        # padded off a power-of-two stride)
        self.y = torch.empty(t, width + 16, dtype=f32, device=device)
        self.score = torch.empty(m, width, dtype=f32, device=device)
        self.pick = torch.empty(m, width, dtype=f32, device=device)
        self.best = torch.empty(width, dtype=f32, device=device)
        # the float64 fit's per-column vectors (a fresh tensor of this size would be
        # fresh memory, page faults on its first write, on every operation)
        v = torch.empty(16, group, dtype=torch.float64, device=device)
        (self.sh, self.sq2, self.s1, self.q, self.mean, self.norm2, self.t1, self.t2,
         self.dot, self.d, self.a, *self.per_mode) = v.unbind(0)
        self.dot32 = torch.empty(1, group, dtype=f32, device=device)
        self.labels = torch.empty(group, dtype=torch.int64, device=device)
        self.nf = torch.empty(group, dtype=torch.bool, device=device)
        self.flat = torch.empty(group, dtype=torch.bool, device=device)
        self.mask = torch.empty(group, dtype=torch.bool, device=device)


def _fit_group(
    x: torch.Tensor, g0: int, g1: int, width: int, refs: References, out: _Output,
    scratch: _Scratch,
) -> None:
    """Columns ``g0:g1`` of ``x``: the float32 passes per sub-block of ``width``
    columns, then the float64 fit of the group, into ``out``."""
    m, t = refs.n_modes, x.shape[0]
    w = g1 - g0
    p, s2, shift, lab = scratch.p[:, :w], scratch.s2[:w], scratch.shift[:w], scratch.lab[:w]
    pivot = t // 2
    for s in range(0, w, width):
        e = min(s + width, w)
        c = e - s
        xs = x[:, g0 + s : g0 + e]
        y = torch.sub(xs, shift[s:e].copy_(xs[pivot]), out=scratch.y[:, :c])
        ps = torch.mm(refs.lhs, y, out=p[:, s:e])  # (M + 1, c): <y, u_c> per mode, then S1
        torch.sum(y.mul_(y), dim=0, out=s2[s:e])  # y is not needed after the product
        score = torch.abs(ps[:m], out=scratch.score[:, :c])  # |corr| times ||x - mean||
        best = torch.amax(score, dim=0, out=scratch.best[:c])
        # the lowest mode reaching the best score (all-zero scores: mode 0), in float
        # arithmetic (bool masks cost several times more): best - score is 0 exactly where
        # the score is the best, > 0 elsewhere, so mode + M sign(best - score) is the
        # mode there and >= M elsewhere. A NaN score (a column holding NaN or Inf) gives
        # NaN: such a column is not finite and gets label 0 below.
        gap = torch.sub(best, score, out=scratch.pick[:, :c]).sign_()
        torch.amin(torch.addcmul(refs.mode_ids, gap, refs.none, out=gap), dim=0, out=lab[s:e])
    sc = scratch
    sh, sq2, s1 = sc.sh[:w].copy_(shift), sc.sq2[:w].copy_(s2), sc.s1[:w].copy_(p[m])
    q = torch.div(s1, t, out=sc.q[:w])
    mean = torch.add(sh, q, out=sc.mean[:w])
    norm2 = torch.addcmul(sq2, s1, q, value=-1.0, out=sc.norm2[:w]).clamp_(min=0.0)
    # not finite: a column holding NaN or Inf (its S2 is then NaN or Inf); v - v is 0
    # exactly for a finite v, NaN otherwise
    tmp = torch.add(norm2, mean, out=sc.t1[:w])
    nf = torch.ne(tmp.sub_(tmp), 0.0, out=sc.nf[:w])
    # the rule of is_flat, with the non-finite columns known: spread at rounding level
    limit = torch.abs(mean, out=sc.t2[:w]).clamp_(min=1e-30).mul_(FLAT_RTOL * t**0.5)
    flat = torch.le(torch.sqrt(norm2, out=sc.t1[:w]), limit, out=sc.flat[:w]).logical_or_(nf)
    # a constant column has every |y| <= max - min <= CONST_RTOL max(|max|, |min|)
    # < 2 CONST_RTOL |shift|, so S2 <= T (2 CONST_RTOL shift)^2: only the columns within
    # 4 times that (usually few) get their exact extremes read from x
    room = torch.addcmul(sq2, sh, sh, value=-16.0 * t * CONST_RTOL**2, out=sc.t1[:w])
    idx = torch.le(room, 0.0, out=sc.mask[:w]).nonzero()[:, 0]
    const = None
    frozen = nf
    if idx.numel():
        part = x[:, g0:g1].index_select(1, idx)
        hi, lo = part.amax(dim=0), part.amin(dim=0)
        is_const = constant_columns(hi, lo)
        const = torch.zeros(w, dtype=torch.bool, device=x.device)
        const[idx] = is_const
        flat.logical_or_(const)
        frozen = torch.logical_or(nf, const, out=sc.mask[:w])
    labels = sc.labels[:w].copy_(lab.masked_fill_(flat, 0.0))  # constant, NaN, Inf: 0
    drift, coef, norm, rmean, gap = (
        torch.index_select(v, 0, labels, out=buf[:w])
        for v, buf in zip(refs.table, sc.per_mode, strict=True)
    )
    dot32 = torch.gather(p, 0, labels[None], out=sc.dot32[:, :w])
    dot = sc.dot[:w].copy_(dot32[0])  # <y, u_label>
    d = torch.addcmul(dot, q, drift, value=-1.0, out=sc.d[:w])  # <x - mean, u_label>
    a = torch.mul(d, coef, out=sc.a[:w]).masked_fill_(frozen, 0.0)
    torch.addcmul(mean, a, rmean, value=-1.0, out=out.b[g0:g1])  # b, rounded to float32
    if const is not None:
        # an exactly constant column is rebuilt bit for bit: b is its value
        exact = is_const & (hi == lo)
        out.b[g0 + idx[exact]] = hi[exact]
    # squared residual: ||x - mean||^2 - a <x - mean, r_label - mean_label>
    resid = torch.addcmul(norm2, a, d.mul_(norm), value=-1.0, out=sc.t1[:w]).clamp_(min=0.0)
    dot.mul_(norm)  # <y, r_label - mean_label>
    # running sums from the shifted statistics: x = y + shift, and
    # Σ y (r - first) = <y, r - mean_r> + (mean_r - first) S1
    sum_w = torch.add(s1, sh, alpha=t, out=out.sum_w[g0:g1])
    half = torch.add(s1, sh, alpha=0.5 * t, out=sc.t2[:w])
    sum_w2 = torch.addcmul(sq2, sh, half, value=2.0, out=out.sum_w2[g0:g1])
    torch.addcmul(dot, gap, sum_w, out=out.sum_wr[g0:g1])
    out.labels[g0:g1] = labels
    out.a[g0:g1] = a
    grp = labels.masked_fill_(nf, m + 1)  # slot M + 1 of the totals: left out
    if const is None:
        out.constant[g0:g1] = False
    else:
        out.constant[g0:g1] = const
        grp.masked_fill_(const, m)  # slot M: the constant columns
    out.totals[g0] = (
        torch.bincount(grp, resid, minlength=m + 2)[: m + 1],
        torch.bincount(grp, sum_w2, minlength=m + 2)[: m + 1],  # Σ x² = norm2 + T mean²
        torch.bincount(grp, minlength=m + 2)[: m + 1],
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
