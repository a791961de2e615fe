"""One writer per store: a lock file holding the writer's pid and host.

zarr has no locks, so two processes appending to one store would interleave rows and
overwrite each other's metadata. ``STORE/.cmdtool-lock`` is created with ``O_EXCL``; a
lock whose process is gone (same host, pid not alive) is stale and taken over. The lock
is re-entrant within one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from cmdtool.errors import StoreError

LOCK_NAME = ".cmdtool-lock"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces: fields after the last ')' are fixed
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, started: object) -> bool:
    """Whether the lock's process still runs (a reused pid with another start time does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    return not (isinstance(started, int) and now is not None and now != started)


class StoreLock:
    """Exclusive write lock on the store folder ``root``."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        self.held = False

    def _read(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock, or raise a StoreError naming the process that holds it."""
        if self.held:
            return
        me: dict[str, object] = {
            "pid": os.getpid(),
            "started": _start_time(os.getpid()),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv[:2]),
        }
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._existing_is_ours_or_stale(me):
                    if self.held:
                        return
                    continue
                time.sleep(0.05)  # just created by another process: read it again
                continue
            except OSError as exc:
                raise StoreError(
                    f"cannot lock store {self.path.parent}: {exc.strerror or exc}"
                ) from exc
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise StoreError(
            f"store {self.path.parent} has a lock file {self.path} that cannot be read; "
            "if no cmdtool process writes to this store, remove that file"
        )

    def _existing_is_ours_or_stale(self, me: dict[str, object]) -> bool:
        """True when the existing lock is this process's (then held) or stale (then removed).

        False when it cannot be read yet; raises when another live process holds it.
        """
        owner = self._read()
        if not owner:
            return False
        pid = owner.get("pid")
        same_host = owner.get("host") == me["host"]
        if isinstance(pid, int) and same_host and pid == me["pid"]:
            self.held = True  # re-entrant within one process
            return True
        if isinstance(pid, int) and same_host and not _alive(pid, owner.get("started")):
            # stale: move it aside under a unique name, so only one taker wins the race
            aside = self.path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex}")
            try:
                os.replace(self.path, aside)
            except FileNotFoundError:
                return True
            try:
                moved = json.loads(aside.read_text())
            except (OSError, ValueError):
                moved = {}
            if moved != owner:
                # another process took the stale lock first and we moved its fresh one:
                # put it back (link fails if a third process already locked again)
                with contextlib.suppress(OSError):
                    os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return True
        raise StoreError(
            f"store {self.path.parent} is being written by another cmdtool process "
            f"(pid {pid} on {owner.get('host')}, '{owner.get('command', '')}' since "
            f"{owner.get('since')}); wait for it to finish, or if that process is gone, "
            f"remove {self.path}"
        )

    def moved_to(self, root: Path) -> None:
        """The store folder holding this (held) lock was renamed to ``root``."""
        self.path = root / LOCK_NAME

    def release(self) -> None:
        if self.held:
            owner = self._read()
            if owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


def holder_gone(root: Path) -> bool:
    """True when ``root`` holds a lock file whose process is gone (written on this host,
    pid no longer alive or reused); False when there is none, it cannot be read, or its
    process may still run."""
    owner = StoreLock(root)._read()
    pid = owner.get("pid")
    if not isinstance(pid, int) or owner.get("host") != socket.gethostname():
        return False
    return pid != os.getpid() and not _alive(pid, owner.get("started"))
