"""Kernel GB/s: steps 5-6 (assignment + fit, :func:`cmdtool.method.kernels.fit_block`)
on blocks already in memory, no store read timed.

``measure(...)`` returns a dict that ``scripts/bench.py`` can record; run as a script it
prints that dict as JSON::

    python scripts/bench_kernel.py --n 262144 --t 50 --m 10 --device cpu
    python scripts/bench_kernel.py --device cuda            # on a GPU machine
    git show HEAD~1:cmdtool/method/kernels.py > /tmp/old_kernels.py
    python scripts/bench_kernel.py --baseline /tmp/old_kernels.py   # before/after

``gbps`` is bytes of trajectory (T x n x 4) over the best wall time; ``gbps_cpu`` over
the process CPU time (user + sys, all threads) of that repeat, which stays meaningful
on a loaded machine; on CUDA ``gbps_h2d`` adds the transfer from (unpinned) host memory
through :class:`cmdtool.backends.staging.Staging`, one block copying while the previous
one computes. With ``--baseline FILE`` (another kernels.py with the same
``References``/``fit_block`` API) both kernels run on the same blocks, alternating, on the
same ``workers``, and the ratio of their CPU times is reported (the machine is shared:
compare against a copy of the old kernels.py this way, not against absolute timings).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _blocks(n: int, t: int, m: int, count: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``count`` (t, n) float32 blocks of m noisy planted profiles, and m references."""
    rng = np.random.default_rng(seed)
    prof = np.cumsum(rng.normal(size=(m, t)), axis=1)
    blocks = []
    for _ in range(count):
        lab = rng.integers(0, m, size=n)
        w = prof[lab].T * rng.normal(size=n).astype(np.float32) + rng.normal(size=n)
        w += 0.1 * rng.standard_normal((t, n))
        blocks.append(np.ascontiguousarray(w, dtype=np.float32))
    return blocks, prof.astype(np.float32)


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_kernels", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def measure(
    n: int = 262_144,
    t: int = 50,
    m: int = 10,
    device: str = "cpu",
    *,
    workers: int | None = None,
    repeats: int = 5,
    blocks: int = 2,
    seed: int = 0,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Time ``fit_block`` over ``blocks`` (t, n) float32 blocks with m references.

    Parameters
    ----------
    n, t, m : int
        Columns per block, epochs, modes.
    device : str
        ``cpu``, ``cuda`` or ``cuda:N``.
    workers : int, optional
        Kernel threads on the CPU (default: the cores of this process, torch's own
        threads set to 1, as :class:`cmdtool.backends.local.LocalBackend` runs it).
    repeats : int
        Passes over the blocks; the best is reported.
    blocks : int
        Distinct blocks per pass (each fresh from host memory, so no cache holds it).
    baseline : str, optional
        Path of another kernels.py to time alternately on the same blocks (CPU).

    Returns
    -------
    dict
        ``gbps``, ``gbps_cpu``, ``seconds`` (best pass), ``bytes`` (per pass),
        ``device``, ``workers``, ``torch_threads``; on CUDA ``gbps_h2d``; with a
        baseline ``baseline_gbps_cpu`` and ``speedup_cpu`` (its CPU time over ours).
    """
    import torch

    from cmdtool.backends.local import cpu_cores
    from cmdtool.method import kernels

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    host, ref_traj = _blocks(n, t, m, blocks, seed)
    nbytes = sum(b.nbytes for b in host)
    workers = workers or (1 if cuda else cpu_cores())
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def timed(mod: ModuleType, fresh: list[Any]) -> tuple[float, float]:
        refs = mod.References.from_trajectories(ref_traj, dev)
        xs = [f() for f in fresh]
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        for x in xs:
            mod.fit_block(x, refs, workers=workers)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    def copies() -> list[Any]:
        return [lambda b=b: torch.from_numpy(b.copy()).to(dev) for b in host]

    others = [_load(baseline)] if baseline else []
    try:
        timed(kernels, copies())  # warm-up: CUDA context, cuBLAS handles, allocator
        best: dict[str, tuple[float, float]] = {}
        for _ in range(repeats):
            for mod in [kernels, *others]:
                wall, cpu = timed(mod, copies())
                key = "ours" if mod is kernels else "baseline"
                if key not in best or wall < best[key][0]:
                    best[key] = (wall, cpu)
        out: dict[str, Any] = {
            "n": n, "t": t, "m": m, "bytes": nbytes,
            "seconds": best["ours"][0],
            "gbps": nbytes / best["ours"][0] / 1e9,
            "gbps_cpu": nbytes / max(best["ours"][1], 1e-9) / 1e9,
            "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
            "workers": workers,
            "torch_threads": torch.get_num_threads(),
        }
        if "baseline" in best:
            out["baseline_gbps_cpu"] = nbytes / max(best["baseline"][1], 1e-9) / 1e9
            out["speedup_cpu"] = best["baseline"][1] / max(best["ours"][1], 1e-9)
        if cuda:
            out["gbps_h2d"] = nbytes / _with_transfers(host, ref_traj, dev, repeats) / 1e9
        return out
    finally:
        torch.set_num_threads(threads)


def _with_transfers(host: list[np.ndarray], ref_traj: np.ndarray, dev: Any, repeats: int) -> float:
    """Best seconds of a pass from host memory: put block i + 1, then compute block i."""
    import torch

    from cmdtool.backends.staging import Staging
    from cmdtool.method.kernels import References, fit_block

    refs = References.from_trajectories(ref_traj, dev)
    ring = Staging(dev)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        pending = None
        for block in host:
            staged = ring.put(block)
            if pending is not None:
                fit_block(pending.tensor(), refs)
                pending.release()
            pending = staged
        assert pending is not None
        fit_block(pending.tensor(), refs)
        pending.release()
        torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=262_144)
    ap.add_argument("--t", type=int, default=50)
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--baseline", default=None)
    args = ap.parse_args(argv)
    res = measure(args.n, args.t, args.m, args.device, workers=args.workers,
                  repeats=args.repeats, blocks=args.blocks, baseline=args.baseline)
    print(json.dumps(res, indent=1))
    return 1 if "error" in res else 0


if __name__ == "__main__":
    sys.exit(main())
