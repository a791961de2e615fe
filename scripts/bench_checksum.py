"""The cost of format v2's integrity checks (issue 11), on the benchmark's planted runs.

For each size (default (1M, 50) and (4M, 50)) it writes the planted checkpoints of
``scripts/bench.py`` once, then, with the crc32c codec on (format v2, the default) and
off (``cmdtool.store.integrity.CHECKSUM = False``: a format-v1 store, no checksum, no
missing-chunk check), runs in child processes:

- ``cmdtool ingest`` (wall time of the process and the in-process ``seconds``);
- ``cmdtool decompose --device cpu`` (wall and in-process ``seconds``);
- the read of ``weights`` in decompose's column-block pattern, through cmdtool
  (``read_block``: zarr's crc32c plus cmdtool's chunk checks) and with plain zarr;
- ``cmdtool verify`` on the v2 store.

Each figure is the best of ``--repeat`` runs, the two variants alternating (the machine
is shared). The table is
printed as Markdown; paste it into BENCHMARKS.md, "Checksums (issue 11)".

    python scripts/bench_checksum.py                     # (1M, 50) and (4M, 50)
    python scripts/bench_checksum.py --sizes 1Mx50 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import bench  # noqa: E402  (scripts/bench.py: planted data and size parsing)

READ_ROUNDS = 5

CHILD = """
import json, sys, time
import numpy as np
import cmdtool.store.integrity as integrity
integrity.CHECKSUM = {checksum}
if sys.argv[1] == "read":  # interleaved reads of the given stores, best of --rounds
    import zarr
    from cmdtool.store import TrajectoryStore
    rounds, stores = int(sys.argv[2]), sys.argv[3:]
    best = {{}}
    for _ in range(rounds):
        for i, path in enumerate(stores):
            for how in ("cmdtool", "plain zarr"):
                st = TrajectoryStore.open(path)
                rows = np.arange(st.n_epochs, dtype=np.int64)
                arr = zarr.open_array(path + "/weights", mode="r")
                t0, c0 = time.perf_counter(), time.process_time()
                for a, b in st.column_blocks():
                    if how == "cmdtool":
                        st.read_block(rows, a, b)
                    else:
                        np.asarray(arr[: st.n_epochs, a:b])
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                for key, v in ((f"{{i}} {{how}}", wall), (f"{{i}} {{how}} cpu", cpu)):
                    best[key] = min(best.get(key, 1e9), v)
    print(json.dumps(best))
else:
    from cmdtool.cli import app
    app(sys.argv[1:], prog_name="cmdtool")
"""


def run(checksum: bool, *args: str | Path) -> tuple[float, dict[str, Any]]:
    """One child: (wall seconds, its JSON output, with ``cpu``: the child's user + system
    CPU seconds, start-up included; less disturbed by other load than wall time)."""
    code = CHILD.format(checksum=checksum)
    t0 = time.perf_counter()
    u0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    u1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime)
    if r.returncode != 0:
        raise SystemExit(f"{args}: exit {r.returncode}: {r.stderr[-2000:]}")
    out = r.stdout.strip()
    try:
        data = json.loads(out[out.index("{") :]) if "{" in out else {}
    except ValueError:
        data = {}
    data["cpu"] = cpu
    return wall, data


def measure(n: int, t: int, root: Path, repeat: int) -> dict[str, Any]:
    src = root / "ckpt"
    bench.generate(src, n, range(1, t + 1), bench.profiles(t))
    res: dict[str, Any] = {"n": n, "t": t, "none": {}, "crc32c": {}}

    def keep(key: str, name: str, value: float) -> None:
        res[key][name] = min(res[key].get(name, float("inf")), value)

    stores = {key: root / f"store-{key}" for key in ("none", "crc32c")}
    for _ in range(repeat):  # the two variants alternate, so that load drifts hit both
        for key, store in stores.items():
            shutil.rmtree(store, ignore_errors=True)
            wall, data = run(key != "none", "ingest", src, store, "--json")
            keep(key, "ingest_wall", wall)
            keep(key, "ingest_s", float(data["seconds"]))
            keep(key, "ingest_cpu", float(data["cpu"]))
    for _ in range(repeat):
        for key, store in stores.items():
            wall, data = run(key != "none", "decompose", store, "--device", "cpu", "--json")
            keep(key, "decompose_wall", wall)
            keep(key, "decompose_s", float(data["seconds"]))
            keep(key, "decompose_cpu", float(data["cpu"]))
    _, data = run(True, "read", str(READ_ROUNDS), stores["none"], stores["crc32c"])
    for i, key in enumerate(("none", "crc32c")):
        res[key]["read_s"] = data[f"{i} cmdtool"]
        res[key]["read_cpu"] = data[f"{i} cmdtool cpu"]
        res[key]["plain_read_s"] = data[f"{i} plain zarr"]
        res[key]["plain_read_cpu"] = data[f"{i} plain zarr cpu"]
    wall, data = run(True, "verify", stores["crc32c"], "--json")
    res["crc32c"]["verify_wall"] = wall
    res["crc32c"]["verify_s"] = float(data["seconds"])
    for key, store in stores.items():
        res[key]["disk_mb"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6
    shutil.rmtree(root, ignore_errors=True)
    return res


def render(results: list[dict[str, Any]], repeat: int) -> str:
    lines = [
        f"Best of {repeat} runs (reads: of {READ_ROUNDS}, interleaved), the two variants "
        "alternating. Each cell: wall seconds as the command reports them / CPU seconds "
        "(user + system, of the whole process for ingest and decompose, start-up "
        "included; of the read loop for reads). `plain zarr` reads the same store with "
        "zarr alone (its crc32c codec, none of cmdtool's chunk checks).",
        "",
        "| size | checksum | ingest | decompose (cpu) | read (cmdtool) | read (plain zarr) "
        "| verify | disk |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        label = f"({bench.human_n(r['n'])}, {r['t']})"
        for key in ("none", "crc32c"):
            b = r[key]
            verify = f"{b['verify_s']:.2f}" if "verify_s" in b else ""
            lines.append(
                f"| {label} | {key} | {b['ingest_s']:.2f} / {b['ingest_cpu']:.2f} | "
                f"{b['decompose_s']:.2f} / {b['decompose_cpu']:.2f} | "
                f"{b['read_s']:.3f} / {b['read_cpu']:.3f} | "
                f"{b['plain_read_s']:.3f} / {b['plain_read_cpu']:.3f} | {verify} | "
                f"{b['disk_mb']:.1f} MB |"
            )
        a, c = r["none"], r["crc32c"]

        def pct(k: str, a: dict[str, float] = a, c: dict[str, float] = c) -> str:
            return f"{100 * (c[k] / a[k] - 1):+.0f}%"

        lines.append(
            f"| {label} | crc32c vs none | {pct('ingest_s')} / {pct('ingest_cpu')} | "
            f"{pct('decompose_s')} / {pct('decompose_cpu')} | "
            f"{pct('read_s')} / {pct('read_cpu')} | "
            f"{pct('plain_read_s')} / {pct('plain_read_cpu')} | | {pct('disk_mb')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1Mx50,4Mx50", help="NxT list, as scripts/bench.py")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None)
    a = p.parse_args(argv)
    results = []
    for n, t in bench.parse_sizes(a.sizes):
        root = Path(tempfile.mkdtemp(prefix="cmdtool-crc-", dir=a.workdir))
        results.append(measure(n, t, root, a.repeat))
        print(json.dumps(results[-1]), file=sys.stderr)
    print(render(results, a.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
