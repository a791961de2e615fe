"""The store format's names and records: arrays, attributes, params, extras, epochs.

The format (version 2; version-1 stores are still read and appended to) is public and
documented in the README under "Store format" and in ``docs/design.md``; this module
holds its vocabulary and nothing that does I/O.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cmdtool.errors import UsageError

#: Version 2 (issue 11): every array carries the crc32c codec and every chunk is
#: written, so an absent chunk is damage (``cmdtool.store.integrity``).
FORMAT_VERSION = 2
#: Values per chunk along N: 1 MiB of float32. Measured with scripts/measure_chunks.py
#: (4M x 20, 2 cores): 262144 read column blocks at 2.38 GB/s against 0.95 GB/s for 65536
#: and 0.75 GB/s for 1048576; zstd saved 7.5% of disk but halved read speed.
CHUNK = 262_144
WEIGHTS = "weights"
EXTRAS = "extras"
POOL = "pool"
POOL_INDEX = "pool_index"
#: Columns copied into the sample pool at ingest: decompose draws its K samples from it
#: (K <= POOL_SIZE) instead of reading every chunk of ``weights`` a second time.
POOL_SIZE = 16_384
ATTR = "cmdtool"
RESULT_ATTR = "cmdtool_result"
#: Group attribute of a results group: a token unique to each published version
#: (``docs/design.md``, "Publishing results"); readers check it did not change.
GENERATION_ATTR = "cmdtool_generation"
#: Per-parameter arrays of a results group: mode, coefficients, the running sums
#: that let ``cmdtool update`` fold new epochs in (:mod:`cmdtool.method.running`), and
#: the mask of parameters constant over the window (modelled exactly, in no mode).
RESULT_COLUMNS = (
    ("labels", "int32"),
    ("a", "float32"),
    ("b", "float32"),
    ("sum_w", "float64"),
    ("sum_w2", "float64"),
    ("sum_wr", "float64"),
    ("constant", "bool"),
)
#: Result columns a decomposition made before issue 12 may lack (readers then take every
#: parameter as non-constant).
OPTIONAL_RESULT_COLUMNS = ("constant",)
PARTIAL_PREFIX = ".partial-"
SCRATCH_PREFIX = ".scratch-"
#: A replaced results group on its way out: renamed to ``.trash-<hex>`` (atomic), then
#: deleted; the next writer removes any a killed one left.
TRASH_PREFIX = ".trash-"
ZARR_TMP_RE = re.compile(r"\.[0-9a-f]{32}\.partial$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ParamInfo:
    """A modeled (floating) tensor: columns ``offset : offset + size`` of ``weights``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class ExtraInfo:
    """A non-modeled tensor: bytes ``offset : offset + nbytes`` of an ``extras`` row."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class EpochInfo:
    """One committed epoch.

    ``renamed`` maps store names to this epoch's source names where they differ (a
    ``module.`` prefix that appeared, say); ``dtypes`` maps store names to this
    epoch's source dtype where it differs from the store's; ``header_metadata`` is the
    ``__metadata__`` of its safetensors file(s) (``{"format": "pt"}``), if any.
    """

    label: int
    source: str
    kind: str = ""
    state_key: str | None = None
    renamed: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    header_metadata: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        optional = ("renamed", "dtypes", "state_key", "size", "mtime_ns", "sha256")
        for key in (*optional, "header_metadata"):
            if not d[key]:
                del d[key]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EpochInfo:
        return cls(
            label=int(d["label"]),
            source=str(d["source"]),
            kind=str(d.get("kind", "")),
            state_key=d.get("state_key"),
            renamed=dict(d.get("renamed", {})),
            dtypes=dict(d.get("dtypes", {})),
            size=d.get("size"),
            mtime_ns=d.get("mtime_ns"),
            sha256=d.get("sha256"),
            header_metadata=d.get("header_metadata"),
        )


def scratch_result_name() -> str:
    """A name for a decomposition that is only needed while its writer runs (``sweep``'s
    fits): hidden from :meth:`TrajectoryStore.result_names`, and removed by the next
    writer if its own was killed before deleting it."""
    return SCRATCH_PREFIX + uuid.uuid4().hex[:12]


#: Names a results group may not take: the store's own nodes and files (compared
#: case-insensitively, for case-insensitive file systems). Hidden names (``.partial-``,
#: ``.scratch-``, ``.trash-``, the lock) are excluded by the leading-character rule.
RESERVED_NAMES = (WEIGHTS, EXTRAS, POOL, POOL_INDEX, "zarr.json")
#: Endings the store's own temporaries use: ``.partial-<name>.old`` (publishing), zarr's
#: ``<name>.<hex>.partial``, and ``.tmp``.
RESERVED_SUFFIXES = (".old", ".partial", ".tmp")
MAX_NAME_LENGTH = 200
_SCRATCH_NAME_RE = re.compile(re.escape(SCRATCH_PREFIX) + r"[0-9a-f]{12}")


def check_result_name(name: str) -> str:
    """Validate a results-group name (``--name``).

    A name is a plain folder name of letters, digits, ``_``, ``.``, ``-``, starting with
    a letter or digit, at most :data:`MAX_NAME_LENGTH` characters, that the store itself
    does not use (:data:`RESERVED_NAMES`, ``pool*``, ``zarr.*``,
    :data:`RESERVED_SUFFIXES`); the only hidden names accepted are those of
    :func:`scratch_result_name`.

    Raises
    ------
    UsageError
        The name is not usable, naming it and why.
    """
    if _SCRATCH_NAME_RE.fullmatch(name):
        return name
    low = name.lower()
    why = ""
    if not _NAME_RE.fullmatch(name):
        why = "use letters, digits, '_', '.', '-', starting with a letter or digit"
    elif len(name) > MAX_NAME_LENGTH:
        why = f"use at most {MAX_NAME_LENGTH} characters"
    elif low in RESERVED_NAMES or low.startswith((POOL, "zarr.")):
        why = "the store itself uses that name"
    elif low.endswith(RESERVED_SUFFIXES):
        why = f"names ending in {', '.join(RESERVED_SUFFIXES)} are the store's temporaries"
    if why:
        raise UsageError(
            f"--name {name!r} is not usable: {why} (the store uses {', '.join(RESERVED_NAMES)}, "
            "pool*, zarr.*, hidden names)"
        )
    return name


def layout_attrs(params: Sequence[ParamInfo], extras: Sequence[ExtraInfo]) -> dict[str, Any]:
    return {
        "params": [
            {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "offset": p.offset}
            for p in params
        ],
        "extras": [
            {
                "name": e.name,
                "shape": list(e.shape),
                "dtype": e.dtype,
                "offset": e.offset,
                "nbytes": e.nbytes,
            }
            for e in extras
        ],
    }

