"""Measure zarr write/read throughput of the `weights` layout for several chunk widths.

Writes T rows of N float32 values (planted trajectories plus noise), one row at a time as
`cmdtool ingest` does, then reads them back in column blocks over all rows as
`cmdtool decompose` does, with each codec pipeline installed (zarr-python's own, and
zarrs when it imports). Prints one line per (chunk width, codec, pipeline).

    python scripts/measure_chunks.py --n 4000000 --t 20
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4_000_000)
    p.add_argument("--t", type=int, default=20)
    p.add_argument("--widths", default="65536,262144,1048576,4194304")
    p.add_argument("--codecs", default="none,zstd1", help="none and/or zstd1")
    args = p.parse_args()
    pipelines = {"zarr-python": "zarr.core.codec_pipeline.BatchedCodecPipeline"}
    try:
        import zarrs  # noqa: F401

        pipelines["zarrs"] = "zarrs.ZarrsCodecPipeline"
    except ImportError:
        pass
    n, t = args.n, args.t
    rng = np.random.default_rng(0)
    profile = np.cumsum(rng.normal(size=t)).astype(np.float32)
    a = rng.normal(size=n).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32)
    gb = n * t * 4 / 1e9
    print(f"N={n} T={t} ({gb:.2f} GB)")
    wanted = args.codecs.split(",")
    for codec_name, codecs in (("none", None), ("zstd1", [ZstdCodec(level=1)])):
        if codec_name not in wanted:
            continue
        for width in (int(w) for w in args.widths.split(",")):
            root = Path(tempfile.mkdtemp())
            try:
                arr = zarr.create_array(
                    zarr.storage.LocalStore(root),
                    name="weights",
                    shape=(t, n),
                    chunks=(1, width),
                    dtype="float32",
                    compressors=codecs,
                )
                w = 0.0
                for i in range(t):
                    row = a * profile[i] + b + rng.normal(scale=0.01, size=n).astype(np.float32)
                    t0 = time.perf_counter()
                    arr[i, :] = row
                    w += time.perf_counter() - t0
                reads = {}
                for name, path in pipelines.items():
                    with zarr.config.set({"codec_pipeline.path": path}):
                        arr = zarr.open_array(zarr.storage.LocalStore(root), path="weights")
                        best = float("inf")
                        for _ in range(2):  # warm: the second pass is the figure
                            t0 = time.perf_counter()
                            for j in range(0, n, width):
                                arr[:, j : j + width]
                            best = min(best, time.perf_counter() - t0)
                        reads[name] = gb / best
                size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
                read_txt = ", ".join(f"read {v:.2f} GB/s ({k})" for k, v in reads.items())
                print(
                    f"codec={codec_name:5s} width={width:8d}: write {gb / w:.2f} GB/s "
                    f"(zarr-python), {read_txt}, disk {size / (n * t * 4):.3f} of raw",
                    flush=True,
                )
            finally:
                shutil.rmtree(root)


if __name__ == "__main__":
    main()
