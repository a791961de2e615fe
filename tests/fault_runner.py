"""Run a cmdtool command in this process with a fault at the k-th zarr store write.

    python tests/fault_runner.py MODE K CHUNK -- cmdtool-args...

MODE ``kill``: SIGKILL this process right after the k-th write (a crash mid-ingest);
``count``: no fault, print the number of writes on stderr at exit; ``slow``: no fault,
sleep K milliseconds after every write (a slow disk: readers can watch each step). CHUNK
sets the store's chunk width for stores created by this run (0 keeps the default), so
that small test stores have rows of several chunks. Real zarr, real files: only the
process dies.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time

import zarr.storage

import cmdtool.store.trajectory
from cmdtool.cli import app

mode, k, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = sys.argv[5:]
if chunk:
    cmdtool.store.trajectory.CHUNK = chunk  # the name create() reads
writes = 0
original = zarr.storage.LocalStore.set


async def counted_set(self, key, value):  # type: ignore[no-untyped-def]
    global writes
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
