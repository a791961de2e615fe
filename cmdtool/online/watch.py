"""``cmdtool watch``: follow a folder that a running training job keeps writing checkpoints into.

Every ``interval`` seconds the SOURCE folder is listed with
:func:`cmdtool.checkpoints.discover`; the checkpoints whose labels are not in the store are
*pending*. They are ingested one at a time, oldest first, each only once it is complete;
while the oldest pending one is incomplete, nothing later is ingested (the store only
appends, so a later epoch ingested first would lock the earlier one out for good). Once
the store holds ``warmup`` epochs, CMD is fitted over the first ``warmup`` of them; every
epoch after that is folded in with :func:`cmdtool.decomposition.update.update` (online CMD:
modes and
references stay fixed, ``a, b`` follow the new epochs).

Decisions
---------
* **When is a file complete?** Writers (``torch.save``, ``safetensors.save_file``, most
  training loops) write straight to the final name, so a file may be seen half written.
  A file is complete when its own format says so, *and* its size, mtime and inode are the
  same as at the previous poll:

  - ``.safetensors``: the 8-byte header length, a header that parses as JSON, and a file
    size of exactly ``8 + header + max(data_offsets end)``;
  - zip-format torch files (``PK`` at the start): the end-of-central-directory record is
    there, :mod:`zipfile` lists the archive, and every record's data lies inside the file;
  - legacy pickle torch files carry no length: only the settle rule applies (unchanged
    across two consecutive polls).

  Both tests are needed: the format check alone would accept a file that a writer is
  rewriting in place (truncate, write again) at the moment it happens to be whole, and the
  settle rule alone would accept a file whose writer stalled for longer than an interval
  (a slow disk, a paused job, a file written in two halves). So a file is ingested at the
  earliest one interval after it was first seen complete. Only :func:`os.stat` is used to
  decide whether to look again; a file is opened (to read its header, or the zip
  directory and the 30-byte local record headers) only when its stat changed since the
  last look, and its data is never read here (ingest reads and validates it).
* A safetensors header that parses but is malformed (no ``data_offsets``) counts as
  complete, so that ingest rejects it with its precise message (exit 4) instead of
  waiting forever; a header that does not parse yet is waited for.
* **Errors of a listing.** An empty SOURCE folder (or a ``pattern`` matching nothing yet)
  is waited for. A ``CheckpointError`` from the listing (a Hugging Face
  ``checkpoint-N/`` folder whose shards are still being written, but also a file name
  without an epoch number) is reported once through ``on_notice`` and waited for too:
  the two cannot be told apart from the error, and nothing can be ingested meanwhile
  (ingest lists the folder as well). It is raised at the idle stop.
* **Failures.** A bad checkpoint's :class:`~cmdtool.errors.CmdtoolError` propagates;
  ingest has rolled back its epoch, so the store is as it was before it. Ctrl-C is not
  caught: ingest, decompose and update are crash-safe, and nothing half-done is
  written on the way out. The store is not held open (nor locked) between polls.
* **Idle stop** (``until_idle``): no new epoch for that long. A pending file that is still
  incomplete then is a :class:`~cmdtool.errors.CheckpointError` naming it (the writer
  died mid-write); a run shorter than the warm-up is a
  :class:`~cmdtool.errors.UsageError`. A ``stop`` event ends the loop without those checks.
* A resumed watch (the store already holds decomposition ``name``) only updates it; a
  store that holds ``warmup`` epochs but no decomposition is decomposed before the first
  poll, then updated with the rest.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cmdtool.checkpoints import CheckpointEntry, discover
from cmdtool.checkpoints.complete import FileCheck, Signature, check_file, signature_of
from cmdtool.decomposition import CMD, MIN_EPOCHS
from cmdtool.errors import CheckpointError, CmdtoolError, SourceNotFoundError, UsageError
from cmdtool.ingestion import ingest
from cmdtool.store import RESULT_ATTR, TrajectoryStore, check_result_name

__all__ = ["FileCheck", "WatchEvent", "WatchSummary", "check_file", "watch"]

Phase = Literal["warmup", "decomposed", "updated"]
# ------------------------------------------------------------------------ watch


@dataclass(frozen=True)
class WatchEvent:
    """One epoch handled by :func:`watch` (passed to ``on_epoch``).

    Attributes
    ----------
    label : int
        The epoch.
    n_epochs : int
        Epochs in the store now.
    phase : {"warmup", "decomposed", "updated"}
        Still warming up; CMD was fitted at this epoch; or this epoch was folded in.
    n_modes : int or None
        Modes of the decomposition (None while warming up).
    relative_error : float or None
        Relative reconstruction error over the decomposition's epochs (None while
        warming up).
    seconds : float
        Time spent on this epoch: ingest plus decompose or update.
    """

    label: int
    n_epochs: int
    phase: Phase
    n_modes: int | None
    relative_error: float | None
    seconds: float


@dataclass
class WatchSummary:
    """What a :func:`watch` did until it stopped.

    ``added``: epochs ingested by this watch, in order; ``n_epochs``: epochs in the store;
    ``decomposed``: whether the store holds the decomposition; ``n_modes`` and
    ``relative_error``: its latest figures; ``stopped``: ``"idle"`` or ``"stop"``.
    """

    source: str
    store: str
    name: str
    added: list[int] = field(default_factory=list)
    n_epochs: int = 0
    decomposed: bool = False
    n_modes: int | None = None
    relative_error: float | None = None
    seconds: float = 0.0
    stopped: str = "idle"


def _labels_text(labels: list[int]) -> str:
    return f"epochs {labels[0]}..{labels[-1]}" if labels else "no epoch"


class _Watch:
    """State of one :func:`watch` loop."""

    def __init__(
        self,
        source: Path,
        store: Path,
        *,
        warmup: int,
        interval: float,
        until_idle: float | None,
        name: str,
        n_modes: int,
        n_samples: int,
        seed: int,
        device: str,
        pattern: str | None,
        on_epoch: Callable[[WatchEvent], None] | None,
        on_notice: Callable[[str], None] | None,
        stop: threading.Event | None,
    ) -> None:
        self.source = source
        self.store = store
        self.warmup = warmup
        self.interval = interval
        self.until_idle = until_idle
        self.name = name
        self.n_modes = n_modes
        self.n_samples = n_samples
        self.seed = seed
        self.device = device
        self.pattern = pattern
        self.on_epoch = on_epoch
        self.on_notice = on_notice
        self.stop = stop
        self.summary = WatchSummary(source=str(source), store=str(store), name=name)
        self.labels: list[int] = []  # the store's epochs
        self.decomposed = False
        self.folded_upto: int | None = None  # last epoch label the decomposition covers
        self.prev_sigs: dict[Path, Signature] = {}  # pending files' stat at the last poll
        self.first_seen: dict[Path, float] = {}
        self.checks: dict[Path, FileCheck] = {}
        self.blocked: CheckpointEntry | None = None  # oldest pending entry not ingested
        self.listing_error: CmdtoolError | None = None  # why the last listing failed
        self.noticed: set[str] = set()
        self.last_progress = time.monotonic()

    # ----------------------------------------------------------------- helpers
    def _notice(self, message: str) -> None:
        if message not in self.noticed:
            self.noticed.add(message)
            if self.on_notice is not None:
                self.on_notice(message)

    def _stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _disappeared(self) -> SourceNotFoundError:
        return SourceNotFoundError(
            f"source folder {self.source} disappeared while watching; the store holds "
            f"{_labels_text(self.labels)}"
        )

    def _load_store(self) -> None:
        """Read the store's epochs and decomposition, if it exists (fails early if the
        path is something else than a store or an empty folder)."""
        p = self.store
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            return
        with TrajectoryStore.open(p, mode="r") as st:
            self.labels = st.labels
            if self.name in st.result_names():
                self.decomposed = True
                attrs = st.result_attr(self.name, RESULT_ATTR) or {}
                window = attrs.get("epochs") or []
                self.folded_upto = max(window) if window else None
                self.summary.n_modes = attrs.get("n_modes")
                self.summary.relative_error = attrs.get("relative_error")
        self.summary.n_epochs = len(self.labels)
        self.summary.decomposed = self.decomposed

    # ------------------------------------------------------------------- model
    def _advance(self) -> tuple[Phase, int | None, float | None]:
        """Decompose once the warm-up is complete, then fold the epochs after the window."""
        phase: Phase = "warmup"
        n_modes: int | None = None
        error: float | None = None
        labels = self.labels
        if not self.decomposed and len(labels) >= self.warmup:
            with TrajectoryStore.open(self.store, mode="r") as st:
                n = st.n_params
            window = f"{labels[0]}:{labels[self.warmup - 1] + 1}"
            model = CMD(
                self.n_modes,
                n_samples=min(self.n_samples, n),
                seed=self.seed,
                device=self.device,
                epochs=window,
            ).fit(self.store, name=self.name)
            self.decomposed = True
            self.folded_upto = labels[self.warmup - 1]
            phase, n_modes, error = "decomposed", model.n_modes_, model.relative_error_
        if (
            self.decomposed
            and labels
            and (self.folded_upto is None or labels[-1] > self.folded_upto)
        ):
            from cmdtool.decomposition.update import update

            result = update(self.store, self.name)
            self.folded_upto = max([labels[-1], *result.added])
            if phase != "decomposed":
                phase = "updated"
            n_modes, error = result.n_modes, result.relative_error
        if n_modes is not None:
            self.summary.n_modes, self.summary.relative_error = n_modes, error
        self.summary.decomposed = self.decomposed
        return phase, n_modes, error

    def _emit(
        self, label: int, phase: Phase, n_modes: int | None, error: float | None, seconds: float
    ) -> None:
        if self.on_epoch is not None:
            self.on_epoch(WatchEvent(label, len(self.labels), phase, n_modes, error, seconds))

    def _catch_up(self) -> None:
        """A store that already holds epochs the decomposition lacks: bring it up to date."""
        if not self.labels:
            return
        behind = self.decomposed and (
            self.folded_upto is None or self.labels[-1] > self.folded_upto
        )
        if behind or (not self.decomposed and len(self.labels) >= self.warmup):
            t0 = time.perf_counter()
            phase, n_modes, error = self._advance()
            self._emit(self.labels[-1], phase, n_modes, error, time.perf_counter() - t0)

    # ------------------------------------------------------------------ polling
    def _list(self, first: bool) -> list[CheckpointEntry] | None:
        """The checkpoints in SOURCE, or None when there is nothing to list yet."""
        try:
            entries = discover(self.source, pattern=self.pattern)
        except SourceNotFoundError as exc:
            if not self.source.is_dir():
                if first:
                    raise
                raise self._disappeared() from exc
            self.listing_error = exc
            self._notice(f"waiting for checkpoints: {exc}")
            return None
        except CheckpointError as exc:
            if not self.source.is_dir():
                raise self._disappeared() from exc
            self.listing_error = exc
            self._notice(f"waiting: {exc}")
            return None
        self.listing_error = None
        return entries

    def _ready(self, entry: CheckpointEntry, prev: dict[Path, Signature]) -> bool:
        """Every file of ``entry`` complete, and unchanged since the previous poll."""
        for f in entry.files:
            try:
                sig = signature_of(os.stat(f))
                check = self.checks.get(f)
                if check is None or check.signature != sig:
                    check = self.checks[f] = check_file(f)
            except OSError:  # removed or replaced meanwhile: look again next poll
                return False
            if check.complete is False or check.signature != sig or prev.get(f) != sig:
                return False
        return True

    def _same_listing_error(self, exc: CmdtoolError) -> bool:
        """Whether ``exc`` (from ingest) is the listing failing, not the checkpoint."""
        try:
            discover(self.source, pattern=self.pattern)
        except CmdtoolError as again:
            return str(again) == str(exc)
        return False

    def _ingest(self, entry: CheckpointEntry) -> bool:
        """Ingest one complete entry and advance the model; False if it did not happen."""
        t0 = time.perf_counter()
        try:
            result = ingest(
                self.source, self.store, pattern=self.pattern, labels=[entry.label], readers=0
            )
        except Exception as exc:  # never KeyboardInterrupt: that propagates untouched
            if not self.source.is_dir():
                raise self._disappeared() from exc
            if not all(f.exists() for f in entry.files):
                return False  # removed by the writer meanwhile; the next listing decides
            if isinstance(exc, CmdtoolError) and self._same_listing_error(exc):
                return False
            raise
        if entry.label not in result.added:  # gone, or ingested by someone else meanwhile
            if entry.label in result.skipped and entry.label not in self.labels:
                self.labels = sorted({*self.labels, entry.label})
            return False
        self.labels.append(entry.label)
        self.summary.added.append(entry.label)
        self.summary.n_epochs = len(self.labels)
        for f in entry.files:
            self.checks.pop(f, None)
            self.first_seen.pop(f, None)
        phase, n_modes, error = self._advance()
        self._emit(entry.label, phase, n_modes, error, time.perf_counter() - t0)
        self.last_progress = time.monotonic()
        return True

    def _poll(self, first: bool) -> None:
        entries = self._list(first)
        if entries is None:
            self.blocked = None
            return
        have = set(self.labels)
        pending = [e for e in entries if e.label not in have]
        now = time.monotonic()
        sigs: dict[Path, Signature] = {}
        for entry in pending:
            for f in entry.files:
                try:
                    sigs[f] = signature_of(os.stat(f))
                except OSError:
                    continue
                self.first_seen.setdefault(f, now)
        prev, self.prev_sigs = self.prev_sigs, sigs
        self.blocked = None
        for entry in pending:
            if not self._ready(entry, prev) or not self._ingest(entry):
                self.blocked = entry
                return
            if self._stopped():
                return

    # ---------------------------------------------------------------- stopping
    def _idle_stop(self) -> None:
        """Raise if the run ended with a file half written or before the warm-up."""
        if self.blocked is not None:
            for f in self.blocked.files:
                try:
                    check = check_file(f)
                except OSError:
                    continue
                waited = time.monotonic() - self.first_seen.get(f, self.last_progress)
                if check.complete is not False:
                    if check.signature == self.prev_sigs.get(f):
                        continue
                    problem = f"{check.size} bytes, still changing"
                else:
                    problem = check.problem
                raise CheckpointError(f"{f} never completed: {problem} (waited {waited:.0f} s)")
        if isinstance(self.listing_error, CheckpointError):
            raise self.listing_error
        if not self.decomposed:
            k = len(self.labels)
            if k == 0:
                raise SourceNotFoundError(
                    f"no checkpoint arrived in {self.source} in {self.until_idle:g} s"
                    + (f" ({self.listing_error})" if self.listing_error else "")
                )
            raise UsageError(
                f"warm-up {self.warmup} is longer than the run: only {k} epoch"
                f"{'' if k == 1 else 's'} arrived; lower --warmup"
            )

    def run(self) -> WatchSummary:
        t0 = time.monotonic()
        self._load_store()
        if not self.source.is_dir():
            discover(self.source, pattern=self.pattern)  # raises SourceNotFoundError
        self._catch_up()
        self.last_progress = time.monotonic()
        first = True
        while True:
            started = time.monotonic()
            self._poll(first)
            first = False
            if self._stopped():
                self.summary.stopped = "stop"
                break
            if self.until_idle is not None and time.monotonic() - self.last_progress >= (
                self.until_idle
            ):
                self._idle_stop()
                self.summary.stopped = "idle"
                break
            delay = max(0.0, started + self.interval - time.monotonic())
            if self.stop is not None:
                if self.stop.wait(delay):
                    self.summary.stopped = "stop"
                    break
            else:
                time.sleep(delay)
        self.summary.seconds = time.monotonic() - t0
        return self.summary


def watch(
    source: str | os.PathLike[str],
    store: str | os.PathLike[str],
    *,
    warmup: int = 10,
    interval: float = 2.0,
    until_idle: float | None = None,
    name: str = "cmd",
    n_modes: int = 10,
    n_samples: int = 1000,
    seed: int = 0,
    device: str = "auto",
    pattern: str | None = None,
    on_epoch: Callable[[WatchEvent], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> WatchSummary:
    """Follow ``source`` while a training job writes checkpoints into it.

    Each complete checkpoint is ingested into ``store`` in epoch order; once the store
    holds ``warmup`` epochs, CMD is fitted over the first ``warmup`` of them, and every
    later epoch is folded into that decomposition (:func:`cmdtool.decomposition.update.update`). See
    the module docstring for when a file counts as complete.

    Parameters
    ----------
    source : path
        The folder the training job writes checkpoints into; it may be empty at first.
    store : path
        The trajectory store; created with the first epoch, or resumed.
    warmup : int, default 10
        F, the epochs the decomposition is first fitted over (>= 3).
    interval : float, default 2.0
        Seconds between two looks at ``source``; a file is ingested at the earliest one
        interval after it is first seen complete.
    until_idle : float, optional
        Return after this many seconds without a new epoch; default: run until
        interrupted (Ctrl-C) or ``stop`` is set.
    name : str, default "cmd"
        The decomposition's subgroup.
    n_modes, n_samples, seed, device
        Settings of the fit (:class:`cmdtool.decomposition.CMD`); ``n_samples`` is capped at
        the number of parameters.
    pattern : str, optional
        Glob picking checkpoint files or folders (as for ingest).
    on_epoch : callable(WatchEvent), optional
        Called after each epoch is ingested and folded in.
    on_notice : callable(str), optional
        Called once per distinct reason the watch is waiting (an empty folder, a listing
        error such as a Hugging Face folder still being written).
    stop : threading.Event, optional
        Set it to end the loop; the summary is returned.

    Returns
    -------
    WatchSummary

    Raises
    ------
    UsageError
        Bad settings (``warmup < 3``, ``interval <= 0``, ...), before anything happens;
        or, at an idle stop, fewer than ``warmup`` epochs arrived and no decomposition
        exists.
    SourceNotFoundError
        ``source`` does not exist at the start, or disappears while watched.
    CheckpointError
        A bad checkpoint (the store keeps the epochs before it), or at an idle stop a file
        still incomplete.
    CmdtoolError
        Any other error of ingest, decompose or update (the store stays consistent).
    """
    if warmup < MIN_EPOCHS:
        raise UsageError(
            f"warmup={warmup} must be >= {MIN_EPOCHS}: CMD needs at least {MIN_EPOCHS} epochs"
        )
    if not (interval > 0 and math.isfinite(interval)):
        raise UsageError(f"interval={interval} must be a positive number of seconds")
    if until_idle is not None and not (until_idle > 0 and math.isfinite(until_idle)):
        raise UsageError(f"until_idle={until_idle} must be a positive number of seconds")
    if n_samples < 1:
        raise UsageError(f"samples={n_samples} must be >= 1")
    if not 1 <= n_modes <= n_samples:
        raise UsageError(
            f"modes={n_modes} must be >= 1 and <= the number of sampled parameters {n_samples}"
        )
    check_result_name(name)
    from cmdtool.method.kernels import resolve_device

    resolve_device(device)  # a missing GPU fails now, not after the warm-up
    return _Watch(
        Path(source),
        Path(store),
        warmup=warmup,
        interval=interval,
        until_idle=until_idle,
        name=name,
        n_modes=n_modes,
        n_samples=n_samples,
        seed=seed,
        device=device,
        pattern=pattern,
        on_epoch=on_epoch,
        on_notice=on_notice,
        stop=stop,
    ).run()
