"""Ingest and decompose on a store at s3:// (a local moto server) next to local disk.

Prints a markdown section for BENCHMARKS.md. moto is a Python server on this machine, so
the figures bound the client path (obstore + zarr + cmdtool's protocol), not S3.

    python scripts/bench_objectstore.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small run (about a minute)")
    args = ap.parse_args()
    n, t = (1_000_000, 6) if args.quick else (8_000_000, 12)

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1", AWS_ALLOW_HTTP="true",
    )
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT"))

    from cmdtool.decomposition import CMD
    from cmdtool.ingestion import ingest

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        g = torch.Generator().manual_seed(0)
        base = torch.randn(n, generator=g)
        for e in range(1, t + 1):
            save_file({"w": base * (1 + 0.1 * e)}, str(run / f"epoch_{e}.safetensors"))
        for where, store in (("local disk", str(Path(tmp) / "s.zarr")), ("s3 (moto)", "s3://bench/s")):
            w0, c0 = time.perf_counter(), _cpu()
            ingest(run, store)
            w1, c1 = time.perf_counter(), _cpu()
            CMD(4, n_samples=2000, seed=0).fit(store)
            w2, c2 = time.perf_counter(), _cpu()
            mb = n * t * 4 / 1e6
            rows.append((where, w1 - w0, c1 - c0, mb / (w1 - w0), w2 - w1, c2 - c1, mb / (w2 - w1)))
        source_rows = bench_sources(run, Path(tmp), n, t)
    server.stop()
    print(f"### Object storage (issue 17): N = {n:,}, T = {t}, {n * t * 4 / 1e6:.0f} MB\n")
    print("moto is a Python S3 server on this machine: these figures bound the client path "
          "(obstore, zarr, cmdtool's commit protocol), not S3 itself. Machine loaded "
          "unless said otherwise.\n")
    print("| store | ingest wall s | ingest CPU s | ingest MB/s | decompose wall s "
          "| decompose CPU s | decompose MB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} "
              f"| {r[6]:.1f} |")
    print("\nSOURCE on s3 (checkpoints read by ranged GETs; .pt copied to a temporary file one "
          "at a time), into a local store:\n")
    print("| SOURCE | files | ingest wall s | ingest CPU s | MB/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in source_rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.1f} |")


def bench_sources(run: Path, tmp: Path, n: int, t: int) -> list[tuple]:
    """Ingest the same run from a local folder and from s3://bench/run<kind> (issue 17)."""
    from cmdtool.ingestion import ingest
    from cmdtool.objectstore import ops

    pt = tmp / "run_pt"
    pt.mkdir()
    for f in sorted(run.glob("*.safetensors")):
        from safetensors.torch import load_file

        torch.save(load_file(str(f)), pt / f"{f.stem}.pt")
    rows = []
    mb = n * t * 4 / 1e6
    for kind, folder in (("safetensors", run), (".pt", pt)):
        for f in sorted(folder.iterdir()):
            ops.put(f"s3://bench/run{kind}/{f.name}", f.read_bytes())
        for where, source in (("local disk", folder), ("s3 (moto)", f"s3://bench/run{kind}")):
            w0, c0 = time.perf_counter(), _cpu()
            ingest(source, tmp / f"src-{kind}-{where[:2]}.zarr")
            rows.append((where, kind, time.perf_counter() - w0, _cpu() - c0,
                         mb / (time.perf_counter() - w0)))
    return rows


if __name__ == "__main__":
    main()
