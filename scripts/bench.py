"""Benchmark cmdtool on planted trajectories and write BENCHMARKS.md.

For each size (N parameters x T epochs) it writes T safetensors checkpoints of planted
trajectories (DESIGN.md's model ``w_i(t) = a_i * p_m(i)(t) + b_i`` with 10 random-walk
profiles, plus noise), then runs the real CLI, each command in its own process so that
peak RSS is per command:

- ``cmdtool ingest``: throughput (checkpoint bytes / wall) and peak RSS against the
  budget 2 checkpoints + 256 MiB;
- two floors, each a process of its own: a plain zarr-python read and a plain zarrs read
  of ``weights`` (``zarr.open_array``, every column block over all rows, as decompose
  reads them; no cmdtool, no torch), and cmdtool's own checked ``read_block`` (all reads
  are warm: the store was just written);
- ``cmdtool decompose --device cpu`` (and ``--device cuda`` when there is a GPU): wall time,
  its in-process ``seconds``, the ratio to the plain read, peak RSS;
- ``cmdtool reconstruct --epochs last``: wall time, peak RSS;
- on CUDA, the streamed steps 5-6 alone (``cmdtool.backends.fit_columns`` over blocks held
  in pinned host memory), in GB/s.

At the smallest size it also counts the chunk reads of one decompose (``weights`` must be
read at most once) and appends T more epochs to compare decompose/reconstruct RSS at T and
2T. Results are checked against the targets (PASS/FAIL) and written to ``--out``; anything
above the line ``<!-- bench.py output below -->`` in that file is kept.

    python scripts/bench.py                                  # the four default sizes
    python scripts/bench.py --quick --out /tmp/B.md          # smoke run, < 1 minute
    python scripts/bench.py --sizes 200000x20,500000x30 --out /tmp/bench.md
    python scripts/bench.py --sizes 86Mx100                  # opt-in, needs ~70 GB disk

Units: throughput in GB/s (1e9 bytes), memory in MiB/GiB (2**20 / 2**30 bytes, as the
kernel reports RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
MARKER = "<!-- bench.py output below -->"
DEFAULT_SIZES = [(1_000_000, 50), (4_000_000, 50), (16_000_000, 50), (11_200_000, 150)]
QUICK_SIZES = [(300_000, 12)]  # --quick: a smoke run, well under a minute
BIG = (86_000_000, 100)  # only when --sizes asks for it
# issue 14's targets: CLI decompose wall / plain zarr-python read process wall, per size
RATIO_LIMITS = {(16_000_000, 50): 1.0, (4_000_000, 50): 1.5}
RATIO_SIZES = set(RATIO_LIMITS)
RSS_SIZES = {(16_000_000, 50), (11_200_000, 150)}
RATIO_LIMIT = 2.0  # shown for the other sizes (the earlier target)
INGEST_SIZES = {(16_000_000, 50)}
INGEST_GBS = 0.8  # ingest GB/s of trajectory (CLI wall) at (16M, 50)
E2E_SIZES = {(4_000_000, 50)}
E2E_LIMIT = 2.0  # ingest + decompose wall, seconds, at (4M, 50)
KERNEL_GBS = 2.5  # steps 5-6 on 2 cores, GB/s of trajectory
CUDA_PASS_GBS = 40.0  # streamed steps 5-6 on a GPU
CUDA_RATIO = 1.5  # decompose --device cuda of (86M, 100) / the zarrs read
RSS_LIMIT = int(1.5 * 2**30)
INGEST_SLACK = 256 * 2**20
T_GROWTH_LIMIT = 0.10  # peak RSS at 2T may exceed the one at T by at most 10%
MiB = 2**20
GiB = 2**30
MODES = 10
SAMPLES = 1000
SEED = 0
NOISE = 0.1
TENSOR_SHARES = (0.55, 0.25, 0.15)  # and the rest: four tensors of uneven sizes
GEN_CHUNK = 1 << 20
CUDA_REPEATS = 3
GNU_TIME = "/usr/bin/time"
BASELINE = (
    "import torch, zarr, cmdtool.cli, cmdtool.ingestion, cmdtool.decomposition, "
    "cmdtool.reconstruction"
)


# ---------------------------------------------------------------------------- sizes
def parse_count(text: str) -> int:
    """``1000000``, ``1M``, ``11.2M``, ``200k``, ``1.5e6`` -> int."""
    text = text.strip()
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    if mult != 1:
        text = text[:-1]
    return round(float(text) * mult)


def parse_sizes(spec: str) -> list[tuple[int, int]]:
    sizes = []
    for item in spec.split(","):
        if not item.strip():
            continue
        n, sep, t = item.lower().partition("x")
        if not sep:
            raise SystemExit(f"--sizes: {item!r} is not NxT (e.g. 4000000x50 or 4Mx50)")
        sizes.append((parse_count(n), int(t)))
    if not sizes:
        raise SystemExit("--sizes: no size given")
    for n, t in sizes:
        if n < 1000 or t < 3:
            raise SystemExit(f"--sizes: {n}x{t} is too small (N >= 1000, T >= 3)")
    return sizes


def human_n(n: int) -> str:
    for unit, div in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= div:
            return f"{n / div:.4g}{unit}"
    return str(n)


def size_label(n: int, t: int) -> str:
    return f"{human_n(n)} x {t}"


def tensor_sizes(n: int) -> list[int]:
    sizes = [int(n * s) for s in TENSOR_SHARES]
    return [*sizes, n - sum(sizes)]


# ------------------------------------------------------------------- planted data
def profiles(t_max: int) -> np.ndarray:
    """M random-walk profiles over epochs 1..t_max: float64, (M, t_max)."""
    rng = np.random.default_rng([SEED, 12345])
    steps = rng.standard_normal((MODES, t_max))
    walk = np.cumsum(steps, axis=1)
    return walk / walk.std(axis=1, keepdims=True).clip(min=1e-9)


def generate(folder: Path, n: int, epochs: range, prof: np.ndarray) -> tuple[float, int]:
    """Write ``epoch_{t:03d}.safetensors`` for each t in ``epochs`` (labels from 1).

    Per-parameter ``a``, ``b`` and mode are regenerated per chunk from seeded generators,
    so that nothing but the checkpoint being written is held (save_file copies it once).
    Returns (seconds, bytes written).
    """
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    total = 0
    sizes = tensor_sizes(n)
    for t in epochs:
        pt = prof[:, t - 1].astype(np.float32)
        tensors = {}
        for k, size in enumerate(sizes):
            out = np.empty(size, dtype=np.float32)
            for c, c0 in enumerate(range(0, size, GEN_CHUNK)):
                c1 = min(c0 + GEN_CHUNK, size)
                fixed = np.random.default_rng([SEED, k, c])
                a = fixed.standard_normal(c1 - c0, dtype=np.float32)
                b = fixed.standard_normal(c1 - c0, dtype=np.float32)
                g = fixed.integers(0, MODES, c1 - c0, dtype=np.int8)
                noise = np.random.default_rng([SEED, k, c, t]).standard_normal(
                    c1 - c0, dtype=np.float32
                )
                dst = out[c0:c1]
                np.multiply(a, pt[g], out=dst)
                dst += b
                noise *= NOISE
                dst += noise
            tensors[f"blocks.{k}.weight"] = out
        path = folder / f"epoch_{t:03d}.safetensors"
        save_file(tensors, str(path))
        del tensors
        total += path.stat().st_size
    return time.perf_counter() - t0, total


# ------------------------------------------------------------------ measuring
@dataclass
class Run:
    """One child process: its wall time (perf_counter around it) and peak RSS."""

    cmd: list[str]
    wall: float
    rss: int | None  # bytes
    rc: int
    stdout: str
    stderr: str
    time_elapsed: float | None = None  # /usr/bin/time's own figure (0.01 s resolution)

    def data(self) -> dict[str, Any]:
        text = self.stdout.strip()
        start = text.find("{")
        return json.loads(text[start:]) if start >= 0 else {}


class BenchError(RuntimeError):
    pass


def _gnu_time_works() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    try:
        res = subprocess.run(
            [GNU_TIME, "-v", "true"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return False
    return "Maximum resident set size" in res.stderr


USE_GNU_TIME = _gnu_time_works()


def _parse_elapsed(text: str) -> float:
    parts = [float(p) for p in text.strip().split(":")]
    secs = 0.0
    for p in parts:
        secs = secs * 60 + p
    return secs


def run_measured(cmd: list[str], what: str) -> Run:
    """Run ``cmd`` as a child; peak RSS from ``/usr/bin/time -v`` or, without it, wait4."""
    print(f"  {what}: {' '.join(_short(c) for c in cmd)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        out_p, err_p, time_p = (Path(tmp) / n for n in ("out", "err", "time"))
        full = [GNU_TIME, "-v", "-o", str(time_p), *cmd] if USE_GNU_TIME else cmd
        with out_p.open("w") as fo, err_p.open("w") as fe:
            t0 = time.perf_counter()
            proc = subprocess.Popen(full, stdout=fo, stderr=fe, cwd=REPO)
            rss: int | None = None
            if USE_GNU_TIME:
                rc = proc.wait()
            else:
                _, status, usage = os.wait4(proc.pid, 0)
                rc = os.waitstatus_to_exitcode(status)
                proc.returncode = rc
                rss = int(usage.ru_maxrss) * 1024  # KiB on Linux
            wall = time.perf_counter() - t0
        elapsed = None
        if USE_GNU_TIME and time_p.exists():
            report = time_p.read_text()
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
            rss = int(m.group(1)) * 1024 if m else None
            m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", report)
            elapsed = _parse_elapsed(m.group(1)) if m else None
        run = Run(cmd, wall, rss, rc, out_p.read_text(), err_p.read_text(), elapsed)
    rss_txt = f"{run.rss / MiB:.0f} MiB" if run.rss else "?"
    by_time = f" (/usr/bin/time: {elapsed:.2f} s)" if elapsed is not None else ""
    print(
        f"    -> {run.wall:.2f} s{by_time}, peak RSS {rss_txt}, exit {rc}",
        file=sys.stderr,
        flush=True,
    )
    if rc != 0:
        tail = (run.stderr.strip() or run.stdout.strip())[-800:]
        raise BenchError(f"{what} failed with exit code {rc}: {tail}")
    return run


def _short(arg: str) -> str:
    return arg if len(arg) < 60 else "..." + arg[-50:]


def cmdtool(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "cmdtool", *map(str, args)]


def child(*args: str | Path) -> list[str]:
    return [sys.executable, str(HERE), "--child", *map(str, args)]


# ------------------------------------------------------------- child processes
def child_read(store: str, pipe: str = "cmdtool") -> dict[str, Any]:
    """A floor: every column block over all committed rows, as decompose reads them.

    ``pipe``: ``zarr-python`` or ``zarrs``, a plain zarr read of ``weights`` (no cmdtool,
    no torch: ``zarr.open_array`` on a ``LocalStore``, that codec pipeline) or
    ``cmdtool``, ``TrajectoryStore.read_block`` (checked, the pipeline cmdtool picks)."""
    import zarr
    import zarr.storage

    if pipe == "cmdtool":
        from cmdtool.store import TrajectoryStore, pipeline

        st = TrajectoryStore.open(store)
        rows = np.arange(st.n_epochs, dtype=np.int64)
        blocks = list(st.column_blocks())
        t0 = time.perf_counter()
        total = sum(st.read_block(rows, a, b).nbytes for a, b in blocks)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "bytes": total, "blocks": len(blocks),
                "pipeline": pipeline.describe(st)["reads"]}
    t = len(json.loads((Path(store) / "zarr.json").read_text())["attributes"]["cmdtool"]["epochs"])
    conf = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"} if pipe == "zarrs" else {}
    with zarr.config.set(conf):
        arr = zarr.open_array(zarr.storage.LocalStore(store, read_only=True), path="weights",
                              mode="r")
    used = type(arr._async_array.codec_pipeline).__module__.split(".")[0]
    n, w = int(arr.shape[1]), int(arr.chunks[1])
    t0 = time.perf_counter()
    total = sum(np.asarray(arr[:t, a : a + w]).nbytes for a in range(0, n, w))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": total, "blocks": -(-n // w), "pipeline": used}


def child_count(store: str) -> dict[str, Any]:
    """One decompose (cpu) with every chunk read of the store counted by key."""
    import zarr.storage

    from cmdtool.decomposition import CMD
    from cmdtool.store import TrajectoryStore

    counts: Counter[str] = Counter()
    orig_get = zarr.storage.LocalStore.get
    orig_partial = zarr.storage.LocalStore.get_partial_values

    async def get(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        counts[key] += 1
        return await orig_get(self, key, *args, **kwargs)

    async def get_partial_values(self: Any, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            counts[key] += 1
        return await orig_partial(self, prototype, key_ranges)

    assert asyncio.iscoroutinefunction(orig_get)
    zarr.storage.LocalStore.get = get  # type: ignore[method-assign]
    zarr.storage.LocalStore.get_partial_values = get_partial_values  # type: ignore[method-assign]
    st = TrajectoryStore.open(store)
    t, n_chunks = st.n_epochs, len(list(st.column_blocks()))
    counts.clear()
    t0 = time.perf_counter()
    CMD(MODES, n_samples=min(SAMPLES, st.n_params), seed=SEED, device="cpu").fit(
        store, name="bench_count"
    )
    seconds = time.perf_counter() - t0
    weights = {k: v for k, v in counts.items() if k.startswith("weights/c/")}
    return {
        "seconds": seconds,
        "epochs": t,
        "chunks_per_row": n_chunks,
        "expected_reads": t * n_chunks,
        "chunk_reads": sum(weights.values()),
        "distinct_chunks": len(weights),
        "max_reads_per_chunk": max(weights.values(), default=0),
        "pool_reads": sum(v for k, v in counts.items() if k.startswith("pool/c/")),
    }


def child_pass(store: str, device_name: str) -> dict[str, Any]:
    """Steps 5-6 alone: ``fit_columns`` over blocks already in host memory (pinned for
    CUDA), so no store read is timed."""
    import psutil
    import torch

    from cmdtool.backends import fit_columns
    from cmdtool.backends.local import cpu_cores
    from cmdtool.method.kernels import References
    from cmdtool.store import TrajectoryStore

    device = torch.device(device_name)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        return {"error": "no CUDA device"}

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    st = TrajectoryStore.open(store)
    result = st.open_result("cmd")
    rows = np.asarray(result.attrs["cmdtool_result"]["rows"], dtype=np.int64)  # type: ignore[index]
    ref_traj = np.asarray(result["ref_traj"][:], dtype=np.float32)  # type: ignore[index]
    blocks = list(st.column_blocks())
    budget = 0.5 * psutil.virtual_memory().available
    chosen, held = [], 0
    for start, stop in blocks:
        nbytes = len(rows) * (stop - start) * 4
        if held + nbytes > budget:
            break
        chosen.append((start, stop))
        held += nbytes
    if not chosen:
        return {"error": "not even one block fits in half the available host memory"}
    host = []
    for start, stop in chosen:
        buf = torch.empty((len(rows), stop - start), dtype=torch.float32, pin_memory=on_cuda)
        buf.numpy()[:] = st.read_block(rows, start, stop)
        host.append(buf.numpy())
    pinned = on_cuda and bool(torch.from_numpy(host[0]).is_pinned())
    refs = References.from_trajectories(ref_traj, device)
    # As LocalBackend runs the pass: on the CPU the kernel's own threads, torch at 1.
    workers = 1 if on_cuda else cpu_cores()
    if not on_cuda:
        torch.set_num_threads(1)
    fit_columns(host[0], refs, device, workers=workers)  # warm-up: CUDA context, caches
    sync()
    times = []
    for _ in range(CUDA_REPEATS if on_cuda else 1):
        t0 = time.perf_counter()
        for block in host:
            fit_columns(block, refs, device, workers=workers)
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "seconds": min(times),
        "all_seconds": times,
        "bytes": held,
        "blocks": len(chosen),
        "of_blocks": len(blocks),
        "pinned": pinned,
        "device": torch.cuda.get_device_name(device)
        if on_cuda
        else f"cpu, {workers} kernel threads, torch at {torch.get_num_threads()}",
    }


def child_main(argv: list[str]) -> None:
    what, store = argv
    if what.startswith("read"):  # read, read-zarr-python, read-zarrs
        data = child_read(store, what.removeprefix("read").lstrip("-") or "cmdtool")
    elif what == "count":
        data = child_count(store)
    else:  # "pass-cpu", "pass-cuda"
        data = child_pass(store, what.removeprefix("pass-"))
    sys.stdout.write(json.dumps(data) + "\n")


# ----------------------------------------------------------------- the machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mount_of(path: Path) -> str:
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    best = ("", "?", "?")
    p = str(path.resolve())
    for dev, mnt, fstype, *_ in mounts:
        if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
            best = (mnt, fstype, dev)
    return f"{best[1]} ({best[2]} on {best[0]})"


def _git(*args: str) -> str:
    try:
        res = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def describe_machine(workdir: Path) -> dict[str, str]:
    import psutil
    import safetensors
    import torch
    import zarr

    vm = psutil.virtual_memory()
    disk = shutil.disk_usage(workdir)
    gpu = "none (torch.cuda.is_available() is False)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name}, {props.total_memory / GiB:.0f} GiB"
    commit = _git("rev-parse", "--short", "HEAD") or "?"
    if _git("status", "--porcelain", "--untracked-files=no", "--", "cmdtool"):
        commit += " (cmdtool/ has uncommitted changes)"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    try:
        import zarrs

        zarrs_version = f"zarrs {zarrs.__version__}"
    except Exception as exc:  # the floors' zarrs row then reads through zarr-python
        zarrs_version = f"zarrs not available ({type(exc).__name__})"
    from cmdtool.store import pipeline

    choice, why = pipeline.choice()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "codec pipeline": f"cmdtool reads `weights` with {choice} ({why}); writes with "
        f"zarr-python; {zarrs_version}",
        "git commit": commit,
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical cores "
        f"({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} usable)",
        "RAM": f"{vm.total / GiB:.1f} GiB total, {vm.available / GiB:.1f} GiB available at start",
        "GPU": gpu,
        "workdir": f"{workdir} on {_mount_of(workdir)}, {disk.free / 1e9:.0f} GB free",
        "load average at start": ", ".join(f"{x:.2f}" for x in load),
        "OS": platform.platform(),
        "versions": f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"zarr {zarr.__version__}, numpy {np.__version__}, safetensors {safetensors.__version__}",
        "peak RSS from": "/usr/bin/time -v" if USE_GNU_TIME else "os.wait4 ru_maxrss",
    }


# ---------------------------------------------------------------- one size
@dataclass
class SizeResult:
    n: int
    t: int
    skipped: str | None = None
    error: str | None = None
    smallest: bool = False
    gen_seconds: float = 0.0
    ckpt_bytes: int = 0
    total_seconds: float = 0.0
    runs: dict[str, Run] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return size_label(self.n, self.t)

    @property
    def weights_bytes(self) -> int:
        return self.n * self.t * 4

    def data(self, key: str) -> dict[str, Any]:
        return self.runs[key].data() if key in self.runs else {}


def disk_needed(n: int, t: int, smallest: bool) -> int:
    """Checkpoints and store side by side (checkpoints are deleted after ingest), with
    T more epochs at the smallest size, a rebuilt epoch, and 10% + 1 GiB of room."""
    rows = 2 * t if smallest else t
    need = (t + rows) * n * 4 + 2 * n * 4
    return int(need * 1.1) + GiB


def ram_needed(n: int, t: int) -> int:
    """The generator (a checkpoint and save_file's copy), ingest's budget, decompose's
    blocks, and 1.5 GiB for the interpreters and torch."""
    from cmdtool.store import CHUNK

    return 3 * n * 4 + 4 * t * CHUNK * 4 + int(1.5 * GiB)


def check_fits(n: int, t: int, workdir: Path, smallest: bool) -> str | None:
    import psutil

    disk = disk_needed(n, t, smallest)
    free = shutil.disk_usage(workdir).free
    if disk > free:
        return f"skipped: needs {disk / 1e9:.0f} GB disk, {free / 1e9:.0f} GB free"
    ram = ram_needed(n, t)
    avail = psutil.virtual_memory().available
    if ram > avail:
        return f"skipped: needs {ram / GiB:.1f} GiB RAM, {avail / GiB:.1f} GiB available"
    return None


def bench_size(res: SizeResult, root: Path, cuda: bool, keep: bool) -> None:
    t_start = time.perf_counter()
    try:
        _bench_size(res, root, cuda, keep)
    finally:
        res.total_seconds = time.perf_counter() - t_start


def _bench_size(res: SizeResult, root: Path, cuda: bool, keep: bool) -> None:
    n, t = res.n, res.t
    ckpts, store = root / "ckpts", root / "store.zarr"
    prof = profiles(2 * t)
    print(f"[{res.label}] generating {t} checkpoints ...", file=sys.stderr, flush=True)
    res.gen_seconds, res.ckpt_bytes = generate(ckpts, n, range(1, t + 1), prof)
    print(
        f"  {res.ckpt_bytes / 1e9:.2f} GB in {res.gen_seconds:.1f} s", file=sys.stderr, flush=True
    )
    runs = res.runs
    runs["ingest"] = run_measured(cmdtool("ingest", ckpts, store, "--json"), "ingest")
    if not keep:
        shutil.rmtree(ckpts)  # leaves the page cache to the store
    # the two floors, each a whole process of its own: plain zarr, no cmdtool, no torch
    runs["read_zp"] = run_measured(child("read-zarr-python", store), "plain zarr-python read")
    runs["read_zarrs"] = run_measured(child("read-zarrs", store), "plain zarrs read")
    runs["read_cmdtool"] = run_measured(child("read", store), "cmdtool read_block")
    runs["decompose_cpu"] = run_measured(
        cmdtool("decompose", store, "--json", "--device", "cpu"), "decompose --device cpu"
    )
    if cuda:
        runs["decompose_cuda"] = run_measured(
            cmdtool("decompose", store, "--json", "--device", "cuda"), "decompose --device cuda"
        )
    runs["reconstruct"] = run_measured(
        cmdtool("reconstruct", store, root / "recon", "--epochs", "last", "--json"),
        "reconstruct --epochs last",
    )
    runs["cpu_pass"] = run_measured(child("pass-cpu", store), "steps 5-6 alone on cpu")
    if cuda:
        runs["cuda_pass"] = run_measured(child("pass-cuda", store), "steps 5-6 alone on cuda")
    if res.smallest:
        runs["count"] = run_measured(child("count", store), "decompose with counted reads")
        more = root / "ckpts_more"
        print(f"[{res.label}] generating {t} more checkpoints ...", file=sys.stderr, flush=True)
        generate(more, n, range(t + 1, 2 * t + 1), prof)
        runs["ingest_more"] = run_measured(
            cmdtool("ingest", more, store, "--json"), f"ingest (append {t} epochs)"
        )
        if not keep:
            shutil.rmtree(more)
        runs["decompose_2t"] = run_measured(
            cmdtool("decompose", store, "--json", "--device", "cpu"),
            f"decompose --device cpu at T = {2 * t}",
        )
        runs["reconstruct_2t"] = run_measured(
            cmdtool("reconstruct", store, root / "recon_2t", "--epochs", "last", "--json"),
            f"reconstruct --epochs last at T = {2 * t}",
        )


# ------------------------------------------------------------------ report
def _mib(b: int | None) -> str:
    return "?" if b is None else f"{b / MiB:,.0f} MiB"


def _gbs(nbytes: float, seconds: float | None) -> str:
    return "" if not seconds else f"{nbytes / seconds / 1e9:.2f} GB/s"


def ingest_budget(n: int) -> int:
    return 2 * n * 4 + INGEST_SLACK


def floor_seconds(res: SizeResult, key: str = "read_zp") -> float | None:
    """A plain read's loop time (in-process): ``read_zp`` (zarr-python, the issue's floor)
    or ``read_zarrs``."""
    return res.data(key).get("seconds") or None


def floor_wall(res: SizeResult, key: str = "read_zp") -> float | None:
    """A plain read's whole-process wall time (the issue's targets compare whole processes)."""
    return res.runs[key].wall if key in res.runs else None


def render_size(res: SizeResult) -> list[str]:
    lines = [f"### N = {res.n:,}, T = {res.t} ({res.weights_bytes / 1e9:.2f} GB of weights)", ""]
    if res.skipped:
        return [*lines, res.skipped, ""]
    if res.error:
        lines += [f"**error**: {res.error}", ""]
    lines += [
        f"{res.t} checkpoints, {res.ckpt_bytes / 1e9:.2f} GB, generated in "
        f"{res.gen_seconds:.1f} s (not measured); the whole size took "
        f"{res.total_seconds:.0f} s.",
        "",
        "| step | wall (CLI) | in-process | throughput | peak RSS | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    w = res.weights_bytes
    r = res.runs

    def row(key: str, step: str, nbytes: float, notes: str = "") -> None:
        if key not in r:
            return
        run, d = r[key], r[key].data()
        inproc = d.get("seconds")
        thr = _gbs(nbytes, run.wall if key.startswith("ingest") else inproc)
        if key.startswith("ingest") and inproc:
            thr += f" ({_gbs(nbytes, inproc)} in-process)"
        ins = f"{inproc:.2f} s" if inproc is not None else ""
        lines.append(f"| {step} | {run.wall:.2f} s | {ins} | {thr} | {_mib(run.rss)} | {notes} |")

    if "ingest" in r:
        budget = ingest_budget(res.n)
        rss = r["ingest"].rss or 0
        row(
            "ingest",
            "`ingest`",
            res.ckpt_bytes,
            f"checkpoint bytes / CLI wall; budget 2 x {res.n * 4 / MiB:.0f} MiB + 256 MiB "
            f"= {_mib(budget)}, RSS / budget = {rss / budget:.2f}",
        )
    for key, step in (
        ("read_zp", "plain zarr-python read (floor)"),
        ("read_zarrs", "plain zarrs read (floor)"),
        ("read_cmdtool", "cmdtool `read_block` (checked)"),
    ):
        d = res.data(key)
        row(key, step, w, f"{d.get('blocks', '?')} column blocks x {res.t} rows, "
            f"pipeline {d.get('pipeline', '?')}")
    for key, step in (
        ("decompose_cpu", "`decompose --device cpu`"),
        ("decompose_cuda", "`decompose --device cuda`"),
    ):
        d = res.data(key)
        if d:
            row(
                key,
                step,
                w,
                f"{d.get('n_modes')} modes, relative error {d.get('relative_error', 0):.4f}",
            )
    row("reconstruct", "`reconstruct --epochs last`", res.n * 4, "one epoch written")
    for key, dev in (("cpu_pass", "cpu"), ("cuda_pass", "cuda")):
        d = res.data(key)
        step = f"steps 5-6 alone, {dev}"
        if "error" in d:
            lines.append(f"| {step} | | | | | {d['error']} |")
        elif d:
            memory = "pinned host memory" if d.get("pinned") else "host memory"
            row(
                key,
                step,
                d["bytes"],
                f"`fit_columns` over {d['blocks']}/{d['of_blocks']} blocks already in "
                f"{memory} (no store read), best of {len(d['all_seconds'])}; {d['device']}",
            )
    for key, step in (
        ("ingest_more", f"`ingest` (append {res.t} epochs)"),
        ("decompose_2t", f"`decompose --device cpu`, T = {2 * res.t}"),
        ("reconstruct_2t", f"`reconstruct --epochs last`, T = {2 * res.t}"),
    ):
        nbytes = {"ingest_more": res.ckpt_bytes, "decompose_2t": 2 * w}.get(key, res.n * 4)
        row(key, step, nbytes)
    lines.append("")
    dc = res.data("decompose_cpu")
    for key, what in (("read_zp", "zarr-python"), ("read_zarrs", "zarrs")):
        floor, fwall = floor_seconds(res, key), floor_wall(res, key)
        if floor and fwall and dc:
            lines += [
                f"decompose / plain {what} read: **{r['decompose_cpu'].wall / fwall:.2f}x** "
                f"whole process ({r['decompose_cpu'].wall:.2f} s vs {fwall:.2f} s), "
                f"{dc['seconds'] / floor:.2f}x in-process ({dc['seconds']:.2f} s vs "
                f"{floor:.2f} s).",
                "",
            ]
    if "ingest" in r and dc:
        e2e = r["ingest"].wall + r["decompose_cpu"].wall
        lines += [f"End to end (`ingest` + `decompose`, two whole processes): {e2e:.2f} s.", ""]
    if "count" in r:
        d = res.data("count")
        lines += [
            f"Chunk reads of one decompose: {d['chunk_reads']:,} reads of `weights` chunks "
            f"for {d['expected_reads']:,} chunks ({d['epochs']} rows x "
            f"{d['chunks_per_row']} chunks), {d['distinct_chunks']:,} distinct, at most "
            f"{d['max_reads_per_chunk']} per chunk; {d['pool_reads']} reads of the sample pool.",
            "",
        ]
    return lines


@dataclass
class Check:
    target: str
    size: str
    measured: str
    limit: str
    ok: bool | None  # None: not measured
    at_target_size: bool = True
    margin: str = ""


def _margin(value: float, limit: float, ok: bool) -> str:
    if limit <= 0:
        return ""
    if ok:
        return f"{(1 - value / limit) * 100:.0f}% headroom"
    return f"missed by {(value / limit - 1) * 100:.0f}%"


def checks(results: list[SizeResult]) -> list[Check]:
    done = [r for r in results if not r.skipped and not r.error]
    out: list[Check] = []

    # decompose wall <= 1.0x / 1.5x a plain zarr-python read, whole processes (issue 14)
    target = "CPU `decompose` / plain zarr-python read (whole processes)"
    for r in done:
        fwall, d = floor_wall(r), r.data("decompose_cpu")
        if not fwall or not d:
            continue
        limit = RATIO_LIMITS.get((r.n, r.t), RATIO_LIMIT)
        secs = r.runs["decompose_cpu"].wall
        ratio = secs / fwall
        ok = ratio <= limit
        out.append(
            Check(
                target,
                r.label,
                f"{ratio:.2f}x ({secs:.2f} s vs {fwall:.2f} s)",
                f"{limit:g}x",
                ok,
                (r.n, r.t) in RATIO_SIZES,
                _margin(ratio, limit, ok),
            )
        )
    _missing(out, target, RATIO_SIZES, done)

    # ingest >= 0.8 GB/s of trajectory at (16M, 50), CLI wall
    target = f"`ingest` >= {INGEST_GBS:g} GB/s of trajectory (CLI wall)"
    for r in done:
        if "ingest" not in r.runs:
            continue
        gbs = r.weights_bytes / r.runs["ingest"].wall / 1e9
        ok = gbs >= INGEST_GBS
        out.append(
            Check(target, r.label, f"{gbs:.2f} GB/s", f"{INGEST_GBS:g} GB/s", ok,
                  (r.n, r.t) in INGEST_SIZES, _margin(INGEST_GBS, gbs, ok))
        )
    _missing(out, target, INGEST_SIZES, done)

    # end to end: ingest + decompose <= 2.0 s at (4M, 50)
    target = f"`ingest` + `decompose` <= {E2E_LIMIT:g} s (whole processes)"
    for r in done:
        if "ingest" not in r.runs or "decompose_cpu" not in r.runs:
            continue
        e2e = r.runs["ingest"].wall + r.runs["decompose_cpu"].wall
        ok = e2e <= E2E_LIMIT
        out.append(
            Check(target, r.label, f"{e2e:.2f} s", f"{E2E_LIMIT:g} s", ok,
                  (r.n, r.t) in E2E_SIZES, _margin(e2e, E2E_LIMIT, ok))
        )
    _missing(out, target, E2E_SIZES, done)

    # kernel: steps 5-6 >= 2.5 GB/s on the CPU; >= 40 GB/s streamed on a GPU
    for key, limit, dev in (("cpu_pass", KERNEL_GBS, "cpu"), ("cuda_pass", CUDA_PASS_GBS, "cuda")):
        for r in done:
            d = r.data(key)
            if not d or "error" in d:
                continue
            gbs = d["bytes"] / d["seconds"] / 1e9
            ok = gbs >= limit
            out.append(
                Check(f"steps 5-6 alone on {dev} >= {limit:g} GB/s", r.label, f"{gbs:.2f} GB/s",
                      f"{limit:g} GB/s", ok, r.n >= 4_000_000, _margin(limit, gbs, ok))
            )

    # GPU: decompose --device cuda of (86M, 100) <= 1.5x the zarrs read
    for r in done:
        fwall, d = floor_wall(r, "read_zarrs"), r.data("decompose_cuda")
        if not fwall or not d:
            continue
        secs = r.runs["decompose_cuda"].wall
        ratio = secs / fwall
        ok = ratio <= CUDA_RATIO
        out.append(
            Check("CUDA `decompose` / plain zarrs read (whole processes)", r.label,
                  f"{ratio:.2f}x ({secs:.2f} s vs {fwall:.2f} s)", f"{CUDA_RATIO:g}x", ok,
                  (r.n, r.t) == BIG, _margin(ratio, CUDA_RATIO, ok))
        )

    # decompose and reconstruct peak RSS <= 1.5 GiB
    for key, cmd in (("decompose_cpu", "decompose"), ("reconstruct", "reconstruct")):
        target = f"`{cmd}` peak RSS <= {RSS_LIMIT / GiB:g} GiB"
        for r in done:
            rss = r.runs[key].rss if key in r.runs else None
            if rss is None:
                continue
            ok = rss <= RSS_LIMIT
            out.append(
                Check(
                    target,
                    r.label,
                    _mib(rss),
                    _mib(RSS_LIMIT),
                    ok,
                    (r.n, r.t) in RSS_SIZES,
                    _margin(rss, RSS_LIMIT, ok),
                )
            )
        _missing(out, target, RSS_SIZES, done)

    # not growing with T
    for r in done:
        for key, cmd in (("decompose", "decompose"), ("reconstruct", "reconstruct")):
            k1 = "decompose_cpu" if key == "decompose" else "reconstruct"
            k2 = f"{key}_2t"
            if k1 not in r.runs or k2 not in r.runs:
                continue
            a, b = r.runs[k1].rss, r.runs[k2].rss
            if not a or not b:
                continue
            limit = a * (1 + T_GROWTH_LIMIT)
            ok = b <= limit
            out.append(
                Check(
                    f"`{cmd}` peak RSS not growing with T (T -> 2T: <= +{T_GROWTH_LIMIT:.0%})",
                    f"{human_n(r.n)} x {r.t} -> {2 * r.t}",
                    f"{_mib(a)} -> {_mib(b)} ({(b / a - 1) * 100:+.0f}%, "
                    f"{(b - a) / MiB / r.t:+.1f} MiB per added epoch; the whole "
                    f"matrix would add {r.n * 4 / MiB:.1f})",
                    _mib(int(limit)),
                    ok,
                    True,
                    _margin(b, limit, ok),
                )
            )

    # ingest RSS budget
    for r in done:
        for key in ("ingest", "ingest_more"):
            if key not in r.runs or r.runs[key].rss is None:
                continue
            rss, budget = r.runs[key].rss or 0, ingest_budget(r.n)
            ok = rss <= budget
            out.append(
                Check(
                    "`ingest` peak RSS <= 2 checkpoints + 256 MiB"
                    + (" (append)" if key == "ingest_more" else ""),
                    r.label,
                    _mib(rss),
                    _mib(budget),
                    ok,
                    True,
                    _margin(rss, budget, ok),
                )
            )

    # reads weights at most once
    for r in done:
        d = r.data("count")
        if not d:
            continue
        ok = d["max_reads_per_chunk"] <= 1 and d["chunk_reads"] <= d["expected_reads"]
        out.append(
            Check(
                "`decompose` reads `weights` at most once",
                r.label,
                f"{d['chunk_reads']:,} chunk reads, max {d['max_reads_per_chunk']} per chunk",
                f"{d['expected_reads']:,} reads, 1 per chunk",
                ok,
                True,
                "" if ok else f"{d['chunk_reads'] / max(d['expected_reads'], 1):.2f}x the chunks",
            )
        )
    return out


def _missing(out: list[Check], target: str, sizes: set[tuple[int, int]], done: list) -> None:
    have = {(r.n, r.t) for r in done}
    for n, t in sorted(sizes - have):
        out.append(Check(target, size_label(n, t), "not measured in this run", "", None))


def render(machine: dict[str, str], results: list[SizeResult], argv: list[str], cuda: bool) -> str:
    lines = [
        "## Benchmarks",
        "",
        f"Rerun: `{shlex.join(['python', 'scripts/bench.py', *argv])}`",
        "",
        "### Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine.items()),
        "",
        "### Method",
        "",
        f"- Planted trajectories: `w_i(t) = a_i p_m(i)(t) + b_i + {NOISE:g} e`, {MODES} "
        "random-walk profiles `p_m` (unit std), `a`, `b`, `e` standard normal, modes uniform; "
        "four float32 tensors of 55/25/15/5% of N; one safetensors file per epoch.",
        "- Every command runs in its own process (`python -m cmdtool ...`); wall time is "
        "measured around the process (includes Python, torch and zarr start-up, "
        "about 1-3 s); *in-process* is the command's own `seconds` (from `--json`), or the "
        "timed loop of the plain read. Peak RSS is the process's maximum resident set.",
        "- Floors: a plain zarr-python read and a plain zarrs read of `weights`, each a "
        "process of its own importing only zarr and numpy (`zarr.open_array`, every "
        "chunk-column block over all rows, the pattern decompose streams), before decompose; "
        "and cmdtool's checked `read_block` (`TrajectoryStore.open`). The targets compare "
        "whole-process wall times (decompose's CLI wall against the read process's wall); "
        "in-process ratios are shown beside them.",
        "- All reads are warm: the store was just written and the page cache is not dropped "
        "(that needs root); the checkpoints are deleted after ingest so that the cache holds "
        "the store. Compare warm with warm.",
        f"- decompose: `--modes {MODES} --samples {SAMPLES}` (defaults), all epochs.",
        "- Throughput: GB = 1e9 bytes; memory: MiB/GiB = 2^20/2^30 bytes.",
        "- CUDA: " + ("measured." if cuda else "no CUDA device: the cuda rows are absent."),
        "",
        "### Results",
        "",
    ]
    for res in results:
        lines += render_size(res)
    lines += [
        "### Targets",
        "",
        "Sizes in parentheses are not the size a target is set for: shown for information.",
        "",
        "| target | size | measured | limit | result | margin |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in checks(results):
        if c.ok is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if c.ok else "**FAIL**"
            if not c.at_target_size:
                verdict = f"({verdict})"
        size = c.size if c.at_target_size or c.ok is None else f"({c.size})"
        lines.append(f"| {c.target} | {size} | {c.measured} | {c.limit} | {verdict} | {c.margin} |")
    lines.append("")
    return "\n".join(lines)


def write_out(path: Path, text: str) -> None:
    head = ""
    if path.exists():
        old = path.read_text()
        if MARKER in old:
            head = old.split(MARKER, 1)[0]
    path.write_text(head + MARKER + "\n\n" + text)


# -------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        help="comma-separated NxT (4000000x50, 11.2Mx150); default 1Mx50,4Mx50,11.2Mx150 "
        "(86Mx100 only when named here)",
    )
    p.add_argument(
        "--workdir", type=Path, help="where checkpoints and stores go (default: a temp dir)"
    )
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="Markdown output")
    p.add_argument("--keep", action="store_true", help="keep checkpoints and stores")
    p.add_argument(
        "--quick", action="store_true", help=f"a smoke run at {QUICK_SIZES} (under a minute)"
    )
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        print("CUDA rows skipped: torch.cuda.is_available() is False", file=sys.stderr)
    if args.sizes:
        sizes = parse_sizes(args.sizes)
    else:
        sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="cmdtool-bench-", dir=args.workdir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="cmdtool-bench-"))
    machine = describe_machine(workdir)
    base = run_measured([sys.executable, "-c", BASELINE], "start-up baseline")
    machine["start-up baseline"] = (
        f"{base.wall:.2f} s, {_mib(base.rss)} peak RSS (`python -c '{BASELINE}'`)"
    )
    results = [SizeResult(n, t) for n, t in sizes]
    if not args.sizes and not args.quick:
        results.append(
            SizeResult(
                *BIG,
                skipped=f"skipped: opt-in, run `python scripts/bench.py --sizes "
                f"{BIG[0]}x{BIG[1]}` (needs {disk_needed(*BIG, False) / 1e9:.0f} GB disk, "
                f"{ram_needed(*BIG) / GiB:.0f} GiB RAM)",
            )
        )
    runnable = [r for r in results if not r.skipped]
    if runnable:
        min(runnable, key=lambda r: (r.n, r.t)).smallest = True
    t0 = time.perf_counter()
    try:
        for res in results:
            if res.skipped:
                continue
            res.skipped = check_fits(res.n, res.t, workdir, res.smallest)
            if res.skipped:
                print(f"[{res.label}] {res.skipped}", file=sys.stderr, flush=True)
                continue
            root = workdir / f"{res.n}x{res.t}"
            try:
                bench_size(res, root, cuda, args.keep)
            except BenchError as exc:
                res.error = str(exc)
                print(f"[{res.label}] {exc}", file=sys.stderr, flush=True)
            finally:
                if not args.keep:
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}", file=sys.stderr)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    machine["load average at end"] = ", ".join(f"{x:.2f}" for x in load)
    machine["bench wall time"] = f"{time.perf_counter() - t0:.0f} s"
    text = render(machine, results, argv, cuda)
    write_out(args.out, text)
    sys.stdout.write(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
