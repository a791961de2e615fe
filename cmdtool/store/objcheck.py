"""Checked reads for stores on object storage: :class:`CheckedObjectStore`."""

from __future__ import annotations

import json
from typing import Any

import zarr.storage
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync

from cmdtool.errors import StoreError
from cmdtool.store.integrity import CheckedLocalStore, ChunkLayout, Describe, chunk_layout
from cmdtool.store.objects import obstore_for, translate


class CheckedObjectStore(zarr.storage.ObjectStore):  # type: ignore[type-arg]
    """A zarr ``ObjectStore`` at a URL with the chunk checks of ``CheckedLocalStore``.

    Array layouts are read from each array's ``zarr.json`` once per process: what the
    checks use of them (codecs, chunk shape, the length of a results group's
    ``ref_index``) never changes for a given array (a version folder is written once).
    Any other failure of the object store becomes a one-line cmdtool error naming the URL.
    """

    def __init__(self, url: str, *, read_only: bool) -> None:
        super().__init__(obstore_for(url), read_only=read_only)
        self.url = url
        self.describe: Describe | None = None
        self._layouts: dict[str, ChunkLayout | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "read_only": self.read_only}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], read_only=state["read_only"])  # type: ignore[misc]

    @property
    def root(self) -> str:
        return self.url

    def _layout(self, array: str) -> ChunkLayout | None:
        if array in self._layouts:
            return self._layouts[array]
        import obstore

        try:
            raw = bytes(obstore.get(self.store, f"{array}/zarr.json").bytes())
            layout = chunk_layout(json.loads(raw))
        except FileNotFoundError:
            return None
        except ValueError:
            layout = None
        self._layouts[array] = layout
        return layout

    # the checks themselves are CheckedLocalStore's (they only call _layout and describe)
    _n_modes = CheckedLocalStore._n_modes
    chunk_problem = CheckedLocalStore.chunk_problem
    _damaged = CheckedLocalStore._damaged

    def check_chunk(self, key: str, buf: Buffer | None) -> None:
        """Raise a StoreError when :meth:`chunk_problem` finds one."""
        problem = self.chunk_problem(key, buf)  # type: ignore[misc]
        if problem is not None:
            raise self._damaged(problem)  # type: ignore[misc]

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        try:
            buf = await super().get(key, prototype or default_buffer_prototype(), byte_range)
        except StoreError:
            raise
        except Exception as exc:
            raise translate(exc, self.url) from exc
        if byte_range is None:
            self.check_chunk(key, buf)
        return buf

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        return sync(self.get(key, prototype, byte_range))  # type: ignore[no-any-return]


def zarr_store(url: str, *, read_only: bool) -> CheckedObjectStore:
    """zarr's ``ObjectStore`` at ``url`` with cmdtool's chunk checks."""
    return CheckedObjectStore(url, read_only=read_only)
