"""Validation of a store's metadata against the arrays it describes, on every open.

A store whose ``zarr.json`` attributes were damaged or tampered with (offsets that
overlap, shapes that do not add up to N, a ``weights`` array of another dtype or byte
order, a decomposition whose arrays have the wrong length or indexes out of range) is
refused with one :class:`~cmdtool.errors.StoreError` (exit 6) naming the first
inconsistency: the field, its value and what was expected. Only metadata and the small
index arrays (``pool_index``, ``ref_index``, ``sample_index``) are read; the labels of
a decomposition are range-checked chunk by chunk as they are read
(:class:`~cmdtool.store.integrity.CheckedLocalStore`), and everything by ``cmdtool
verify``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import zarr

from cmdtool.errors import StoreError
from cmdtool.store.layout import (
    EXTRAS,
    FORMAT_VERSION,
    POOL,
    POOL_INDEX,
    RESULT_ATTR,
    RESULT_COLUMNS,
    WEIGHTS,
)

#: Source dtypes (torch names) a modeled tensor may have, with their bytes per element.
FLOAT_DTYPES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
}
#: dtypes (torch names) of non-floating tensors kept as raw bytes in ``extras``.
EXTRA_DTYPES = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "qint8": 1,
    "quint8": 1,
    "qint32": 4,
    "quint4x2": 1,
    "quint2x4": 1,
    "bits8": 1,
    "bits16": 2,
    "bits1x8": 1,
    "bits2x4": 1,
    "bits4x2": 1,
}
#: zarr data type of each array of the format (results groups: RESULT_COLUMNS and these).
RESULT_SMALL = {"ref_index": "int64", "ref_traj": "float32", "sample_index": "int64"}


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def check_format_version(meta: dict[str, Any], path: Path) -> int:
    """The store's ``format_version``: a positive int (not a bool) <= FORMAT_VERSION."""
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        raise StoreError(
            f"store {path} has corrupt metadata: format_version {version!r} is not a "
            f"positive integer (this cmdtool reads versions 1 to {FORMAT_VERSION})"
        )
    if version > FORMAT_VERSION:
        raise StoreError(
            f"store {path} has format_version {version}, this cmdtool reads "
            f"version {FORMAT_VERSION}; upgrade cmdtool"
        )
    return int(version)


class _Checker:
    """Collects the context of one store's checks; ``fail`` raises the one error."""

    def __init__(self, path: Path, what: str = "") -> None:
        self.path = path
        self.what = what

    def fail(self, detail: str) -> StoreError:
        return StoreError(f"store {self.path} has inconsistent metadata: {self.what}{detail}")

    def array(
        self,
        group: zarr.Group,
        name: str,
        dtype: str,
        ndim: int,
        checksum: bool,
    ) -> zarr.Array:
        """The array ``name`` of ``group``: of zarr dtype ``dtype``, little-endian, ``ndim``
        dimensions, and crc32c-checksummed when ``checksum``."""
        try:
            node = group[name]
        except KeyError:
            raise self.fail(f"array {name!r} is missing") from None
        except Exception as exc:  # zarr's own parse errors of a damaged zarr.json
            raise self.fail(f"array {name!r} has unreadable metadata ({exc})") from exc
        if not isinstance(node, zarr.Array):
            raise self.fail(f"{name!r} is a group, an array was expected")
        meta: dict[str, Any] = dict(node.metadata.to_dict())
        got = meta.get("data_type")
        if got != dtype:
            raise self.fail(f"array {name!r} has data type {got!r}, expected {dtype!r}")
        if len(node.shape) != ndim:
            raise self.fail(f"array {name!r} has shape {node.shape}, expected {ndim} dimensions")
        listed = meta.get("codecs") or []
        codecs = [c.get("name") if isinstance(c, dict) else c for c in listed]
        first = listed[0] if listed and isinstance(listed[0], dict) else {}
        endian = (first.get("configuration") or {}).get("endian")
        if not codecs or codecs[0] != "bytes":
            raise self.fail(f"array {name!r} has codecs {codecs}, expected 'bytes' first")
        if endian not in (None, "little") and np.dtype(dtype).itemsize > 1:
            raise self.fail(f"array {name!r} is stored {endian}-endian, expected little-endian")
        if checksum and codecs != ["bytes", "crc32c"]:
            raise self.fail(
                f"array {name!r} has codecs {codecs}, expected ['bytes', 'crc32c'] (format v2)"
            )
        return node


def validate_store(path: Path, meta: dict[str, Any], group: zarr.Group) -> None:
    """Check a store's ``cmdtool`` attribute against its arrays; raise at the first
    inconsistency.

    Parameters
    ----------
    path : Path
        The store folder (for messages).
    meta : dict
        The group attribute ``cmdtool`` (already known to hold a valid format version).
    group : zarr.Group
        The store's root group.
    """
    version = check_format_version(meta, path)
    checksum = version >= 2
    c = _Checker(path)
    params = meta.get("params")
    if not isinstance(params, list) or not params:
        raise c.fail(f"'params' is {_short(params)}, expected a non-empty list")
    names: set[str] = set()
    col = 0
    for i, p in enumerate(params):
        where = f"params[{i}]"
        size = _record(c, where, p, names, FLOAT_DTYPES, "a floating dtype")
        if p["offset"] != col:
            raise c.fail(
                f"{where} ({p['name']!r}): offset {p['offset']}, expected {col} "
                "(offsets run contiguously from 0 in 'params' order)"
            )
        col += size
    weights = c.array(group, WEIGHTS, "float32", 2, checksum)
    if weights.shape[1] != col:
        raise c.fail(
            f"the shapes in 'params' add up to N = {col} columns, "
            f"'{WEIGHTS}' has {weights.shape[1]}"
        )
    if weights.chunks[0] != 1:
        raise c.fail(f"'{WEIGHTS}' has chunks {weights.chunks}, expected one row per chunk")
    extras = meta.get("extras", [])
    if not isinstance(extras, list):
        raise c.fail(f"'extras' is {_short(extras)}, expected a list")
    byte = 0
    for i, e in enumerate(extras):
        where = f"extras[{i}]"
        size = _record(c, where, e, names, EXTRA_DTYPES, "a non-floating dtype")
        nbytes = e.get("nbytes")
        want = size * EXTRA_DTYPES[e["dtype"]]
        if not _is_int(nbytes) or nbytes != want:
            raise c.fail(
                f"{where} ({e['name']!r}): nbytes {nbytes!r}, expected {want} "
                f"({e['dtype']} of shape {tuple(e['shape'])})"
            )
        if e["offset"] != byte:
            raise c.fail(
                f"{where} ({e['name']!r}): offset {e['offset']}, expected {byte} "
                "(byte offsets run contiguously from 0 in 'extras' order)"
            )
        byte += want
    if _has(path, group, EXTRAS) or byte:
        arr = c.array(group, EXTRAS, "uint8", 2, checksum)
        if arr.shape[1] != byte:
            raise c.fail(f"the 'extras' records take {byte} bytes, '{EXTRAS}' has {arr.shape[1]}")
    if _has(path, group, POOL) != _has(path, group, POOL_INDEX):
        raise c.fail(f"'{POOL}' and '{POOL_INDEX}' must both be present or both absent")
    if _has(path, group, POOL):
        index = c.array(group, POOL_INDEX, "int64", 1, checksum)
        pool = c.array(group, POOL, "float32", 2, checksum)
        if pool.shape[1] != index.shape[0]:
            raise c.fail(
                f"'{POOL}' has {pool.shape[1]} columns, '{POOL_INDEX}' {index.shape[0]} entries"
            )
        cols = np.asarray(index[:])
        if cols.size and (cols[0] < 0 or cols[-1] >= col or np.any(np.diff(cols) <= 0)):
            raise c.fail(
                f"'{POOL_INDEX}' must hold increasing columns in [0, {col}); "
                f"it holds {cols.min()}..{cols.max()}"
            )
    epochs = meta.get("epochs")
    if not isinstance(epochs, list):
        raise c.fail(f"'epochs' is {_short(epochs)}, expected a list")
    last: int | None = None
    for i, ep in enumerate(epochs):
        where = f"epochs[{i}]"
        if not isinstance(ep, dict):
            raise c.fail(f"{where} is {_short(ep)}, expected a record")
        label = ep.get("label")
        if not _is_int(label):
            raise c.fail(f"{where}: label {label!r} is not an integer")
        if last is not None and label <= last:
            raise c.fail(f"{where}: label {label} does not follow the previous label {last}")
        last = label
        dtypes = ep.get("dtypes", {})
        if not isinstance(dtypes, dict) or any(d not in FLOAT_DTYPES for d in dtypes.values()):
            raise c.fail(f"{where}: 'dtypes' {_short(dtypes)} names a dtype that is not floating")
    if weights.shape[0] < len(epochs):
        raise c.fail(f"{len(epochs)} committed epochs but '{WEIGHTS}' has {weights.shape[0]} rows")


def _record(
    c: _Checker,
    where: str,
    rec: object,
    names: set[str],
    dtypes: dict[str, int],
    kind: str,
) -> int:
    """Check a ``params``/``extras`` record's name, shape, dtype and offset; its size."""
    if not isinstance(rec, dict):
        raise c.fail(f"{where} is {_short(rec)}, expected a record")
    name = rec.get("name")
    if not isinstance(name, str) or not name:
        raise c.fail(f"{where}: name {name!r} is not a non-empty string")
    if name in names:
        raise c.fail(f"{where}: tensor name {name!r} appears twice")
    names.add(name)
    shape = rec.get("shape")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise c.fail(f"{where} ({name!r}): shape {_short(shape)} is not a list of sizes >= 0")
    dtype = rec.get("dtype")
    if dtype not in dtypes:
        raise c.fail(f"{where} ({name!r}): dtype {dtype!r} is not {kind}")
    offset = rec.get("offset")
    if not _is_int(offset):
        raise c.fail(f"{where} ({name!r}): offset {offset!r} is not an integer")
    return int(np.prod(shape, dtype=np.int64))


def validate_result(
    path: Path, name: str, group: zarr.Group, n_params: int, n_epochs: int, version: int
) -> None:
    """Check the decomposition ``name`` (its zarr ``group``) against the store: arrays of
    the right dtype and length, ``ref_index``/``sample_index`` in ``[0, N)``, ``rows`` in
    ``[0, T)``, ``ref_traj`` of shape (M, len(rows)); raise at the first inconsistency."""
    c = _Checker(path, f"decomposition {name!r}: ")
    attrs = group.attrs.asdict().get(RESULT_ATTR)
    if not isinstance(attrs, dict):
        raise c.fail(f"attribute '{RESULT_ATTR}' is {_short(attrs)}, expected a record")
    m = attrs.get("n_modes")
    if not _is_int(m) or m < 1:
        raise c.fail(f"n_modes {m!r} is not a positive integer")
    rows = attrs.get("rows")
    if (
        not isinstance(rows, list)
        or not rows
        or not all(_is_int(r) and 0 <= r < n_epochs for r in rows)
    ):
        raise c.fail(f"rows {_short(rows)} are not rows of the store's {n_epochs} epochs")
    checksum = version >= 2
    for key, dtype in RESULT_COLUMNS:
        if not _has(path, group, key) and key not in ("labels", "a", "b"):
            continue  # running sums and later columns are optional additions
        arr = c.array(group, key, dtype, 1, checksum)
        if arr.shape[0] != n_params:
            raise c.fail(f"array {key!r} has length {arr.shape[0]}, expected N = {n_params}")
    ref_traj = c.array(group, "ref_traj", RESULT_SMALL["ref_traj"], 2, checksum)
    if ref_traj.shape != (m, len(rows)):
        raise c.fail(
            f"array 'ref_traj' has shape {ref_traj.shape}, expected ({m}, {len(rows)}) "
            "(n_modes x the epochs used)"
        )
    for key in ("ref_index", "sample_index"):
        arr = c.array(group, key, RESULT_SMALL[key], 1, checksum)
        if key == "ref_index" and arr.shape[0] != m:
            raise c.fail(f"array 'ref_index' has {arr.shape[0]} entries, expected n_modes = {m}")
        values = np.asarray(arr[:])
        if values.size and (values.min() < 0 or values.max() >= n_params):
            bad = values.min() if values.min() < 0 else values.max()
            raise c.fail(f"array {key!r} holds column {bad}, outside [0, {n_params})")


def _has(path: Path, group: zarr.Group, key: str) -> bool:
    """Whether ``group`` has a member ``key`` (its zarr.json exists; not parsed here, so a
    damaged one is reported by :meth:`_Checker.array`, not raised by zarr)."""
    return (path / group.path / key / "zarr.json").is_file()


def _short(v: object, most: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= most else text[: most - 3] + "..."


def unreadable_group(folder: Path) -> str | None:
    """Why the zarr group at ``folder`` is damaged (its ``zarr.json`` exists but is not
    the JSON of a group); None when it is absent or reads as a group."""
    meta_path = folder / "zarr.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, ValueError) as exc:
        return f"has an unreadable {meta_path.name} ({type(exc).__name__}: {exc})"
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return f"has a {meta_path.name} that does not describe a zarr group"
    return None
