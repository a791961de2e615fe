"""``cmdtool upgrade``: rewrite a format-v1 store as format v2, in place and crash-safe.

Format v2 differs from v1 only in how arrays are written: the crc32c codec on every
chunk and every chunk present, zeros included. Upgrading rewrites each array that lacks
the checksum: its values (committed rows only; an absent v1 chunk is a chunk of zeros)
are copied into a new array ``.upgrade-<name>`` beside it, which then takes its place
(the old one is renamed ``.upgrade-old-<name>`` first and deleted after). The
``format_version`` is raised to 2 last, in one atomic rewrite of ``zarr.json``. A killed
upgrade leaves a valid v1 store (some arrays already checksummed); the next writer
(:func:`cmdtool.store.cleanup.recover_upgrade`) puts back an array caught between the two
renames, deletes the half-made copies, and ``cmdtool upgrade`` goes on where it stopped.
It needs free disk space for one copy of the largest array (``weights``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zarr

from cmdtool.errors import CmdtoolError, StoreError
from cmdtool.store.cleanup import UPGRADE_OLD_PREFIX, UPGRADE_PREFIX
from cmdtool.store.integrity import create_array
from cmdtool.store.layout import ATTR, EXTRAS, FORMAT_VERSION, POOL, POOL_INDEX, WEIGHTS
from cmdtool.store.trajectory import TrajectoryStore

#: Chunks copied per zarr call along the last axis (a 16 MiB buffer for ``weights``).
COPY_CHUNKS = 16
Progress = Callable[[int, int, str], None]


@dataclass
class UpgradeSummary:
    """What ``cmdtool upgrade`` did: ``arrays`` rewritten (none when the store was already
    of the current format), ``bytes_written`` of chunk data."""

    store: str
    from_version: int
    to_version: int
    arrays: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0


def upgrade(path: str | os.PathLike[str], progress: Progress | None = None) -> UpgradeSummary:
    """Rewrite the store at ``path`` (and its decompositions) in format v2.

    Parameters
    ----------
    path : path
        A store of format version 1 (a store already of version 2 is left as it is).
    progress : callable(done, total, array), optional

    Returns
    -------
    UpgradeSummary

    Raises
    ------
    StoreError
        The store is being written by another process, or cannot be written (a full
        disk): what was rewritten stays, the store stays a valid v1 store, and running
        the command again continues.
    """
    t0 = time.perf_counter()
    with TrajectoryStore.open(path, mode="r+") as st:
        summary = UpgradeSummary(str(st.path), st.format_version, st.format_version)
        if st.format_version >= FORMAT_VERSION:
            return summary
        names = [n for n in (WEIGHTS, POOL, EXTRAS, POOL_INDEX) if n in st._group]
        for result in st.result_names():
            pin, group = st.pin_result(result)
            names.extend(
                f"{pin.folder}/{k}" for k, v in sorted(group.members()) if isinstance(v, zarr.Array)
            )
        try:
            for i, name in enumerate(names):
                written = _rewrite(st, name)
                if written is not None:
                    summary.arrays.append(name)
                    summary.bytes_written += written
                if progress is not None:
                    progress(i + 1, len(names), name)
            meta = {**st._meta, "format_version": FORMAT_VERSION}
            st._group.attrs.put({**st._group.attrs.asdict(), ATTR: meta})
        except CmdtoolError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot write store {st.path}: {exc.strerror or exc}") from exc
        st._meta = meta
        st.format_version = FORMAT_VERSION
        summary.to_version = FORMAT_VERSION
    summary.seconds = time.perf_counter() - t0
    return summary


def _rewrite(st: TrajectoryStore, name: str) -> int | None:
    """Copy array ``name`` (a path in the store) into a checksummed twin and swap them;
    the bytes written, or None when it already has the checksum."""
    src = st._group[name]
    assert isinstance(src, zarr.Array)
    codecs = [c.get("name") for c in src.metadata.to_dict().get("codecs", [])]  # type: ignore[union-attr]
    if codecs and codecs[-1] == "crc32c":
        return None
    parent_name, _, leaf = name.rpartition("/")
    parent = st._group[parent_name] if parent_name else st._group
    assert isinstance(parent, zarr.Group)
    folder = st.path / parent_name if parent_name else st.path
    twin = folder / (UPGRADE_PREFIX + leaf)
    shutil.rmtree(twin, ignore_errors=True)
    dst = create_array(
        parent,
        UPGRADE_PREFIX + leaf,
        shape=src.shape,
        chunks=src.chunks,
        dtype=str(src.dtype),
        fill_value=src.fill_value,
    )
    if src.attrs.asdict():
        dst.attrs.put(src.attrs.asdict())
    written = 0
    width = src.chunks[-1] * COPY_CHUNKS
    if src.ndim == 1:
        for lo in range(0, src.shape[0], width):
            block = src[lo : lo + width]
            dst[lo : lo + width] = block
            written += block.nbytes  # type: ignore[union-attr]
    else:
        assert src.ndim == 2
        for row in range(src.shape[0]):
            for lo in range(0, src.shape[1], width):
                block = src[row, lo : lo + width]
                dst[row, lo : lo + width] = block
                written += block.nbytes  # type: ignore[union-attr]
    old = folder / (UPGRADE_OLD_PREFIX + leaf)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder / leaf, old)
    os.replace(twin, folder / leaf)
    shutil.rmtree(old, ignore_errors=True)
    return written
