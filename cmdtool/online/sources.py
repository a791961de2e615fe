"""What ``cmdtool watch`` knows about the files of SOURCE between two polls.

* :class:`Settling`: when each pending file was last seen to change and what its format
  check said, so that a file is ingested only once it is complete *and* has not changed
  for the settle time;
* :class:`Ingested`: the fingerprint (size, mtime, sha256) an epoch was ingested with,
  to notice when its file changes afterwards, or reappears under another name.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cmdtool.checkpoints import CheckpointEntry
from cmdtool.checkpoints.complete import FileCheck, Signature, check_file, signature_of
from cmdtool.ingestion.ingest import fingerprint

#: ``ready``: complete and unchanged for the settle time; ``settling``: complete and
#: unchanged since the previous poll, not yet for the settle time; ``changing``: complete
#: but changed since the previous poll; ``incomplete``: its format says it is not whole
#: (or it cannot be read).
Readiness = Literal["ready", "settling", "changing", "incomplete"]
_ORDER: dict[Readiness, int] = {"ready": 0, "settling": 1, "changing": 2, "incomplete": 3}


class Settling:
    """Completeness and settle time of the files of pending checkpoints.

    Only :func:`os.stat` runs on every poll; a file's header is read (:func:`check_file`)
    only when its stat changed since the last look.

    Parameters
    ----------
    settle : float
        Seconds a complete file must stay unchanged (size, mtime, inode) before it is
        ingested; 0 ingests it at the first look that finds it complete.
    """

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._since: dict[Path, tuple[Signature, float]] = {}
        self._checks: dict[Path, FileCheck] = {}
        self.first_seen: dict[Path, float] = {}

    def state(self, entry: CheckpointEntry, now: float | None = None) -> Readiness:
        """Where ``entry`` stands now (the least ready of its files)."""
        now = time.monotonic() if now is None else now
        worst: Readiness = "ready"
        for f in entry.files:
            this = self._state(f, now)
            if _ORDER[this] > _ORDER[worst]:
                worst = this
        return worst

    def _state(self, f: Path, now: float) -> Readiness:
        try:
            sig = signature_of(os.stat(f))
            check = self._checks.get(f)
            if check is None or check.signature != sig:
                check = self._checks[f] = check_file(f)
        except OSError:  # removed or replaced meanwhile: look again next poll
            return "incomplete"
        self.first_seen.setdefault(f, now)
        seen = self._since.get(f)
        changed = seen is not None and seen[0] != sig
        if seen is None or changed:
            self._since[f] = (sig, now)
        if check.complete is False or check.signature != sig:
            return "incomplete"
        if changed:
            return "changing"
        if now - self._since[f][1] < self.settle:
            return "settling"
        return "ready"

    def check(self, f: Path) -> FileCheck | None:
        """The last format check of ``f``, if any."""
        return self._checks.get(f)

    def forget(self, entry: CheckpointEntry) -> None:
        """Drop what is known of ``entry``'s files (ingested, or to be looked at afresh)."""
        for f in entry.files:
            self._since.pop(f, None)
            self._checks.pop(f, None)
            self.first_seen.pop(f, None)


@dataclass
class Ingested:
    """An epoch's source as it was ingested (from the store's ``epochs`` records).

    ``warned``: a change was already reported (it is reported once).
    """

    label: int
    source: str
    size: int
    mtime_ns: int
    sha256: str
    warned: bool = False


def entry_stat(entry: CheckpointEntry) -> tuple[int, int]:
    """Total size and latest mtime (ns) of an entry's files, as ingest records them.

    Raises
    ------
    OSError
        A file is missing.
    """
    stats = [f.stat() for f in entry.files]
    return sum(st.st_size for st in stats), max(st.st_mtime_ns for st in stats)


class Hashes:
    """sha256 of pending entries, computed once per set of file signatures."""

    def __init__(self) -> None:
        self._known: dict[tuple[Path, ...], tuple[tuple[Signature, ...], str | None]] = {}

    def sha256(self, entry: CheckpointEntry) -> str | None:
        """The entry's sha256 (as ingest records it), or None if a file is gone."""
        try:
            sigs = tuple(signature_of(os.stat(f)) for f in entry.files)
            known = self._known.get(entry.files)
            if known is not None and known[0] == sigs:
                return known[1]
            digest = fingerprint(entry)[2]
        except OSError:
            return None
        self._known[entry.files] = (sigs, digest)
        return digest
