"""Which codec pipeline reads the store's column blocks: zarrs when it can, else zarr-python.

The zarrs codec pipeline (``pip install zarrs``, a Rust implementation that zarr-python
accepts as its codec pipeline) reads the very same zarr v3 chunks as zarr-python, 1.3-4x
faster (README, "Performance"). cmdtool uses it for the one hot read, the column blocks
of ``weights`` (:meth:`TrajectoryStore.read_block`); everything else (writes, metadata,
results, pool, extras) stays on zarr-python, so the store on disk is unchanged: a plain
zarr v3 store that zarr-python, xarray and dask open as before.

Integrity is kept whole. zarrs reads the chunk files itself, bypassing
:class:`~cmdtool.store.integrity.CheckedLocalStore`, so :class:`FastReader` adds what
zarrs does not do and defers to the checked path for everything else:

- zarrs checks every chunk's ``crc32c`` (``validate_checksums``, on by default) and a
  chunk of the wrong size fails that check too;
- zarrs reads an absent chunk as the fill value, so for a checksummed array every chunk
  file of the block is ``stat``-ed first (about 3% of the read's time under load);
- any failure (a missing chunk, a bad CRC, zarrs raising anything) hands the read to the
  checked zarr-python path, which raises the usual :class:`~cmdtool.errors.StoreError`
  naming the array, epoch and columns; if that read succeeds, zarrs is broken here: it is
  switched off for the process, with one notice on stderr;
- the first block read in a process is read both ways and compared (one row): a zarrs
  that returns other numbers is switched off the same way, never trusted.

Selection (:func:`choice`): the environment variable ``CMDTOOL_CODEC_PIPELINE`` is
``auto`` (default: zarrs if it imports and supports the array, else zarr-python, with one
notice on stderr), ``zarrs`` (the same, the notice says it was asked for) or
``zarr-python`` (never zarrs, no notice). ``info --json`` reports the choice.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage

#: The environment variable that selects the pipeline: auto, zarrs or zarr-python.
ENV = "CMDTOOL_CODEC_PIPELINE"
ZARRS = "zarrs"
ZARR_PYTHON = "zarr-python"


@dataclass
class _State:
    name: str | None = None  # the pipeline in use, once decided
    reason: str = ""
    noticed: bool = False
    verified: bool = False  # the first zarrs read was compared with zarr-python's


_STATE = _State()
_LOCK = threading.Lock()


def _notice(reason: str) -> None:
    """One line on stderr, once per process."""
    if not _STATE.noticed:
        _STATE.noticed = True
        print(f"cmdtool: notice: {reason}; using zarr-python's codec pipeline", file=sys.stderr)


def _decide() -> tuple[str, str]:
    wanted = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if wanted in ("zarr-python", "zarr", "python", "off"):
        return ZARR_PYTHON, f"{ENV}={wanted}"
    if wanted not in ("auto", "zarrs"):
        _notice(f"{ENV}={wanted!r} is not auto, zarrs or zarr-python")
        return ZARR_PYTHON, f"{ENV}={wanted!r} not understood"
    try:
        import zarrs  # noqa: F401  # the Rust extension loads here
    except Exception as exc:  # not installed, or a broken installation
        reason = f"zarrs is not available ({type(exc).__name__}: {exc})"
        _notice(reason)
        return ZARR_PYTHON, reason
    return ZARRS, "zarrs imported"


def choice() -> tuple[str, str]:
    """The pipeline this process reads ``weights`` with, and why.

    Returns
    -------
    (str, str)
        ``("zarrs" | "zarr-python", reason)``.
    """
    with _LOCK:
        if _STATE.name is None:
            _STATE.name, _STATE.reason = _decide()
        return _STATE.name, _STATE.reason


def disable(reason: str) -> None:
    """Stop using zarrs in this process (one notice on stderr)."""
    with _LOCK:
        _STATE.name, _STATE.reason = ZARR_PYTHON, reason
        _notice(reason)


def reset() -> None:
    """Forget the decision (tests, and :mod:`scripts/bench.py`, which switch it)."""
    with _LOCK:
        _STATE.name, _STATE.reason, _STATE.noticed, _STATE.verified = None, "", False, False


def open_zarrs_array(root: Path, name: str) -> zarr.Array:
    """Array ``name`` of the store at ``root``, read-only, read through zarrs.

    Raises
    ------
    RuntimeError
        zarrs does not support this array (its codecs or data type).
    """
    from zarrs import ZarrsCodecPipeline

    store = zarr.storage.LocalStore(root, read_only=True)
    array = zarr.open_array(store, path=name, mode="r")
    inner = array._async_array
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unsupported" comes back as impl None below
        pipe = ZarrsCodecPipeline.from_array_metadata_and_store(
            inner.metadata, inner.store_path.store
        )
    if getattr(pipe, "impl", None) is None:
        raise RuntimeError(f"zarrs does not support array {name!r}")
    # this array object only: zarr's config (``codec_pipeline.path``) is process-wide
    object.__setattr__(inner, "codec_pipeline", pipe)
    return array


class FastReader:
    """Column blocks of one 2-d array (``weights``) read through zarrs, checked.

    Parameters
    ----------
    root : Path
        The store folder.
    name : str
        The array (chunk keys ``<name>/c/<row>/<col>``).
    checksummed : bool
        The array carries ``crc32c``: every chunk must exist (format v2).
    chunk : int
        Chunk width along the columns.
    """

    def __init__(self, root: Path, name: str, *, checksummed: bool, chunk: int) -> None:
        self.root = root
        self.name = name
        self.checksummed = checksummed
        self.chunk = chunk
        self.array = open_zarrs_array(root, name)
        self.shape: tuple[int, ...] = tuple(self.array.shape)

    def _all_present(self, rows: np.ndarray, start: int, stop: int) -> bool:
        base = os.path.join(self.root, self.name, "c")
        cols = range(start // self.chunk, (stop - 1) // self.chunk + 1)
        try:
            for r in rows.tolist():
                for j in cols:
                    os.stat(f"{base}/{r}/{j}")
        except OSError:
            return False
        return True

    def read(
        self, rows: np.ndarray, start: int, stop: int, checked: Callable[[np.ndarray], np.ndarray]
    ) -> np.ndarray:
        """Columns ``start:stop`` of ``rows`` (int64, contiguous and increasing).

        ``checked(rows)`` reads columns ``start:stop`` of ``rows`` through zarr-python and
        the checked store: it serves every case zarrs cannot (and raises the StoreError
        that names damage).

        Returns
        -------
        ndarray, float32, shape (len(rows), stop - start)
        """
        if self.checksummed and not self._all_present(rows, start, stop):
            return checked(rows)  # raises the "chunk ... is missing" StoreError
        try:
            out = np.asarray(self.array[int(rows[0]) : int(rows[-1]) + 1, start:stop])
        except Exception as exc:
            good = checked(rows)  # damage raises here, naming the chunk
            disable(f"zarrs failed to read {self.name!r} where zarr-python did not ({exc})")
            return good
        if not _STATE.verified:
            _STATE.verified = True
            ref = checked(rows[:1])
            if not np.array_equal(out[:1].view(np.uint32), ref.view(np.uint32)):
                disable("zarrs read other values than zarr-python (first block)")
                return checked(rows)
        return out


def reader_for(store: Any) -> FastReader | None:
    """The :class:`FastReader` of a trajectory store's ``weights``, or None where zarrs is
    not used (not chosen, not supported, or not a local store). Cached on ``store``, and
    opened again when ``weights`` has grown since.

    Parameters
    ----------
    store : TrajectoryStore
        Duck-typed: ``path``, ``weights`` (zarr.Array), ``chunk`` and ``_group``.
    """
    from cmdtool.store.integrity import CheckedLocalStore, chunk_layout

    if choice()[0] != ZARRS or not isinstance(store._group.store, CheckedLocalStore):
        return None
    shape = tuple(store.weights.shape)
    cached = getattr(store, "_fast_reader", None)
    if isinstance(cached, FastReader) and cached.shape == shape:
        return cached
    layout = chunk_layout(store.weights.metadata.to_dict())
    try:
        reader = FastReader(
            Path(store.path),
            "weights",
            checksummed=bool(layout and layout.checksummed),
            chunk=int(store.chunk),
        )
    except Exception as exc:  # zarrs cannot open it (unsupported codec, broken install)
        disable(f"zarrs cannot read this store's weights ({exc})")
        return None
    if reader.shape != shape:  # the folder changed under us: leave it to zarr-python
        return None
    store._fast_reader = reader
    return reader


def describe(store: Any) -> dict[str, str]:
    """What ``info --json`` says of the codec pipelines for ``store`` (a TrajectoryStore).

    Returns
    -------
    dict
        ``reads`` (the pipeline that reads ``weights``' column blocks: ``zarrs`` or
        ``zarr-python``), ``writes`` (always ``zarr-python``: zarrs wrote no faster, see
        the README) and ``reason``.
    """
    reads = ZARRS if reader_for(store) is not None else ZARR_PYTHON
    name, reason = choice()
    if name == ZARRS and reads != ZARRS:
        reason = "not a local store" if _STATE.name == ZARRS else _STATE.reason
    return {"reads": reads, "writes": ZARR_PYTHON, "reason": reason}
