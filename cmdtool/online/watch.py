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
  A file is complete when its own format says so, *and* its size, mtime and inode have
  not changed for ``settle`` seconds (default five poll intervals):

  - ``.safetensors``: the 8-byte header length, a header that parses as JSON, and a file
    size of exactly ``8 + header + max(data_offsets end)``;
  - zip-format torch files (``PK`` at the start): the end-of-central-directory record is
    there, :mod:`zipfile` lists the archive, and every record's data lies inside the file;
  - legacy pickle torch files carry no length: only the settle rule applies.

  Both tests are needed: the format check alone would accept a file that a writer is
  rewriting in place (truncate, write again) at the moment it happens to be whole, or a
  file pre-allocated at its full size whose data is not written yet; the settle rule alone
  would accept a file whose writer stalled (a slow disk, a paused job, a file written in
  two halves). So a file is ingested at the earliest ``settle`` seconds after it was first
  seen complete and unchanged. Only :func:`os.stat` is used to decide whether to look
  again; a file is opened (to read its header, or the zip directory and the 30-byte local
  record headers) only when its stat changed since the last look, and its data is never
  read here (ingest reads and validates it).
* **Changes after ingest.** A writer that stalls for longer than ``settle`` still gets its
  file ingested early, so every ingested epoch's files are re-checked at every poll: their
  total size and latest mtime against the store's record, and, when those moved, the
  sha256. A changed file is reported loudly (``on_notice``, ``warning: ...``). If it is
  the store's last epoch, it is ingested again once complete and settled: when the
  decomposition's warm-up window holds that epoch, the decomposition is removed and fitted
  again after; otherwise it is first fitted again over its window (which excludes the
  epoch), then the epoch is rolled back, ingested again and folded in. At every instant
  the store and its decomposition agree. A changed earlier epoch cannot be replaced (the
  store only appends): the warning says so and the store keeps the values ingested then.
* **Renamed and older files.** A new file whose contents (sha256) are those of an
  ingested epoch whose own file has gone from SOURCE is that file, renamed: it is a
  notice, not a new epoch. (A copy, the original still there, is ingested as what its
  name says.) A checkpoint older than the store's last epoch cannot be appended: a
  notice, and watching goes on.
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
* **Idle stop** (``until_idle``): no new epoch for that long (a complete file waiting out
  its settle time holds it off). A pending file that is still incomplete, or still
  changing, then is a :class:`~cmdtool.errors.CheckpointError` naming it (the writer
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
from collections.abc import Callable
from pathlib import Path

from cmdtool.checkpoints.complete import FileCheck, check_file
from cmdtool.checkpoints.limits import DEFAULT_MAX_PARAMS, DEFAULT_MAX_TENSORS
from cmdtool.decomposition import MIN_EPOCHS
from cmdtool.errors import UsageError
from cmdtool.online.watching import Watcher, WatchEvent, WatchSummary
from cmdtool.store import check_result_name

__all__ = ["FileCheck", "WatchEvent", "WatchSummary", "check_file", "watch"]


def watch(
    source: str | os.PathLike[str],
    store: str | os.PathLike[str],
    *,
    warmup: int = 10,
    interval: float = 2.0,
    until_idle: float | None = None,
    settle: float | None = None,
    name: str = "cmd",
    n_modes: int = 10,
    n_samples: int = 1000,
    seed: int = 0,
    device: str = "auto",
    pattern: str | None = None,
    allow_expanded: bool = False,
    max_params: int = DEFAULT_MAX_PARAMS,
    max_tensors: int = DEFAULT_MAX_TENSORS,
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
        Seconds between two looks at ``source``.
    until_idle : float, optional
        Return after this many seconds without a new epoch (a complete file waiting out
        its settle time holds it off); default: run until interrupted (Ctrl-C) or
        ``stop`` is set.
    settle : float, optional
        Seconds a complete file must stay unchanged (size, mtime, inode) before it is
        ingested; default ``5 * interval``.
    name : str, default "cmd"
        The decomposition's subgroup.
    n_modes, n_samples, seed, device
        Settings of the fit (:class:`cmdtool.decomposition.CMD`); ``n_samples`` is capped at
        the number of parameters.
    pattern : str, optional
        Glob picking checkpoint files or folders (as for ingest).
    allow_expanded, max_params, max_tensors
        What one checkpoint may hold, as for :func:`cmdtool.ingestion.ingest`.
    on_epoch : callable(WatchEvent), optional
        Called after each epoch is ingested and folded in.
    on_notice : callable(str), optional
        Called once per distinct reason the watch is waiting (an empty folder, a listing
        error such as a Hugging Face folder still being written), per file skipped (a
        renamed one, an older epoch), and for each ingested file that changed afterwards
        (``"warning: ..."``).
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
    if settle is None:
        settle = 5 * interval
    if not (settle >= 0 and math.isfinite(settle)):
        raise UsageError(f"settle={settle} must be a number of seconds >= 0")
    from cmdtool.checkpoints.limits import ReadLimits

    ReadLimits(allow_expanded, max_params, max_tensors)  # bad limits fail now
    if n_samples < 1:
        raise UsageError(f"samples={n_samples} must be >= 1")
    if not 1 <= n_modes <= n_samples:
        raise UsageError(
            f"modes={n_modes} must be >= 1 and <= the number of sampled parameters {n_samples}"
        )
    check_result_name(name)
    from cmdtool.method.kernels import resolve_device

    resolve_device(device)  # a missing GPU fails now, not after the warm-up
    return Watcher(
        Path(source),
        Path(store),
        warmup=warmup,
        interval=interval,
        until_idle=until_idle,
        settle=settle,
        read_options={
            "allow_expanded": allow_expanded,
            "max_params": max_params,
            "max_tensors": max_tensors,
        },
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
