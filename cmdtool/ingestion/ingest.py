"""Stream a folder of checkpoints into a trajectory store, one epoch at a time.

Each checkpoint is opened lazily; its floating tensors are converted to float32 and
written chunk by chunk into one new row of ``weights`` (a chunk-sized buffer, never a
whole row), its other tensors into the same row of ``extras``, then the epoch is
committed. A failure mid-epoch drops the uncommitted row, so the store is left as it was.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmdtool.checkpoints import (
    Checkpoint,
    CheckpointEntry,
    canonical_name,
    dtype_name,
    find_checkpoints,
    open_checkpoint,
)
from cmdtool.checkpoints.bytesource import fingerprint
from cmdtool.checkpoints.limits import DEFAULT_MAX_PARAMS, DEFAULT_MAX_TENSORS, ReadLimits
from cmdtool.checkpoints.remote import mirror
from cmdtool.checkpoints.tied import find_aliases, safetensors_metadata
from cmdtool.errors import (
    CmdtoolError,
    MismatchError,
    NonFiniteError,
    ObjectStoreError,
    SourceNotFoundError,
    UsageError,
)
from cmdtool.method.sampling import sample_indices
from cmdtool.objectstore.url import is_url as source_is_url
from cmdtool.store import (
    POOL_SIZE,
    EpochInfo,
    ExtraInfo,
    ParamInfo,
    TrajectoryStore,
    remove_store,
)
from cmdtool.store.cleanup import store_present
from cmdtool.store.normstats import (
    check_stored_pattern,
    compile_stats_pattern,
    match_stats,
    pattern_for_new_store,
    stats_pattern_of,
)
from cmdtool.store.objects import is_url

Progress = Callable[[int, int, str], None]
#: Chunks per row block (16 MiB), written concurrently while the next one is built.
WRITE_CHUNKS = 16


@dataclass
class IngestSummary:
    """What an ingest did."""

    store: str
    created: bool
    added: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    n_params: int = 0
    n_epochs: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    state_keys: dict[str, int] = field(default_factory=dict)
    changed: list[dict[str, object]] = field(default_factory=list)
    #: Checkpoints left out (``{"path", "reason"}``): names without an epoch number.
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    #: What the labels count: "step" / "epoch" (Hugging Face folders) or "name".
    labels: str = "name"
    #: Tensors recognised as normalization statistics (``--stats-pattern``).
    stats: list[str] = field(default_factory=list)


class _NameFilter:
    def __init__(self, include: str | None, exclude: str | None) -> None:
        try:
            self.include = re.compile(include) if include else None
            self.exclude = re.compile(exclude) if exclude else None
        except re.error as exc:
            raise UsageError(f"--include/--exclude: invalid regular expression: {exc}") from None

    def __call__(self, name: str) -> bool:
        if self.include is not None and not self.include.search(name):
            return False
        return not (self.exclude is not None and self.exclude.search(name))


def _layout_from(
    ckpt: Checkpoint, keep: _NameFilter, aliases: Collection[str] = ()
) -> tuple[list[ParamInfo], list[ExtraInfo]]:
    params: list[ParamInfo] = []
    extras: list[ExtraInfo] = []
    col = 0
    byte = 0
    for name in ckpt:
        if not keep(name) or name in aliases:  # a tied tensor is stored once
            continue
        shape, dtype = ckpt.spec(name)
        if dtype.is_floating_point:
            p = ParamInfo(name, tuple(shape), dtype_name(dtype), col)
            params.append(p)
            col += p.size
        else:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            extras.append(ExtraInfo(name, tuple(shape), dtype_name(dtype), byte, nbytes))
            byte += nbytes
    return params, extras


def _match_names(
    store: TrajectoryStore,
    ckpt: Checkpoint,
    keep: _NameFilter,
    entry: CheckpointEntry,
    root: Path,
) -> dict[str, str]:
    """Map every store name to its name in ``ckpt``; a clear MismatchError otherwise.

    Names are matched exactly; where a prefix such as ``module.`` or ``_orig_mod.``
    came or went between epochs, they are matched on :func:`canonical_name`.
    """
    wanted = [p.name for p in store.params] + [e.name for e in store.extras]
    wanted += list(store.aliases)
    present = [n for n in ckpt if keep(n)]
    where = entry.relpath(root)
    if set(wanted) == set(present):
        return {n: n for n in wanted}
    by_canon: dict[str, str] = {}
    for n in present:
        c = canonical_name(n)
        if c in by_canon:
            raise MismatchError(
                f"{where}: tensors {by_canon[c]!r} and {n!r} differ only by a prefix; "
                "cannot match them to the store"
            )
        by_canon[c] = n
    mapping: dict[str, str] = {}
    missing = []
    for n in wanted:
        src = n if n in present else by_canon.get(canonical_name(n))
        if src is None:
            missing.append(n)
        else:
            mapping[n] = src
    extra = sorted(set(present) - set(mapping.values()))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if extra:
            parts.append(f"not in the store {_names(extra)}")
        raise MismatchError(
            f"{where}: tensors differ from the store's ({'; '.join(parts)}); "
            "ingest it into a new store, or filter with --include/--exclude"
        )
    return mapping


def _names(names: list[str], most: int = 5) -> str:
    s = sorted(names)
    shown = ", ".join(repr(n) for n in s[:most])
    return shown + (f" and {len(s) - most} more" if len(s) > most else "")


def _row_blocks(
    store: TrajectoryStore,
    ckpt: Checkpoint,
    mapping: dict[str, str],
    label: int,
    where: str,
    allow_nonfinite: bool,
) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, values)`` chunk-aligned float32 pieces of one epoch's row.

    Pieces span up to :data:`WRITE_CHUNKS` chunks, so that zarr writes those chunks
    concurrently; the buffer is reused, the caller writes each piece before the next.
    """
    width = store.chunk * WRITE_CHUNKS
    buf = np.empty(width, dtype=np.float32)
    finite = np.empty(width, dtype=np.bool_)
    fill = 0
    start = 0
    for p in store.params:
        src = mapping[p.name]
        t = ckpt[src]
        if tuple(t.shape) != p.shape:
            raise MismatchError(
                f"{where}: tensor {src!r} has shape {tuple(t.shape)}, the store has {p.shape}"
            )
        if not t.dtype.is_floating_point:
            raise MismatchError(
                f"{where}: tensor {src!r} is {dtype_name(t.dtype)}, the store models it as "
                f"floating ({p.dtype})"
            )
        flat = t.reshape(-1)
        i = 0
        while i < p.size:
            take = min(p.size - i, width - fill)
            piece = buf[fill : fill + take]
            part = flat[i : i + take]
            if part.dtype == torch.float32:  # one copy, out of the file's mapping
                np.copyto(piece, part.numpy())
            else:  # converted straight into the buffer: one pass, no temporary
                torch.from_numpy(piece).copy_(part)
            # fp64 values beyond float32's range are Inf by now, so caught too
            if not allow_nonfinite and not np.isfinite(piece, out=finite[:take]).all():
                raise NonFiniteError(
                    f"{where}: tensor {src!r} of epoch {label} holds NaN or Inf"
                    + (" after conversion to float32" if p.dtype == "float64" else "")
                    + "; pass --allow-nonfinite to store it anyway"
                )
            fill += take
            i += take
            if fill == width:
                yield start, buf
                start += width
                fill = 0
    if fill:
        yield start, buf[:fill]


def _extras_row(
    store: TrajectoryStore, ckpt: Checkpoint, mapping: dict[str, str], where: str
) -> np.ndarray:
    out = np.empty(store.extras_nbytes, dtype=np.uint8)
    for e in store.extras:
        src = mapping[e.name]
        t = ckpt[src]
        if tuple(t.shape) != e.shape or dtype_name(t.dtype) != e.dtype:
            raise MismatchError(
                f"{where}: tensor {src!r} is {dtype_name(t.dtype)} {tuple(t.shape)}, "
                f"the store has {e.dtype} {e.shape}"
            )
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        out[e.offset : e.offset + e.nbytes] = raw
    return out


def _changed_since_commit(
    store: TrajectoryStore, entries: list[CheckpointEntry], root: Path
) -> list[dict[str, object]]:
    """Committed epochs whose source file now has other contents (sha256 checked only
    where size or mtime moved)."""
    recorded = {e.label: e for e in store.epochs}
    changed: list[dict[str, object]] = []
    for entry in entries:
        old = recorded.get(entry.label)
        if old is None or old.sha256 is None or old.source != entry.relpath(root):
            continue
        size = sum(f.stat().st_size for f in entry.files)
        mtime = max(f.stat().st_mtime_ns for f in entry.files)
        if size == old.size and mtime == old.mtime_ns:
            continue
        sha = fingerprint(entry)[2]
        if sha is not None and sha != old.sha256:
            changed.append({"label": entry.label, "source": old.source})
    return changed


def _read_ahead(
    todo: list[CheckpointEntry], readers: int
) -> Iterator[tuple[CheckpointEntry, tuple[int, int, str | None]]]:
    """Entries in order with their fingerprints, up to ``readers`` of them being read
    concurrently ahead of the one being written (which warms the page cache too)."""
    if readers < 0:
        raise UsageError(f"readers={readers} must be >= 0")
    if readers == 0:
        for entry in todo:
            yield entry, fingerprint(entry)
        return
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="cmdtool-ingest") as pool:
        ahead = [pool.submit(fingerprint, e) for e in todo[: readers + 1]]
        for i, entry in enumerate(todo):
            print_ = ahead[i].result()
            if i + readers + 1 < len(todo):
                ahead.append(pool.submit(fingerprint, todo[i + readers + 1]))
            yield entry, print_


def _append(
    store: TrajectoryStore,
    entry: CheckpointEntry,
    ckpt: Checkpoint,
    keep: _NameFilter,
    root: Path,
    allow_nonfinite: bool,
    print_: tuple[int, int, str | None],
    source_root: str | None = None,
) -> None:
    """Write one epoch's rows, then commit it; on any failure drop the partial row."""
    where = entry.relpath(root)
    mapping = _match_names(store, ckpt, keep, entry, root)
    _check_aliases(store, entry, ckpt, mapping, where)
    dtypes = {}
    for p in store.params:
        dt = dtype_name(ckpt.spec(mapping[p.name])[1])
        if dt != p.dtype:
            dtypes[p.name] = dt
    size, mtime, sha = print_
    store.append_epoch(
        _row_blocks(store, ckpt, mapping, entry.label, where, allow_nonfinite),
        EpochInfo(
            label=entry.label,
            source=where,
            kind=entry.kind,
            state_key=ckpt.state_key,
            renamed={k: v for k, v in mapping.items() if k != v},
            dtypes=dtypes,
            size=size,
            mtime_ns=mtime,
            sha256=sha,
            header_metadata=_header_metadata(entry),
        ),
        extras=_extras_row(store, ckpt, mapping, where) if store.extras else None,
        source_root=source_root or str(root.resolve()),
    )

def _check_aliases(
    store: TrajectoryStore,
    entry: CheckpointEntry,
    ckpt: Checkpoint,
    mapping: dict[str, str],
    where: str,
) -> None:
    """Every tied pair the store keeps once must be tied in this epoch too."""
    if not store.aliases:
        return
    tied = find_aliases(entry, ckpt)
    for alias, target in store.aliases.items():
        a, t = mapping[alias], mapping[target]
        if tied.get(a, a) != tied.get(t, t):
            raise MismatchError(
                f"{where}: {a!r} is not tied to {t!r} in this checkpoint, but the store "
                "keeps them as one tensor (tied in its first epoch); ingest it into a new store"
            )


def _header_metadata(entry: CheckpointEntry) -> dict[str, str] | None:
    """The safetensors ``__metadata__`` of an epoch (its first file), or None."""
    first = entry.files[0] if entry.files else None
    if first is None or first.suffix.lower() != ".safetensors":
        return None
    return safetensors_metadata(first) or None


def create_store(
    path: str | os.PathLike[str],
    params: Sequence[ParamInfo],
    extras: Sequence[ExtraInfo] = (),
    *,
    filters: dict[str, str | None] | None = None,
    aliases: dict[str, str] | None = None,
    order: Sequence[str] | None = None,
) -> TrajectoryStore:
    """A new, empty, writable trajectory store whose sample pool (``min(N, POOL_SIZE)``
    columns) is drawn with the per-tensor sampling rule of step 1, seed 0, so that
    ``decompose`` draws its K samples from it (``docs/design.md``, "The store format");
    ``aliases`` (``{alias: stored name}``) records tied tensors stored once."""
    sizes = [p.size for p in params]
    return TrajectoryStore.create(
        path,
        params,
        extras,
        filters=filters,
        pool_index=sample_indices(sizes, min(POOL_SIZE, sum(sizes)), seed=0),
        aliases=aliases,
        order=order,
    )


def ingest(
    source: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    *,
    pattern: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    allow_nonfinite: bool = False,
    stats_pattern: str | None = None,
    allow_globals: Sequence[str] = (),
    readers: int = 2,
    labels: Collection[int] | None = None,
    label_by: str = "step",
    state: str = "raw",
    allow_expanded: bool = False,
    max_params: int = DEFAULT_MAX_PARAMS,
    max_tensors: int = DEFAULT_MAX_TENSORS,
    progress: Progress | None = None,
    source_root: str | None = None,
) -> IngestSummary:
    """Append the checkpoints of ``source`` that are not yet in the store.

    Parameters
    ----------
    source : path or str
        Folder of checkpoints (see :func:`cmdtool.checkpoints.discover`), or an
        object-store URL (``s3://bucket/run``): its listing is discovered by the same
        rules and each file read when its turn comes (:mod:`cmdtool.checkpoints.remote`).
    store_path : path
        The store; created on first use.
    pattern : str, optional
        Glob picking checkpoint files or folders.
    include, exclude : str, optional
        Regular expressions on tensor names; only matching (resp. non-matching) tensors
        are stored. Fixed when the store is created.
    stats_pattern : str, optional
        Regular expression (``re.search``) naming the normalization statistics among
        the floating tensors (``--stats-pattern``; default
        :data:`cmdtool.store.normstats.DEFAULT_STATS_PATTERN`). Fixed when the store is
        created; given explicitly, it must match at least one tensor.
    allow_nonfinite : bool
        Store NaN / Inf values instead of refusing the checkpoint.
    allow_globals : sequence of str
        Qualified names of pickled classes a torch/Lightning file may mention; they are
        replaced by inert placeholders (no code of theirs runs) and only tensors are used.
    readers : int
        Checkpoints read (and hashed) ahead on background threads while the current one
        is written; 0 reads each one only when its turn comes. Rows are always written
        in epoch order.
    labels : collection of int, optional
        Ingest only the checkpoints with these epoch labels (``cmdtool watch`` passes the
        ones whose files are complete); default all.
    label_by : {"step", "epoch"}
        How Hugging Face ``checkpoint-<step>/`` folders are labelled: by the step in the
        name (default), or by the whole epoch in their ``trainer_state.json``
        (``--labels``). Other checkpoints are labelled by the number in their names.
    state : {"raw", "averaged"}
        Lightning files holding both: the raw weights (``current_model_state``) or the
        averaged ones (``state_dict``) (``--state``).
    allow_expanded : bool
        Ingest stride-0 (expanded) or overlapping views at their full logical size
        instead of refusing them (``--allow-expanded``).
    max_params : int
        Refuse a checkpoint whose tensors hold more elements than this in all, counted
        logically (``--max-params``, default 2**34).
    max_tensors : int
        Refuse a checkpoint file holding more tensors than this (``--max-tensors``,
        default 100,000).
    progress : callable(done, total, label), optional
    source_root : str, optional
        The checkpoint folder the store records (default: ``source`` resolved; the URL
        for an object-store SOURCE).

    Returns
    -------
    IngestSummary

    Raises
    ------
    CmdtoolError
        Bad input (a checkpoint that does not match the store, non-finite values, an
        unreadable file): the epochs this call had already appended are rolled back, so
        the store is exactly as it was. An interruption (Ctrl-C, a crash) keeps the
        committed epochs; the next ingest resumes after them.
    """
    if source_is_url(str(source)):  # discover the listing, read each file when its turn comes
        kwargs = {k: v for k, v in locals().items() if k not in ("source", "store_path")}
        with mirror(str(source)) as tree:
            try:
                kwargs["source_root"] = source_root or str(tree.url)
                return ingest(tree.root, store_path, **kwargs)
            except CmdtoolError as exc:
                tree.rename_error(exc)
                raise
    t0 = time.perf_counter()
    if stats_pattern is not None:
        compile_stats_pattern(stats_pattern)  # a bad regex fails before anything is read
    limits = ReadLimits(allow_expanded, max_params, max_tensors)
    root = Path(source)
    found = find_checkpoints(root, pattern=pattern, labels=label_by)
    entries = found.entries
    if labels is not None:
        wanted = set(labels)
        entries = [e for e in entries if e.label in wanted]
    remote = is_url(str(store_path))  # an object-store URL stays text (Path folds "//")
    path: Any = str(store_path) if remote else Path(store_path)
    # a store an older cmdtool was killed creating is created anew (issue 11)
    exists = store_present(path)
    keep = _NameFilter(include, exclude)
    summary = IngestSummary(store=str(path), created=not exists, labels=found.labels)
    summary.skipped_files = [{"path": f.path, "reason": f.reason} for f in found.skipped]
    store: TrajectoryStore | None = None
    created_here = False
    existed_before = remote or path.exists()
    before: dict[str, Any] | None = None
    try:
        if exists:
            store = TrajectoryStore.open(path, mode="r+")
            before = store.snapshot()
            keep = _stored_filter(store, include, exclude)
            check_stored_pattern(store.path, store.filters, stats_pattern)
            summary.changed = _changed_since_commit(store, entries, root)
        have = set(store.labels) if store else set()
        todo = [e for e in entries if e.label not in have]
        summary.skipped = [e.label for e in entries if e.label in have]
        _check_relabelled(store, todo, root)
        if store is not None and todo and store.labels and todo[0].label < store.labels[-1]:
            e = todo[0]
            raise UsageError(
                f"{e.relpath(root)}: epoch {e.label} is older than the store's last epoch "
                f"{store.labels[-1]}; cmdtool only appends, ingest into a new store"
            )
        for done, (entry, print_) in enumerate(_read_ahead(todo, readers)):
            with open_checkpoint(
                entry, allow_globals=allow_globals, state=state, limits=limits
            ) as ckpt:
                if store is None:
                    aliases = find_aliases(entry, ckpt, keep)
                    params, extras = _layout_from(ckpt, keep, aliases)
                    if not params:
                        raise UsageError(
                            f"{entry.relpath(root)}: no floating-point tensor to model"
                            + (" after --include/--exclude" if include or exclude else "")
                        )
                    pattern = pattern_for_new_store(params, stats_pattern, entry.relpath(root))
                    store = create_store(
                        path,
                        params,
                        extras,
                        filters={"include": include, "exclude": exclude, "stats": pattern},
                        aliases=aliases,
                        order=[name for name in ckpt if keep(name)],  # the file's key order
                    )
                    created_here = True
                _append(store, entry, ckpt, keep, root, allow_nonfinite, print_, source_root)
                key = ckpt.state_key or "(top level)"
                summary.state_keys[key] = summary.state_keys.get(key, 0) + 1
            summary.added.append(entry.label)
            summary.bytes_written += store.n_params * 4 + store.extras_nbytes
            if progress is not None:
                progress(done + 1, len(todo), entry.relpath(root))
        if store is None:  # only when ``labels`` picked none of the entries
            raise SourceNotFoundError(
                f"{root}: no checkpoint with epoch label(s) {sorted(set(labels or ()))}"
            )
        summary.n_params = store.n_params
        pattern_now = stats_pattern_of(store.filters)[0]
        summary.stats = [t.name for t in match_stats(store.params, pattern_now)]
        summary.n_epochs = store.n_epochs
    except BaseException as exc:
        # an object store failing mid-run (network, access) is kept like an interruption:
        # the epochs committed stay, and the next ingest resumes after them
        bad_input = isinstance(exc, CmdtoolError) and not isinstance(exc, ObjectStoreError)
        if created_here and store is not None and (bad_input or store.n_epochs == 0):
            store.close()
            remove_store(path, keep_folder=existed_before)
        elif bad_input and store is not None and before is not None:
            store.rollback(before)
        raise
    finally:
        if store is not None:
            store.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_relabelled(
    store: TrajectoryStore | None, todo: list[CheckpointEntry], root: Path
) -> None:
    """A Hugging Face folder already in the store under another label (``--labels``
    changed between two ingests) would be appended a second time: refuse it."""
    if store is None:
        return
    ingested = {e.source: e.label for e in store.epochs if e.kind == "hf"}
    for entry in todo:
        old = ingested.get(entry.relpath(root)) if entry.kind == "hf" else None
        if old is not None:
            raise UsageError(
                f"{entry.relpath(root)} is already in the store as epoch {old} and would "
                f"now be epoch {entry.label}: ingest with the --labels used before"
            )


def _stored_filter(store: TrajectoryStore, include: str | None, exclude: str | None) -> _NameFilter:
    """The store's own --include/--exclude; other filters on re-ingest are an error."""
    stored = store.filters
    asked = {"include": include, "exclude": exclude}
    if (include or exclude) and asked != {k: stored.get(k) for k in asked}:
        raise UsageError(
            f"store {store.path} was created with include={stored.get('include')!r} "
            f"exclude={stored.get('exclude')!r}; re-ingest with the same filters or none"
        )
    return _NameFilter(stored.get("include"), stored.get("exclude"))
