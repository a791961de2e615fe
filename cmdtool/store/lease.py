"""One writer per object-store store: a lease object taken with a conditional write.

An object store has no ``O_EXCL`` file and no process table to tell a dead writer, so
the writer holds ``PREFIX/.cmdtool-lease`` (JSON: ``owner`` token, ``pid``, ``host``,
``command``, ``since``, ``renewed``, ``ttl_s``) instead:

- taken with a put that succeeds only if the object does not exist (``If-None-Match: *``);
- renewed every ``ttl/3`` seconds by a background thread, with a put that succeeds only
  if the object is still the one this writer last wrote (``If-Match: <etag>``); a
  renewal that fails means the lease was taken over: the writer's next commit fails
  (the commit itself is a conditional put of the root ``zarr.json``, see
  ``store/remote.py``);
- expired when the server's ``last_modified`` of the object is more than ``ttl_s`` old:
  a writer that died stops renewing, and the next one takes it over with an ``If-Match``
  put on the etag it read (two takers: one wins, the other is refused);
- released by deleting it (only if it is still ours).

The time to live is :data:`LEASE_TTL_S` (60 s), or ``CMDTOOL_LEASE_TTL`` seconds from
the environment. Readers never look at the lease.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from cmdtool.errors import StoreError
from cmdtool.store.objects import translate

LEASE_NAME = ".cmdtool-lease"
#: Seconds a lease lives without renewal.
LEASE_TTL_S = 60.0
#: One token per process: a second open of the same store in this process re-enters.
_PROCESS_TOKEN = uuid.uuid4().hex


def lease_ttl() -> float:
    """The lease time to live in seconds: ``CMDTOOL_LEASE_TTL`` or :data:`LEASE_TTL_S`."""
    raw = os.environ.get("CMDTOOL_LEASE_TTL")
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
        if value > 0:
            return value
    return LEASE_TTL_S


class ObjectLease:
    """The writer lease of the store at ``url`` (obstore store ``objects``, rooted there).

    ``acquire()`` / ``release()`` as :class:`~cmdtool.store.lock.StoreLock`; ``check()``
    raises when the lease was lost (taken over after it expired).
    """

    def __init__(self, objects: Any, url: str, ttl: float | None = None) -> None:
        self.objects = objects
        self.url = url
        self.ttl = lease_ttl() if ttl is None else ttl
        self.held = False
        self.owned = False  # this handle wrote the lease (a re-entered one did not)
        self.lost = False
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()
        self._since = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def _body(self) -> bytes:
        return json.dumps(
            {
                "owner": _PROCESS_TOKEN,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": " ".join(sys.argv[:2]),
                "since": self._since,
                "renewed": time.time(),  # a new body, so a new etag, at every renewal
                "ttl_s": self.ttl,
            }
        ).encode()

    def _put(self, mode: Any) -> str:
        import obstore

        result = obstore.put(self.objects, LEASE_NAME, self._body(), mode=mode)
        return str(result["e_tag"])

    def _read(self) -> tuple[dict[str, Any], str, dt.datetime] | None:
        """The current lease, its etag and last_modified; None when there is none."""
        import obstore

        try:
            got = obstore.get(self.objects, LEASE_NAME)
            data = bytes(got.bytes())
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                raise translate(exc, self.url) from exc
            return None
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        return (body if isinstance(body, dict) else {}), str(got.meta["e_tag"]), (
            got.meta["last_modified"]
        )

    def acquire(self) -> None:
        """Take the lease, or raise a StoreError naming the URL and the holder."""
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        if self.held:
            return
        for _ in range(5):
            try:
                self._etag = self._put("create")
            except (AlreadyExistsError, PreconditionError):
                pass
            except Exception as exc:
                raise translate(exc, self.url) from exc
            else:
                self._start()
                return
            try:
                current = self._read()
            except Exception as exc:
                raise translate(exc, self.url) from exc
            if current is None:
                continue  # released meanwhile: try again
            body, etag, modified = current
            if body.get("owner") == _PROCESS_TOKEN:
                self.held = True  # re-entrant within one process
                return
            ttl = body.get("ttl_s")
            ttl = float(ttl) if isinstance(ttl, int | float) and ttl > 0 else LEASE_TTL_S
            age = (dt.datetime.now(dt.UTC) - modified).total_seconds()
            if age <= ttl:
                raise StoreError(
                    f"store {self.url} is being written by another cmdtool process "
                    f"(pid {body.get('pid')} on {body.get('host')}, "
                    f"'{body.get('command', '')}' since {body.get('since')}; its lease "
                    f"{LEASE_NAME} expires {max(ttl - age, 0):.0f} s after its last "
                    "renewal); wait for it to finish"
                )
            try:  # expired: take it over, unless another taker was first
                self._etag = self._put({"e_tag": etag})
            except (PreconditionError, AlreadyExistsError):
                continue
            except Exception as exc:
                raise translate(exc, self.url) from exc
            self._start()
            return
        raise StoreError(f"store {self.url}: cannot take the writer lease {LEASE_NAME}")

    def _start(self) -> None:
        self.held = self.owned = True
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._renew_loop, name="cmdtool-lease", daemon=True
        )
        self._thread.start()

    def _renew_loop(self) -> None:
        from obstore.exceptions import PreconditionError

        while not self._stop.wait(self.ttl / 3):
            with self._mutex:
                if not self.owned:
                    return
                try:
                    self._etag = self._put({"e_tag": self._etag})
                except PreconditionError:
                    self.lost = True  # taken over: the next commit is refused
                    return
                except Exception:
                    continue

    def check(self) -> None:
        """Raise a StoreError when this writer's lease was taken over."""
        if self.lost:
            raise StoreError(
                f"store {self.url}: this writer's lease expired and another writer took "
                "it over; nothing more is committed"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        import obstore

        if not self.held:
            return
        self.held = False
        if not self.owned:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._mutex:
            self.owned = False
            with contextlib.suppress(Exception):
                current = self._read()
                if current is not None and current[1] == self._etag and not self.lost:
                    obstore.delete(self.objects, LEASE_NAME)
