"""Run a cmdtool command in a process of its own with a fault at the k-th zarr store write.

    python tests/fault_runner.py MODE K CHUNK -- cmdtool-args...

MODE ``kill``: SIGKILL this process right after the k-th write (a crash mid-ingest);
``plain``: no fault, the console script itself (K and CHUNK ignored); ``python``: no
fault, ``python -c ARGS[0] ARGS[1:]`` (a test's own code as ``__main__``; K and CHUNK
ignored); ``count``: no fault, print the number of writes on stderr at exit; ``slow``: no
fault, sleep K milliseconds after every write (a slow disk: readers can watch each step).
CHUNK sets the store's chunk width for stores created by this run (0 keeps the default),
so that small test stores have rows of several chunks. Real zarr, real files: only the
process dies.

    python tests/fault_runner.py --serve

A fork server ("zygote") for tests that run many such commands (one per kill point):
it imports cmdtool, torch, zarr, numpy and matplotlib (Agg) once, runs no torch op and no
zarr I/O (so no OpenMP pool and no zarr event-loop thread exist when it forks), then for
each request line ``{"mode", "k", "chunk", "args", "cwd", "env", "out", "err"[, "umask",
"fsize"]}`` (``fsize``: RLIMIT_FSIZE in bytes, SIGXFSZ ignored, so a longer write is
EFBIG) on stdin it ``os.fork()``s a child that does exactly what the command line above
does (in ``cwd`` with ``env`` as ``os.environ``; stdout and stderr into the files ``out``
and ``err``, stdin from /dev/null; it dies by a real SIGKILL at its k-th write, or ends by
:func:`_exit_child`), answers one line ``{"pid": P}``, waits for it and answers
``{"returncode": R}`` (R as :attr:`subprocess.Popen.returncode`: -9 for a SIGKILL). Each
child starts from the server's untouched import state, as a fresh process would; only
the ~1.5-3 s of interpreter start and imports per command are saved, and the ~1 s of
tearing all those modules down at exit (:func:`_exit_child`). :class:`ForkServer` is the
tests' client.

Import-time state is the server's, not the command's: what a module reads from the
environment or the terminal when it is imported (thread counts, zarr config, a rich
console's colours) is the server's (started with stderr to a file, not a terminal, as a
``capture_output`` process). A test about such state runs a fresh interpreter.
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_with_fault(mode: str, k: int, chunk: int, args: list[str]) -> None:
    """Arm the fault of ``mode`` at write ``k`` and run ``cmdtool ARGS`` (raises SystemExit).

    MODE ``plain`` arms nothing: it is the console script's own ``main()`` with ARGS (what
    :func:`tests.conftest.run_cli` runs)."""
    if mode == "plain":
        from cmdtool.cli import main

        sys.argv = ["cmdtool", *args]
        main()
        return
    if mode == "python":  # as `python -c CODE ARGS...`
        sys.argv = ["-c", *args[1:]]
        exec(compile(args[0], "<string>", "exec"), {"__name__": "__main__"})
        return
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


def _exit_child(run: Any) -> None:
    """Run ``run()`` as a child's whole program and end the child with ``os._exit``.

    The exit status is the interpreter's (``SystemExit``'s code: None 0, an int as is,
    anything else printed on stderr and 1; an uncaught exception's traceback on stderr and
    1), after the interpreter's own exit steps in its order (join non-daemon threads,
    ``atexit`` handlers and ``weakref.finalize``, collect garbage, flush stdout and stderr:
    a failing flush is 120); only the teardown of every imported module is skipped."""
    code: int = 0
    try:
        run()
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code & 0xFF
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        gc.collect()
    except BaseException:
        traceback.print_exc()
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = 120
    os._exit(code)


def _child(req: dict[str, Any]) -> None:
    """A forked child's set-up for request ``req``, then the command (never returns)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
    os.dup2(os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
    os.chdir(req["cwd"])
    if req.get("umask") is not None:
        os.umask(int(req["umask"]))
    if req.get("fsize") is not None:  # as a preexec_fn before exec would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(req["fsize"]),) * 2)
    if "env" in req:  # the caller's environment now, as subprocess.run passes it
        os.environ.clear()
        os.environ.update(req["env"])
    sys.argv = [str(Path(__file__)), req["mode"], str(req["k"]), str(req["chunk"])]
    sys.argv += ["--", *req["args"]]
    what = (req["mode"], int(req["k"]), int(req["chunk"]), list(req["args"]))
    _exit_child(functools.partial(run_with_fault, *what))


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

    try:  # the report's figures (cmdtool.report.figures selects Agg the same way)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except ImportError:
        pass
    gc.collect()
    gc.freeze()  # children's collections leave the imported objects (and their pages) alone
    replies = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        replies.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: becomes the command, never returns to the loop
            try:
                _child(req)
            finally:  # a failure setting the child up: never a second server loop
                traceback.print_exc()
                os._exit(1)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


class ForkServer:
    """Client of ``fault_runner.py --serve``: :meth:`run` is ``subprocess.run`` of the
    command line form, in a child forked from one long-lived, already imported process.
    One command at a time: a second thread's :meth:`run` during one raises (commands
    meant to run side by side are fresh processes)."""

    def __init__(self, scratch: Path, timeout: float = 300) -> None:
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.n = 0
        self._buf = b""
        self._busy = threading.Lock()

    def _start(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            # stderr to a file: the server's import-time view of stderr is not a terminal,
            # as for a fresh process run with capture_output
            with open(self.scratch / "server.err", "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, str(HERE / "fault_runner.py"), "--serve"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    bufsize=0,
                    cwd=HERE.parent,
                )
            self._buf = b""
        return self.proc

    def _reply(self, timeout: float | None) -> dict[str, Any] | None:
        """The server's next reply line; None when none came within ``timeout`` s."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                log = (self.scratch / "server.err").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the fork server died (exit {self.proc.wait()}): {log}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def run(
        self,
        mode: str,
        k: int,
        chunk: int,
        *args: str | Path,
        cwd: Path,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        umask: int | None = None,
        fsize: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``subprocess.run`` of the command line form in ``cwd`` with ``env`` (default:
        this process's environment now) and ``umask`` (default: the server's, which is this
        process's at its start); ``fsize``: the largest file it may write (bytes, a write
        past it fails with EFBIG); ``timeout`` defaults to the server's (past it the
        child is killed, as ``subprocess.run`` kills its process, and TimeoutExpired
        raised; the server lives on)."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("ForkServer.run: one command at a time (use a fresh process)")
        try:
            return self._run(
                mode, k, chunk, *args, cwd=cwd, env=env, timeout=timeout, umask=umask, fsize=fsize
            )
        finally:
            self._busy.release()

    def _run(
        self,
        mode: str,
        k: int,
        chunk: int,
        *args: str | Path,
        cwd: Path,
        env: dict[str, str] | None,
        timeout: float | None,
        umask: int | None,
        fsize: int | None,
    ) -> subprocess.CompletedProcess[str]:
        timeout = self.timeout if timeout is None else timeout
        proc = self._start()
        assert proc.stdin is not None
        self.n += 1
        out, err = self.scratch / f"{self.n}.out", self.scratch / f"{self.n}.err"
        req: dict[str, Any] = {"mode": mode, "k": k, "chunk": chunk, "cwd": str(cwd)}
        env = dict(os.environ) if env is None else dict(env)
        req.update(args=[str(a) for a in args], out=str(out), err=str(err), env=env)
        req.update(umask=umask, fsize=fsize)
        proc.stdin.write((json.dumps(req) + "\n").encode())
        proc.stdin.flush()
        started = time.monotonic()
        first = self._reply(60)
        if first is None:  # the server itself is stuck
            self.close()
            raise RuntimeError("the fork server did not start the command within 60 s")
        pid = int(first["pid"])
        done = self._reply(max(0.0, timeout - (time.monotonic() - started)))
        argv = ["fault_runner", mode, str(k), str(chunk), "--", *map(str, args)]
        if done is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reply(60)  # the server reaps it and answers
            raise subprocess.TimeoutExpired(argv, timeout)
        code = int(done["returncode"])
        stdout, stderr = out.read_text(), err.read_text()
        out.unlink()
        err.unlink()
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
