"""Shared helpers: planted trajectories written as real checkpoint files."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.s3server import s3_bucket, s3_module_env, s3_server  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_checkpoints"

# name, shape, dtype of the planted model's tensors (floating ones are modeled)
LAYOUT: list[tuple[str, tuple[int, ...], torch.dtype]] = [
    ("conv.weight", (16, 4, 3, 3), torch.float32),
    ("conv.bias", (16,), torch.float32),
    ("bn.weight", (16,), torch.float32),
    ("bn.running_mean", (16,), torch.float32),
    ("bn.num_batches_tracked", (), torch.int64),
    ("fc.weight", (40, 64), torch.float32),
    ("fc.bias", (40,), torch.float32),
]


def n_modeled(layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]] = LAYOUT) -> int:
    return sum(int(np.prod(s)) for _, s, dt in layout if dt.is_floating_point)


def planted(n: int, t: int, m: int, *, seed: int = 0, noise: float = 0.01):
    """Trajectories from m known random-walk profiles: w_i = a_i p_{g(i)} + b_i + noise.

    Returns (W float64 (n, t), groups (n,), profiles (m, t)).
    """
    rng = np.random.default_rng(seed)
    profiles = np.cumsum(rng.normal(size=(m, t)), axis=1)
    groups = rng.integers(0, m, size=n)
    a = rng.uniform(0.5, 2.0, size=n) * rng.choice([-1.0, 1.0], size=n)
    b = rng.normal(size=n)
    w = a[:, None] * profiles[groups] + b[:, None] + noise * rng.normal(size=(n, t))
    return w, groups, profiles


def state_dicts(
    w: np.ndarray,
    layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]] = LAYOUT,
    prefix: str = "",
) -> list[dict[str, torch.Tensor]]:
    """One state dict per epoch (column of w), tensors filled from w in layout order."""
    out = []
    for t in range(w.shape[1]):
        col = 0
        sd: dict[str, torch.Tensor] = {}
        for name, shape, dt in layout:
            if dt.is_floating_point:
                size = int(np.prod(shape))
                sd[prefix + name] = torch.tensor(w[col : col + size, t]).reshape(shape).to(dt)
                col += size
            else:
                sd[prefix + name] = torch.full(shape, 100 * (t + 1), dtype=dt)
        out.append(sd)
    return out


def write_run(
    folder: Path,
    sds: Sequence[dict[str, torch.Tensor]],
    *,
    name: Callable[[int], str] = lambda e: f"epoch_{e}.safetensors",
    labels: Sequence[int] | None = None,
) -> list[Path]:
    """Write each state dict as ``folder/name(label)``: safetensors or torch by suffix."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sd in enumerate(sds):
        label = labels[i] if labels is not None else i + 1
        p = folder / name(label)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        elif p.suffix == ".ckpt":
            torch.save({"epoch": label, "global_step": 10 * label, "state_dict": sd}, p)
        else:
            torch.save(sd, p)
        paths.append(p)
    return paths


def to_store_order(w: np.ndarray, params: Sequence[dict]) -> np.ndarray:
    """Rows of w (LAYOUT order) rearranged into a store's column order.

    ``params`` is the store's documented ``params`` list (name, shape, offset); safetensors
    files list tensors sorted by name, so the store's order is not LAYOUT's.
    """
    start = {}
    col = 0
    for name, shape, dt in LAYOUT:
        if dt.is_floating_point:
            start[name] = col
            col += int(np.prod(shape))
    pieces = []
    for p in sorted(params, key=lambda d: d["offset"]):
        size = int(np.prod(p["shape"]))
        s0 = start[p["name"].split("module.")[-1]]
        pieces.append(w[s0 : s0 + size])
    return np.concatenate(pieces)


def store_params(store: Path) -> list[dict]:
    """The ``params`` list of a store, read with plain zarr."""
    import zarr

    return list(zarr.open_group(store, mode="r").attrs["cmdtool"]["params"])


_FORK_SERVER: list[Any] = []  # the session's ForkServer, once the fixture below has made it


def run_cli(
    *args: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    umask: int | None = None,
    fsize: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmdtool ARGS`` as a process of its own (wide terminal for one-line errors).

    The process is a child forked from the session's already imported fork server
    (:class:`tests.fault_runner.ForkServer`, mode ``plain``): the console script's own
    ``main()``, its exit code, stdout and stderr, in ``cwd`` with ``env`` (default: this
    environment plus ``COLUMNS=200``) and ``umask`` (default: this process's), files up
    to ``fsize`` bytes (a longer write fails with EFBIG; default: no limit), only
    without the interpreter start, the torch import and the module teardown at exit. What
    modules read from the environment when imported is the server's: a test about that
    (thread counts, zarr config, code planted through PYTHONPATH) or about start-up itself
    uses :func:`run_cli_process`, a freshly started interpreter."""
    env = {**os.environ, "COLUMNS": "200"} if env is None else env
    if not _FORK_SERVER:
        return run_cli_process(*args, cwd=cwd, env=env, timeout=timeout, umask=umask, fsize=fsize)
    if umask is None:  # this process's now, as subprocess.run would leave it
        umask = os.umask(0o022)
        os.umask(umask)
    return _FORK_SERVER[0].run(  # type: ignore[no-any-return]
        "plain", 0, 0, *args, cwd=cwd or Path.cwd(), env=env, timeout=timeout, umask=umask,
        fsize=fsize,
    )  # fmt: skip


def run_cli_process(
    *args: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    umask: int | None = None,
    fsize: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cmdtool ARGS`` as a freshly started interpreter."""
    env = {**os.environ, "COLUMNS": "200"} if env is None else env

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past it is EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))  # type: ignore[arg-type]

    return subprocess.run(
        [sys.executable, "-m", "cmdtool", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
        umask=-1 if umask is None else umask,
        preexec_fn=cap if fsize is not None else None,
    )


def invoke_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``cmdtool ARGS`` run in this process by ``typer.testing.CliRunner`` (no interpreter
    start, no torch import): the same Typer app, error handling and exit codes as
    :func:`run_cli`. An exception escaping the app is written to stderr as the interpreter
    would (its traceback, exit 1), so :func:`one_line_error` checks it the same way."""
    import traceback

    from typer.testing import CliRunner

    from cmdtool.cli import app

    argv = [str(a) for a in args]
    r = CliRunner().invoke(app, argv, env={"COLUMNS": "200"}, prog_name="cmdtool")
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(["cmdtool", *argv], r.exit_code, r.stdout, stderr)


def one_line_error(
    r: subprocess.CompletedProcess[str], code: int, *needles: str, starts: str | None = None
) -> str:
    """Assert exit ``code``, no traceback, and exactly one non-blank line on stderr holding
    every needle (and starting with ``starts`` when given); return that line."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    if starts is not None:
        assert lines[0].startswith(starts), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree_digest(path: Path) -> dict[str, bytes]:
    """Every file under path with its bytes: to check a store is exactly as it was."""
    return {
        str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()
    }


@pytest.fixture
def planted_run(tmp_path: Path):
    """A 12-epoch safetensors run of 3 planted modes; returns (folder, W float64 (N, T), groups)."""
    n = n_modeled()
    w, groups, _ = planted(n, 12, 3, seed=3)
    folder = tmp_path / "run"
    write_run(folder, state_dicts(w))
    return folder, w, groups


@pytest.fixture(scope="session", autouse=True)
def sigint_default():
    """Let the commands the tests start be interrupted by SIGINT (the Ctrl-C tests).

    A shell without job control starts a background job (``pytest ... &``) with SIGINT
    ignored, every process started from it inherits that, and Python installs no
    KeyboardInterrupt handler when SIGINT is ignored at start-up: the Ctrl-C tests then
    wait for a command that never stops. Restoring the handler here makes children start
    with the default disposition however the suite was launched."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session", autouse=True)
def fault_server(tmp_path_factory):
    """``tests/fault_runner.py --serve``: runs commands (fault-armed, or ``plain`` for
    :func:`run_cli`) as forked children of one already imported process
    (:class:`tests.fault_runner.ForkServer`); started at its first command."""
    from tests.fault_runner import ForkServer

    server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    _FORK_SERVER.append(server)
    yield server
    _FORK_SERVER.clear()
    server.close()


@pytest.fixture(scope="session")
def dask_cluster(request: pytest.FixtureRequest):
    """One Dask LocalCluster of 2 worker processes (1 thread each) for the whole session:
    its scheduler address. The workers' environment points at the session's S3 server
    when moto is installed (object-store tests read buckets on the workers); the scheduler
    gives up on a block after it has been running on 2 workers that died
    (allowed_failures=1, default 3)."""
    pytest.importorskip("distributed")
    import logging

    from distributed import LocalCluster

    try:
        worker_env = request.getfixturevalue("s3_server").env()
    except pytest.skip.Exception:  # no moto: Dask tests without object stores still run
        worker_env = {}

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.CRITICAL,
        scheduler_kwargs={"allowed_failures": 1},
        env=worker_env,
    ) as lc:
        yield lc.scheduler_address
