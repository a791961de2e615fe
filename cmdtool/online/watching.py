"""The loop behind ``cmdtool watch`` (:func:`cmdtool.online.watch.watch`, whose module
docstring gives the decisions): poll SOURCE, ingest each complete and settled checkpoint in
epoch order, decompose after the warm-up, fold in every later epoch, and re-check what was
ingested."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cmdtool.checkpoints import CheckpointEntry, discover
from cmdtool.checkpoints.complete import check_file
from cmdtool.decomposition import CMD
from cmdtool.errors import CheckpointError, CmdtoolError, SourceNotFoundError, UsageError
from cmdtool.ingestion import ingest
from cmdtool.online.sources import Hashes, Ingested, Readiness, Settling, entry_stat
from cmdtool.store import RESULT_ATTR, TrajectoryStore
from cmdtool.store.layout import PARTIAL_PREFIX

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


class Watcher:
    """State of one :func:`cmdtool.online.watch.watch` loop (see that module for the
    decisions it implements)."""

    def __init__(
        self,
        source: Path,
        store: Path,
        *,
        warmup: int,
        interval: float,
        until_idle: float | None,
        settle: float,
        read_options: dict[str, Any],
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
        self.read_options = read_options
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
        self.stale = False  # the decomposition covers an epoch no longer in the store
        self.folded_upto: int | None = None  # last epoch label the decomposition covers
        self.settling = Settling(settle)
        self.hashes = Hashes()
        self.records: dict[int, Ingested] = {}  # how each epoch's source was ingested
        self.redo: Ingested | None = None  # the last epoch, to ingest again once settled
        self.blocked: CheckpointEntry | None = None  # oldest pending entry not ingested
        self.blocked_state: Readiness | None = None
        self.listing_error: CmdtoolError | None = None  # why the last listing failed
        self.noticed: set[str] = set()
        self.last_progress = time.monotonic()

    # ----------------------------------------------------------------- helpers
    def _notice(self, message: str) -> None:
        if message not in self.noticed:
            self.noticed.add(message)
            if self.on_notice is not None:
                self.on_notice(message)

    def _warn(self, message: str) -> None:
        """A change to an ingested file: reported every time, never deduplicated."""
        if self.on_notice is not None:
            self.on_notice(message)

    def _stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _disappeared(self) -> SourceNotFoundError:
        return SourceNotFoundError(
            f"source folder {self.source} disappeared while watching; the store holds "
            f"{_labels_text(self.labels)}"
        )

    def _read_records(self, st: TrajectoryStore) -> None:
        """The store's epochs and their fingerprints; what is already known of an epoch
        (a change reported, a touched file's new stat) is kept."""
        self.labels = st.labels
        known, self.records = self.records, {}
        for e in st.epochs:
            if e.sha256 is None or e.size is None or e.mtime_ns is None:
                continue  # ingested by a cmdtool that recorded no fingerprint
            rec = known.get(e.label)
            if rec is None or (rec.source, rec.sha256) != (e.source, e.sha256):
                rec = Ingested(e.label, e.source, e.size, e.mtime_ns, e.sha256)
            self.records[e.label] = rec

    def _load_store(self) -> None:
        """Read the store's epochs and decomposition, if it exists (fails early if the
        path is something else than a store or an empty folder)."""
        p = self.store
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            return
        with TrajectoryStore.open(p, mode="r") as st:
            self._read_records(st)
            if self.name in st.result_names():
                self.decomposed = True
                attrs = st.result_attr(self.name, RESULT_ATTR) or {}
                window = attrs.get("epochs") or []
                self.folded_upto = max(window) if window else None
                self.summary.n_modes = attrs.get("n_modes")
                self.summary.relative_error = attrs.get("relative_error")
                gone = sorted(set(window) - set(self.labels))
                if gone:
                    self.stale = True
                    self._notice(
                        f"decomposition '{self.name}' covers epoch(s) {gone} that the store no "
                        "longer holds; it is fitted again"
                    )
        self.summary.n_epochs = len(self.labels)
        self.summary.decomposed = self.decomposed and not self.stale

    # ------------------------------------------------------------------- model
    def _fit(self) -> CMD:
        """Fit the decomposition over the first ``warmup`` epochs (replacing any)."""
        labels = self.labels
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
        self.decomposed, self.stale = True, False
        self.folded_upto = labels[self.warmup - 1]
        return model

    def _advance(self) -> tuple[Phase, int | None, float | None]:
        """Decompose once the warm-up is complete, then fold the epochs after the window."""
        phase: Phase = "warmup"
        n_modes: int | None = None
        error: float | None = None
        labels = self.labels
        if (not self.decomposed or self.stale) and len(labels) >= self.warmup:
            model = self._fit()
            phase, n_modes, error = "decomposed", model.n_modes_, model.relative_error_
        if (
            self.decomposed
            and not self.stale
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
        self.summary.decomposed = self.decomposed and not self.stale
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
            self.stale or self.folded_upto is None or self.labels[-1] > self.folded_upto
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
                self.source,
                self.store,
                pattern=self.pattern,
                labels=[entry.label],
                readers=0,
                **self.read_options,
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
        with TrajectoryStore.open(self.store, mode="r") as st:
            self._read_records(st)
        self.summary.added.append(entry.label)
        self.summary.n_epochs = len(self.labels)
        self.settling.forget(entry)
        phase, n_modes, error = self._advance()
        self._emit(entry.label, phase, n_modes, error, time.perf_counter() - t0)
        self.last_progress = time.monotonic()
        return True

    def _recheck(self, entries: list[CheckpointEntry]) -> None:
        """Compare every ingested epoch's files with how they were ingested."""
        by_source = {e.relpath(self.source): e for e in entries}
        last = self.labels[-1] if self.labels else None
        for label, rec in self.records.items():
            entry = by_source.get(rec.source)
            if entry is None or entry.label != label or rec is self.redo:
                continue  # gone (deleted or renamed), or already to be ingested again
            try:
                stat = entry_stat(entry)
            except OSError:
                continue
            if stat == (rec.size, rec.mtime_ns):
                continue
            digest = self.hashes.sha256(entry)
            if digest is None:
                continue
            if digest == rec.sha256:  # touched, not changed
                rec.size, rec.mtime_ns = stat
                continue
            if label == last:
                self.redo = rec
                self._warn(
                    f"warning: {rec.source} changed after it was ingested as epoch {label} "
                    f"(its sha256 differs); epoch {label} will be ingested again once the file "
                    "is complete and settled"
                )
                self.last_progress = time.monotonic()
            elif not rec.warned:
                rec.warned = True
                rec.size, rec.mtime_ns = stat  # hashed again only if it changes again
                self._warn(
                    f"warning: {rec.source} changed after it was ingested as epoch {label} "
                    f"(its sha256 differs); the store keeps the values ingested then, as later "
                    "epochs follow it (ingest the run into a new store to use the new contents)"
                )

    def _drop_decomposition(self) -> None:
        """Remove decomposition ``name`` (it was fitted over an epoch being replaced)."""
        with TrajectoryStore.open(self.store, mode="r+") as st:
            for folder in (self.name, PARTIAL_PREFIX + self.name + ".old"):
                st._remove(st.path / folder)  # renamed away, then deleted
        self.decomposed, self.stale, self.folded_upto = False, False, None

    def _ingest_again(self, entry: CheckpointEntry) -> bool:
        """Replace the store's last epoch by the new contents of its (settled) file."""
        label = entry.label
        if self.decomposed and not self.stale:
            if len(self.labels) <= self.warmup:  # the warm-up window holds the epoch
                self._drop_decomposition()
            else:  # fitted again over its window first, which excludes the epoch
                self._fit()
        with TrajectoryStore.open(self.store, mode="r+") as st:
            if not st.labels or st.labels[-1] != label:
                self.redo = None
                self._read_records(st)
                return False
            snapshot = st.snapshot()
            snapshot["epochs"] = snapshot["epochs"][:-1]
            st.rollback(snapshot)
            self._read_records(st)
        self.redo = None
        self._warn(f"epoch {label} rolled back; ingesting {entry.relpath(self.source)} again")
        return self._ingest(entry)

    def _skip(self, entry: CheckpointEntry, listed: set[str]) -> bool:
        """Whether a complete pending entry is a renamed ingested file or an older epoch
        (a notice each, once): neither is ingested."""
        where = entry.relpath(self.source)
        moved = [r for r in self.records.values() if r.source not in listed]
        if moved:
            try:
                size = entry_stat(entry)[0]
            except OSError:
                return False
            if any(r.size == size for r in moved):
                digest = self.hashes.sha256(entry)
                for r in moved:
                    if digest == r.sha256:
                        self._notice(
                            f"{where} holds the contents of epoch {r.label} ({r.source}, no "
                            "longer there): a renamed checkpoint, not ingested again"
                        )
                        return True
        if self.labels and entry.label < self.labels[-1]:
            self._notice(
                f"{where}: epoch {entry.label} is older than the store's last epoch "
                f"{self.labels[-1]}; cmdtool only appends, so it is not ingested (ingest the "
                "run into a new store to include it)"
            )
            return True
        return False

    def _poll(self, first: bool) -> None:
        entries = self._list(first)
        if entries is None:
            self.blocked = self.blocked_state = None
            return
        self._recheck(entries)
        listed = {e.relpath(self.source) for e in entries}
        now = time.monotonic()
        self.blocked = self.blocked_state = None
        if self.redo is not None:
            entry = next((e for e in entries if e.relpath(self.source) == self.redo.source), None)
            if entry is None or entry.label != self.redo.label:
                self.redo = None  # its file went away: the store keeps what it has
            else:
                state = self.settling.state(entry, now)
                if state != "ready" or not self._ingest_again(entry):
                    self.blocked, self.blocked_state = entry, state
                    return
        have = set(self.labels)
        for entry in (e for e in entries if e.label not in have):
            state = self.settling.state(entry, now)
            older = bool(self.labels) and entry.label < self.labels[-1]
            if state != "ready":
                if older:
                    continue  # never ingested: it need not hold the later ones back
                self.blocked, self.blocked_state = entry, state
                return
            if self._skip(entry, listed):
                continue
            if not self._ingest(entry):
                self.blocked, self.blocked_state = entry, state
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
                waited = time.monotonic() - self.settling.first_seen.get(f, self.last_progress)
                if check.complete is not False:
                    if self.blocked_state != "changing":
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

    def _idle(self) -> bool:
        """Whether the idle time has passed with nothing about to be ingested (a complete
        file waiting out its settle time holds the stop off)."""
        if self.until_idle is None or self.blocked_state in ("settling", "ready"):
            return False
        return time.monotonic() - self.last_progress >= self.until_idle

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
            if self._idle():
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
