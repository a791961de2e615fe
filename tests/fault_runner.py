"""Run a cmdtool command in a process of its own with a fault at the k-th zarr store write.

    python tests/fault_runner.py MODE K CHUNK -- cmdtool-args...

MODE ``kill``: SIGKILL this process right after the k-th write (a crash mid-ingest);
``count``: no fault, print the number of writes on stderr at exit; ``slow``: no fault,
sleep K milliseconds after every write (a slow disk: readers can watch each step). CHUNK
sets the store's chunk width for stores created by this run (0 keeps the default), so
that small test stores have rows of several chunks. Real zarr, real files: only the
process dies.

    python tests/fault_runner.py --serve

A fork server ("zygote") for tests that run many such commands (one per kill point):
it imports cmdtool, torch, zarr and numpy once, runs no torch op and no zarr I/O (so no
OpenMP pool and no zarr event-loop thread exist when it forks), then for each request
line ``{"mode", "k", "chunk", "args", "cwd", "env", "out", "err"}`` on stdin it
``os.fork()``s a child that does exactly what the command line above does (in ``cwd``
with ``env`` as ``os.environ``; stdout and stderr into the files ``out`` and ``err``,
stdin from /dev/null; it ends by the interpreter's normal exit, or dies by a real
SIGKILL at its k-th write), waits for it and answers one line
``{"returncode": R}`` (R as :attr:`subprocess.Popen.returncode`: -9 for a SIGKILL). Each
child starts from the server's untouched import state, as a fresh process would; only
the ~1.5-3 s of interpreter start and imports per command are saved. :class:`ForkServer`
is the tests' client.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_with_fault(mode: str, k: int, chunk: int, args: list[str]) -> None:
    """Arm the fault of ``mode`` at write ``k`` and run ``cmdtool ARGS`` (raises SystemExit)."""
    import zarr.storage

    import cmdtool.store.trajectory
    from cmdtool.cli import app

    if chunk:
        cmdtool.store.trajectory.CHUNK = chunk  # the name create() reads
    writes = 0
    original = zarr.storage.LocalStore.set

    async def counted_set(self, key, value):  # type: ignore[no-untyped-def]
        nonlocal writes
        await original(self, key, value)
        writes += 1
        if mode == "kill" and writes == k:
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "slow":
            time.sleep(k / 1000)

    zarr.storage.LocalStore.set = counted_set  # type: ignore[method-assign]
    if mode == "count":
        atexit.register(lambda: print(f"writes={writes}", file=sys.stderr))
    app(args, prog_name="cmdtool")


def serve() -> None:
    """The fork server's loop (see the module docstring)."""
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401  (imported only: no op runs here, so no thread pool)
    import zarr  # noqa: F401

    import cmdtool.cli
    import cmdtool.decomposition
    import cmdtool.ingestion
    import cmdtool.reconstruction  # noqa: F401

    replies = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        replies.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: becomes the command, never returns to the loop
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
            os.dup2(os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
            os.chdir(req["cwd"])
            if "env" in req:  # the caller's environment now, as subprocess.run passes it
                os.environ.clear()
                os.environ.update(req["env"])
            sys.argv = [str(Path(__file__)), req["mode"], str(req["k"]), str(req["chunk"])]
            sys.argv += ["--", *req["args"]]
            run_with_fault(req["mode"], int(req["k"]), int(req["chunk"]), list(req["args"]))
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


class ForkServer:
    """Client of ``fault_runner.py --serve``: :meth:`run` is ``subprocess.run`` of the
    command line form, in a child forked from one long-lived, already imported process."""

    def __init__(self, scratch: Path, timeout: float = 300) -> None:
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.n = 0

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "fault_runner.py"), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=HERE.parent,
            )
        return self.proc

    def run(
        self, mode: str, k: int, chunk: int, *args: str | Path, cwd: Path
    ) -> subprocess.CompletedProcess[str]:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        self.n += 1
        out, err = self.scratch / f"{self.n}.out", self.scratch / f"{self.n}.err"
        req: dict[str, Any] = {"mode": mode, "k": k, "chunk": chunk, "cwd": str(cwd)}
        req.update(args=[str(a) for a in args], out=str(out), err=str(err), env=dict(os.environ))
        proc.stdin.write(json.dumps(req) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            raise subprocess.TimeoutExpired(["fault_runner", mode, str(k)], self.timeout)
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {proc.wait()})")
        code = json.loads(line)["returncode"]
        stdout, stderr = out.read_text(), err.read_text()
        out.unlink()
        err.unlink()
        argv = ["fault_runner", mode, str(k), str(chunk), "--", *map(str, args)]
        return subprocess.CompletedProcess(argv, code, stdout, stderr)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        run_with_fault(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5:])
