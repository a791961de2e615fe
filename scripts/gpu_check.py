"""GPU readiness check of the streamed pass (run by scripts/gpu_check.sh on a GPU machine).

1. ``fit_block`` on CUDA against the CPU on the same blocks (labels, a, b);
2. ``fit_columns`` from unpinned host memory (reused pinned buffers of
   :func:`cmdtool.backends.staging.staging_for`) and from a pinned block;
3. a whole ``CMD(...).fit`` of a generated store with ``device="cuda"`` (the pipelined
   :class:`~cmdtool.backends.local.LocalBackend` pass) against ``device="cpu"``;
4. kernel GB/s on the device (``scripts/bench_kernel.measure``), kernel alone and from
   host memory with the transfers overlapped.

Prints one JSON object; exits 1 when a check fails. Nothing here needs the network.
``python scripts/gpu_check.py --device cpu --small`` is a dry run of the script on the CPU.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv: list[str]) -> int:
    """``--device cpu --small`` runs the same checks on the CPU (a dry run of this script)."""
    import torch

    device = argv[argv.index("--device") + 1] if "--device" in argv else "cuda"
    small = "--small" in argv
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    from bench_kernel import _blocks, measure

    from cmdtool.backends.base import fit_columns
    from cmdtool.method.kernels import References, fit_block

    cuda, cpu = torch.device(device), torch.device("cpu")
    on_cuda = cuda.type == "cuda"
    name = torch.cuda.get_device_name(cuda) if on_cuda else "cpu (dry run)"
    report: dict[str, object] = {"device": name}
    failures: list[str] = []

    # 1. the kernel on both devices
    blocks, ref_traj = _blocks(30_000 if small else 300_000, 50, 10, 1, seed=3)
    x = blocks[0]
    x[:, :100] = 2.5  # constant columns
    on_cpu = fit_block(torch.from_numpy(x.copy()), References.from_trajectories(ref_traj, cpu))
    on_gpu = fit_block(
        torch.from_numpy(x.copy()).to(cuda), References.from_trajectories(ref_traj, cuda)
    )
    agree = float(np.mean(on_cpu.labels == on_gpu.labels))
    da = float(np.abs(on_cpu.a - on_gpu.a).max())
    db = float(np.abs(on_cpu.b - on_gpu.b).max() / np.abs(x).max())
    report["kernel"] = {"labels_agree": agree, "max_da": da, "max_db_rel": db,
                        "constants": int(on_gpu.constant.sum())}
    if agree < 0.9999 or da > 1e-4 or db > 1e-5 or int(on_gpu.constant.sum()) != 100:
        failures.append("kernel: CUDA and CPU disagree")

    # 2. fit_columns from unpinned and pinned host memory
    refs = References.from_trajectories(ref_traj, cuda)
    plain = fit_columns(x.copy(), refs, cuda)[0]
    pinned = torch.empty(x.shape, dtype=torch.float32, pin_memory=on_cuda)
    pinned.numpy()[...] = x
    direct = fit_columns(pinned.numpy(), refs, cuda)[0]
    same = bool(np.array_equal(plain.labels, on_gpu.labels) and np.array_equal(direct.a, on_gpu.a))
    report["fit_columns"] = {"same_as_kernel": same}
    if not same:
        failures.append("fit_columns: staged or pinned input changed the results")

    # 3. a whole fit on the GPU against the CPU
    try:
        report["fit"] = _whole_fit(failures, device, 100_000 if small else 1_500_000)
    except Exception as exc:  # report it and go on to the throughput
        failures.append(f"fit: {type(exc).__name__}: {exc}")

    # 4. throughput
    report["bench_kernel"] = measure(
        n=1 << (16 if small else 22), t=50, m=10, device=device, repeats=5, blocks=2
    )
    report["failures"] = failures
    print(json.dumps(report, indent=1, default=str))
    return 1 if failures else 0


def _whole_fit(failures: list[str], device: str, n: int) -> dict[str, object]:
    import torch
    from safetensors.torch import save_file

    from cmdtool.decomposition import CMD
    from cmdtool.ingestion import ingest

    rng = np.random.default_rng(0)
    t, m = 30, 6
    prof = np.cumsum(rng.normal(size=(m, t)), axis=1).astype(np.float32)
    lab = rng.integers(0, m, n)
    a = rng.normal(size=n).astype(np.float32)
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        for e in range(t):
            w = a * prof[lab, e] + 0.05 * rng.standard_normal(n, dtype=np.float32)
            save_file({"p": torch.from_numpy(w)}, str(run / f"epoch_{e + 1}.safetensors"))
        ingest(run, Path(tmp) / "s.zarr")
        labels, errors = {}, {}
        for dev in ("cpu", device):
            t0 = time.perf_counter()
            model = CMD(m, n_samples=1000, device=dev).fit(Path(tmp) / "s.zarr", name=f"on_{dev}")
            out[f"{dev}_seconds"] = time.perf_counter() - t0
            labels[dev], errors[dev] = model.labels_.copy(), float(model.relative_error_)
    agree = float(np.mean(labels["cpu"] == labels[device]))
    out["labels_agree"] = agree
    out["rel_error"] = [errors["cpu"], errors[device]]
    if agree < 0.9999 or abs(out["rel_error"][0] - out["rel_error"][1]) > 1e-4:  # type: ignore[index]
        failures.append(f"fit: device={device} and device=cpu disagree")
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
