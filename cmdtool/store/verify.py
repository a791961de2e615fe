"""``cmdtool verify``: read every committed chunk of a store and report what is damaged.

Each chunk is read once, one at a time per reader thread (no N x T in memory), and
checked as every read is (:meth:`CheckedLocalStore.chunk_problem`): present, of the
right size, matching its crc32c checksum, labels in range. The metadata is validated
first (:mod:`cmdtool.store.validate`); a store whose metadata fails is reported with
that one problem, its chunks cannot be located reliably.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import zarr

from cmdtool.errors import StoreError
from cmdtool.store.integrity import CheckedLocalStore, ChunkLayout
from cmdtool.store.layout import EXTRAS, POOL, POOL_INDEX, WEIGHTS
from cmdtool.store.trajectory import TrajectoryStore

#: Chunks read concurrently (each at most one chunk, 1 MiB by default, in memory).
READERS = 4
Progress = Callable[[int, int], None]


@dataclass
class VerifyReport:
    """What ``cmdtool verify`` found.

    Attributes
    ----------
    store : str
    format_version : int or None
        None when the metadata could not be read.
    checksummed : bool
        Every array carries crc32c (format v2): absent chunks are damage. In a format v1
        store an absent chunk is a chunk of zeros, and only chunk sizes can be checked.
    arrays, chunks, bytes_read : int
        What was checked.
    problems : list of str
        One line per damaged chunk or inconsistency, in reading order.
    seconds : float
    """

    store: str
    format_version: int | None = None
    checksummed: bool = False
    arrays: int = 0
    chunks: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def _chunk_keys(array: str, layout: ChunkLayout, rows: int | None) -> Iterator[str]:
    """Keys of the chunks of ``array`` holding its first ``rows`` rows (None: all)."""
    shape = list(layout.shape)
    if rows is not None:
        shape[0] = min(shape[0], rows)
    counts = [-(-s // c) for s, c in zip(shape, layout.chunk_shape, strict=True)]
    for coords in itertools.product(*(range(n) for n in counts)):
        yield f"{array}/c/" + "/".join(map(str, coords))


def verify(path: str | os.PathLike[str], progress: Progress | None = None) -> VerifyReport:
    """Read every committed chunk of the store at ``path`` and of its decompositions.

    Parameters
    ----------
    path : path
        The store.
    progress : callable(done, total), optional
        Called after each chunk.

    Returns
    -------
    VerifyReport
        ``ok`` when nothing is damaged.

    Raises
    ------
    StoreNotFoundError
        No store at ``path``.
    """
    t0 = time.perf_counter()
    report = VerifyReport(store=str(path))
    try:
        st = TrajectoryStore.open(path)
    except StoreError as exc:
        report.problems.append(str(exc))
        report.seconds = time.perf_counter() - t0
        return report
    with st:
        report.format_version = st.format_version
        checked = st._group.store
        assert isinstance(checked, CheckedLocalStore) or hasattr(checked, "url")
        checked = cast(CheckedLocalStore, checked)  # or store/objcheck's, with the same checks
        arrays: list[tuple[str, int | None]] = [
            (name, st.n_epochs if name != POOL_INDEX else None)
            for name in (WEIGHTS, POOL, EXTRAS, POOL_INDEX)
            if name in st._group
        ]
        for name in st.result_names():
            try:
                pin, group = st.pin_result(name)  # validates it against the store
            except StoreError as exc:
                report.problems.append(str(exc))
                continue
            members = sorted(k for k, v in group.members() if isinstance(v, zarr.Array))
            arrays.extend((f"{pin.folder}/{k}", None) for k in members)
        keys: list[str] = []
        checksummed = []
        for array, rows in arrays:
            layout = checked._layout(array)
            if layout is None:
                report.problems.append(f"array {array!r}: its zarr.json cannot be read")
                continue
            report.arrays += 1
            checksummed.append(layout.checksummed)
            keys.extend(_chunk_keys(array, layout, rows))
        report.checksummed = bool(checksummed) and all(checksummed)

        def check(key: str) -> tuple[int, str | None]:
            try:
                buf = checked.get_sync(key)  # checks the chunk; raises on damage
            except StoreError as exc:
                return 0, _problem_of(exc)
            return (0 if buf is None else len(buf)), None

        with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="cmdtool-verify") as pool:
            for i, (n, problem) in enumerate(pool.map(check, keys)):
                report.chunks += 1
                report.bytes_read += n
                if problem is not None:
                    report.problems.append(problem)
                if progress is not None:
                    progress(i + 1, len(keys))
    report.seconds = time.perf_counter() - t0
    return report


def _problem_of(exc: StoreError) -> str:
    """The chunk's problem without the store prefix and the advice to run verify."""
    text = str(exc)
    head = text.find(" is damaged: ")
    if head >= 0:
        text = text[head + len(" is damaged: ") :]
    return text.split("; run 'cmdtool verify", 1)[0]
