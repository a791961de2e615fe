"""Row writes of ``weights``: chunks encoded here, written concurrently, one batch ahead.

zarr-python's ``array[row, lo:hi] = values`` adds Python work per 1 MiB chunk on top of
the file write (selection, an asyncio hand-off per call, the codec pipeline's copies).
For the one layout cmdtool writes (float32, chunks ``(1, C)``,
codecs ``bytes`` little-endian + ``crc32c``, fill value 0) a chunk's stored bytes are
simply its C values (an edge chunk padded with zeros) followed by their CRC-32C, little
endian: :class:`RowWriter` builds exactly those bytes (one copy of the values) and hands
them to the array's own zarr store (``StorePath.set``, hence ``LocalStore.set``: the same
atomic temp-file-and-rename write, at the same keys, as zarr's). The store format is
unchanged; a test compares the chunk files with zarr's own.

Because the bytes are copied when a block is submitted, the caller may refill its buffer
while the block is being written: one batch is in flight while the next is built
(memory: two batches). Any other layout, and a block that covers a chunk only partly
(which needs zarr's read-modify-write), goes through zarr's ``__setitem__`` as before.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import pairwise
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from cmdtool.errors import StoreError
from cmdtool.store.integrity import chunk_layout

#: Threads of the zarr ``__setitem__`` path (other layouts, partly covered chunks).
SETITEM_THREADS = 8


def fast_layout(array: zarr.Array) -> bool:
    """Whether ``array``'s chunks can be encoded by :class:`RowWriter` itself: a 2-d
    float32 array chunked ``(1, C)``, codecs ``bytes`` (little endian) + ``crc32c``,
    fill value 0, default ``/`` chunk keys."""
    try:
        meta = array.metadata.to_dict()
    except Exception:  # zarr v2 metadata or anything unexpected: zarr writes it
        return False
    layout = chunk_layout(meta)
    return (
        layout is not None
        and layout.checksummed
        and layout.dtype == np.dtype("<f4")
        and len(layout.chunk_shape) == 2
        and layout.chunk_shape[0] == 1
        and isinstance(fill := meta.get("fill_value"), int | float)
        and fill == 0
        and not np.signbit(fill)
    )


def encode_chunk(values: np.ndarray, chunk: int, out: np.ndarray | None = None) -> np.ndarray:
    """The stored bytes of one chunk: ``values`` (float32, (n,), n <= chunk) padded with
    zeros to ``chunk`` values, then their CRC-32C as a little-endian uint32, written into
    ``out`` (uint8, (4 * chunk + 4,)) when given.

    Returns
    -------
    ndarray, uint8, shape (4 * chunk + 4,)
    """
    if out is None:
        out = np.empty(4 * chunk + 4, dtype=np.uint8)
    body = out[: 4 * chunk].view("<f4")
    n = values.shape[0]
    body[:n] = values
    body[n:] = 0.0
    crc = np.array([google_crc32c.value(out[: 4 * chunk])], dtype="<u4")
    out[4 * chunk :] = crc.view(np.uint8)
    return out


class RowWriter:
    """Writes row blocks of one 2-d array, one batch in flight while the next is built.

    Parameters
    ----------
    array : zarr.Array
        The (T, N) array, already resized to hold the rows written.
    where : str
        The store, as messages name it.
    """

    def __init__(self, array: zarr.Array, where: str) -> None:
        self.array = array
        self.where = where
        self.fast = fast_layout(array)
        self.chunk = int(array.chunks[1])
        self.n = int(array.shape[1])
        self._batch: ThreadPoolExecutor | None = None
        self._setitem: ThreadPoolExecutor | None = None
        self._pending: Future[list[BaseException | None]] | None = None
        self._bufs: list[np.ndarray | None] = [None, None]
        self._turn = 0

    # ----------------------------------------------------------------- public
    def submit(self, row: int, start: int, values: np.ndarray) -> None:
        """Start writing ``values`` (float32, (n,)) at columns ``start : start + n`` of
        ``row``; the caller may reuse ``values`` as soon as this returns. Raises the
        failure of the previous batch, if any (a StoreError for an OSError)."""
        stop = start + values.shape[0]
        bounds = [*range(start, stop, self.chunk), stop]
        pieces = list(pairwise(bounds))
        whole = all(self._whole(lo, hi) for lo, hi in pieces)
        if not (self.fast and whole):
            self.wait()
            self._write_setitem(row, start, values, pieces)
            return
        c = self.chunk
        # two sets of chunk buffers, used in turn: the other set may still be in flight
        self._turn ^= 1
        bufs = self._bufs[self._turn]
        if bufs is None or bufs.shape[0] < len(pieces):
            bufs = self._bufs[self._turn] = np.empty((len(pieces), 4 * c + 4), dtype=np.uint8)
        encoded = [
            (f"c/{row}/{lo // c}", encode_chunk(values[lo - start : hi - start], c, bufs[k]))
            for k, (lo, hi) in enumerate(pieces)
        ]
        self.wait()  # the previous batch: at most one in flight while this one was built
        if self._batch is None:
            self._batch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cmdtool-write")
        self._pending = self._batch.submit(self._write_batch, encoded)

    def write(self, row: int, start: int, values: np.ndarray) -> None:
        """:meth:`submit`, then :meth:`wait`."""
        self.submit(row, start, values)
        self.wait()

    def wait(self) -> None:
        """Wait until every chunk submitted has been written or has failed; raise the
        first failure (a StoreError for an OSError)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._raise_first(pending.result())

    def drain(self) -> None:
        """Wait for the writes in flight, ignoring their failures (the row is about to be
        dropped: no write may land after that)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()

    def close(self) -> None:
        self.drain()
        for pool in (self._batch, self._setitem):
            if pool is not None:
                pool.shutdown()
        self._batch = self._setitem = None

    # ---------------------------------------------------------------- private
    def _whole(self, lo: int, hi: int) -> bool:
        """Whether ``[lo, hi)`` is one whole chunk (the edge chunk: up to N)."""
        return lo % self.chunk == 0 and hi == min(lo + self.chunk, self.n)

    def _write_batch(self, encoded: list[tuple[str, np.ndarray]]) -> list[BaseException | None]:
        """Write the encoded chunks concurrently on zarr's event loop; every write has
        finished (written or failed) on return."""
        store_path = self.array.store_path
        proto = default_buffer_prototype()

        async def put_all() -> list[Any]:
            puts = [(store_path / key).set(proto.buffer.from_array_like(b)) for key, b in encoded]
            return await asyncio.gather(*puts, return_exceptions=True)

        return [e if isinstance(e, BaseException) else None for e in sync(put_all())]

    def _write_setitem(
        self, row: int, start: int, values: np.ndarray, pieces: list[tuple[int, int]]
    ) -> None:
        """zarr's own write of each chunk-sized piece (concurrently; all finished on
        return: zarr's concurrent write raises at the first failure while other chunk
        writes are still in flight, which could land after the caller rolled back)."""
        if self._setitem is None:
            self._setitem = ThreadPoolExecutor(
                max_workers=SETITEM_THREADS, thread_name_prefix="cmdtool-setitem"
            )

        def put(lo: int, hi: int) -> None:
            self.array[row, lo:hi] = values[lo - start : hi - start]

        done = [self._setitem.submit(put, lo, hi) for lo, hi in pieces]
        self._raise_first([f.exception() for f in done])

    def _raise_first(self, errors: list[BaseException | None]) -> None:
        first = next((e for e in errors if e is not None), None)
        if isinstance(first, OSError):
            why = first.strerror or first
            raise StoreError(f"cannot write store {self.where}: {why}") from first
        if first is not None:
            raise first
