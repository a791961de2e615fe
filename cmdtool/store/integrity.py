"""Integrity of the stored data: checksummed arrays, and reads that refuse damage.

Format v2 (``docs/design.md``, "The store format"): every array cmdtool writes carries
zarr v3's ``crc32c`` codec (a 4-byte CRC-32C after each chunk, which plain zarr checks
too), and every chunk is written, zeros included (zarr's ``write_empty_chunks``), so a
chunk file that is absent where the array's shape says there is one is damage, never a
run of zeros.

Readers go through :class:`CheckedLocalStore`, a zarr ``LocalStore`` whose ``get``
checks each chunk before zarr decodes it: present (for a checksummed array), of the size
its codecs give, with a matching CRC, and, for a decomposition's ``labels``, every value
in ``[0, M)``. A failure is a :class:`~cmdtool.errors.StoreError` (exit 6) naming the
array and the chunk. The checks cost one ``stat`` of the array's ``zarr.json`` and one
CRC per chunk read (measured in BENCHMARKS.md, "Checksums (issue 11)").
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c  # a dependency of zarr >= 3 (its crc32c codec)
import numpy as np
import zarr
import zarr.storage
from zarr.abc.store import ByteRequest
from zarr.codecs import Crc32cCodec
from zarr.core.array_spec import ArrayConfigParams
from zarr.core.buffer import Buffer, BufferPrototype

from cmdtool.errors import StoreError

#: Whether new arrays get the ``crc32c`` codec. A switch for ``scripts/bench_checksum.py``
#: only (it measures the checksum's cost): with it off, ``TrajectoryStore.create`` writes
#: a format-v1 store (no checksum, so no missing-chunk check either).
CHECKSUM = True
#: Array config of every array cmdtool writes: chunks equal to the fill value are
#: written too, so that an absent chunk can only mean damage.
WRITE_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}
_CHUNK_KEY = re.compile(r"^(?P<array>.+)/c(?P<coords>(?:/\d+)+)$")


Describe = Callable[[str, tuple[int, ...], "ChunkLayout"], str]


def compressors() -> list[Crc32cCodec]:
    """The bytes-to-bytes codecs of a new array: ``[crc32c]``."""
    return [Crc32cCodec()] if CHECKSUM else []


def create_array(
    group: zarr.Group,
    name: str,
    *,
    shape: tuple[int, ...] | None = None,
    chunks: tuple[int, ...] | None = None,
    dtype: str | None = None,
    data: np.ndarray | None = None,
    fill_value: Any = 0,
) -> zarr.Array:
    """Create array ``name`` in ``group`` the way format v2 requires: little-endian,
    crc32c-checksummed, every chunk written (either ``shape``/``chunks``/``dtype``, or
    ``data`` for a small array written at once)."""
    if data is not None:
        return group.create_array(name, data=data, compressors=compressors(), config=WRITE_CONFIG)
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks or "auto",
        dtype=dtype,
        fill_value=fill_value,
        compressors=compressors(),
        config=WRITE_CONFIG,
    )


def writable(array: zarr.Array) -> zarr.Array:
    """``array`` configured to write every chunk, zeros included (zarr's default skips
    chunks equal to the fill value; format v2 needs each one present)."""
    return array.with_config(WRITE_CONFIG)


@dataclass(frozen=True)
class ChunkLayout:
    """What one array's chunk files must look like, from its ``zarr.json``.

    Attributes
    ----------
    checksummed : bool
        The last codec is ``crc32c``: every chunk ends with its CRC-32C, and (cmdtool
        writes such arrays with ``write_empty_chunks``) every chunk must exist.
    nbytes : int or None
        Exact size of a chunk file, when the codecs are ``bytes`` (+ ``crc32c``) only.
    dtype : numpy dtype or None
        Element type of an uncompressed chunk (None when compressed).
    chunk_shape : tuple of int
    shape : tuple of int
    """

    checksummed: bool
    nbytes: int | None
    dtype: np.dtype[Any] | None
    chunk_shape: tuple[int, ...]
    shape: tuple[int, ...]


def chunk_layout(meta: dict[str, Any]) -> ChunkLayout | None:
    """The :class:`ChunkLayout` of an array's parsed ``zarr.json``; None for anything this
    module does not know (a group, another chunk grid or key encoding)."""
    try:
        if meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
            return None
        grid = meta["chunk_grid"]
        keys = meta["chunk_key_encoding"]
        if grid.get("name") != "regular" or keys.get("name") != "default":
            return None
        if keys.get("configuration", {}).get("separator", "/") != "/":
            return None
        chunk_shape = tuple(int(c) for c in grid["configuration"]["chunk_shape"])
        shape = tuple(int(s) for s in meta["shape"])
        names = [c["name"] if isinstance(c, dict) else c for c in meta["codecs"]]
        checksummed = bool(names) and names[-1] == "crc32c"
        nbytes = None
        dtype = None
        if names in (["bytes"], ["bytes", "crc32c"]) and isinstance(meta["data_type"], str):
            endian = (meta["codecs"][0].get("configuration") or {}).get("endian", "little")
            dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
            nbytes = int(np.prod(chunk_shape, dtype=np.int64)) * dtype.itemsize
            nbytes += 4 if checksummed else 0
        return ChunkLayout(checksummed, nbytes, dtype, chunk_shape, shape)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def crc_ok(raw: np.ndarray) -> bool:
    """Whether the bytes of a crc32c-coded chunk (uint8, (n + 4,)) end with the CRC-32C
    of the first n, as zarr's codec writes it (little-endian uint32)."""
    if raw.shape[0] < 4:
        return False
    want = np.uint32(google_crc32c.value(np.ascontiguousarray(raw[:-4])))
    return bool(want.tobytes() == raw[-4:].tobytes())


class CheckedLocalStore(zarr.storage.LocalStore):
    """A zarr ``LocalStore`` that refuses to hand out a damaged chunk.

    For a key ``<array>/c/<i>/<j>...`` of an array this module knows
    (:func:`chunk_layout`), ``get`` raises a :class:`~cmdtool.errors.StoreError` naming
    the array and chunk when the chunk is missing (checksummed arrays only: in a format v1
    array an absent chunk is a chunk of zeros), has the wrong size, fails its CRC, or,
    for a decomposition's ``labels``, holds a label outside ``[0, M)``. Metadata and
    other keys are read as ``LocalStore`` reads them; writes are unchanged.
    """

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self._layouts: dict[str, tuple[tuple[int, int, int], ChunkLayout | None]] = {}
        #: Optional ``describe(array, coords, layout)`` adding context to a chunk's name
        #: in messages (the store sets it: which epoch, which columns).
        self.describe: Describe | None = None

    # ------------------------------------------------------------- the checks
    def _layout(self, array: str) -> ChunkLayout | None:
        meta_path = self.root / array / "zarr.json"
        try:
            st = os.stat(meta_path)
        except OSError:
            return None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._layouts.get(array)
        if cached is not None and cached[0] == sig:
            return cached[1]
        try:
            layout = chunk_layout(json.loads(meta_path.read_bytes()))
        except (OSError, ValueError):
            layout = None
        self._layouts[array] = (sig, layout)
        return layout

    def _n_modes(self, array: str) -> int | None:
        """M for ``<group>/labels`` of a results group: the length of ``ref_index``."""
        group, _, leaf = array.rpartition("/")
        if leaf != "labels":
            return None
        ref = self._layout(f"{group}/ref_index" if group else "ref_index")
        return None if ref is None or len(ref.shape) != 1 else ref.shape[0]

    def chunk_problem(self, key: str, buf: Buffer | None) -> str | None:
        """What is wrong with ``buf``, the bytes read for ``key`` (None: absent), as a
        chunk of its array ("chunk (3, 1) of 'weights' ... is missing"); None when it is
        sound or ``key`` is not a chunk of an array this module knows."""
        m = _CHUNK_KEY.match(key)
        if m is None:
            return None
        array = m["array"]
        layout = self._layout(array)
        if layout is None:
            return None
        coords = tuple(int(c) for c in m["coords"].strip("/").split("/"))
        if len(coords) != len(layout.chunk_shape):
            return None
        where = f"chunk {_coords(coords)} of {array!r}"
        if self.describe is not None:
            where += self.describe(array, coords, layout)
        where += f" (file {key})"
        if buf is None:
            return f"{where} is missing" if layout.checksummed else None
        raw = buf.as_numpy_array()
        if layout.nbytes is not None and raw.shape[0] != layout.nbytes:
            return f"{where} has {raw.shape[0]} bytes, {layout.nbytes} expected"
        if layout.checksummed and not crc_ok(raw):
            return f"{where} fails its crc32c checksum"
        m_modes = self._n_modes(array)
        if m_modes is not None and layout.dtype is not None and layout.dtype.kind == "i":
            body = raw[: raw.shape[0] - (4 if layout.checksummed else 0)]
            labels = body.view(layout.dtype)
            if labels.size:
                lo, hi = int(labels.min()), int(labels.max())
                if lo < 0 or hi >= m_modes:
                    bad = lo if lo < 0 else hi
                    return (
                        f"{where} holds label {bad}, outside [0, {m_modes}) "
                        f"({m_modes} modes in 'ref_index')"
                    )
        return None

    def check_chunk(self, key: str, buf: Buffer | None) -> None:
        """Raise a StoreError when :meth:`chunk_problem` finds one."""
        problem = self.chunk_problem(key, buf)
        if problem is not None:
            raise self._damaged(problem)

    def _unreadable(self, key: str, exc: OSError) -> StoreError:
        return StoreError(f"cannot read store {self.root} ({key}): {exc.strerror or exc}")

    def _damaged(self, what: str) -> StoreError:
        return StoreError(
            f"store {self.root} is damaged: {what}; run 'cmdtool verify {self.root}' "
            "to list all damage"
        )

    # ------------------------------------------------------------ zarr's API
    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        try:
            buf = await super().get(key, prototype, byte_range)
        except OSError as exc:
            raise self._unreadable(key, exc) from exc
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
        try:
            buf = super().get_sync(key, prototype=prototype, byte_range=byte_range)
        except OSError as exc:
            raise self._unreadable(key, exc) from exc
        if byte_range is None:
            self.check_chunk(key, buf)
        return buf


def describe_rows(labels: Callable[[], list[int]], n_params: int) -> Describe:
    """A :attr:`CheckedLocalStore.describe` for a trajectory store: which epoch (of the
    committed ``labels()``) and columns a chunk of ``weights``/``pool``/``extras`` holds,
    which parameters a chunk of a per-parameter result array holds."""

    def describe(array: str, coords: tuple[int, ...], layout: ChunkLayout) -> str:
        if len(coords) == 2 and array in ("weights", "pool", "extras"):
            row, committed = coords[0], labels()
            epoch = f"epoch {committed[row]}" if row < len(committed) else "uncommitted"
            lo = coords[1] * layout.chunk_shape[1]
            hi = min(lo + layout.chunk_shape[1], layout.shape[1]) - 1
            what = {"weights": "columns", "pool": "pool columns", "extras": "bytes"}[array]
            return f" ({epoch}, row {row}; {what} {lo}..{hi})"
        if len(coords) == 1 and layout.shape and layout.shape[0] == n_params:
            lo = coords[0] * layout.chunk_shape[0]
            return f" (parameters {lo}..{min(lo + layout.chunk_shape[0], n_params) - 1})"
        return ""

    return describe


def _coords(coords: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, coords)) + ")" if len(coords) != 1 else f"({coords[0]},)"
