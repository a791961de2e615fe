"""The store format's names and records: arrays, attributes, params, extras, epochs.

Format v1 is public and documented in the README under "Store format" and in
``docs/design.md``; this module holds its vocabulary and nothing that does I/O.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cmdtool.errors import UsageError

FORMAT_VERSION = 1
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
#: Per-parameter arrays of a results group: mode, coefficients, and the running sums
#: that let ``cmdtool update`` fold new epochs in (:mod:`cmdtool.method.running`).
RESULT_COLUMNS = (
    ("labels", "int32"),
    ("a", "float32"),
    ("b", "float32"),
    ("sum_w", "float64"),
    ("sum_w2", "float64"),
    ("sum_wr", "float64"),
)
PARTIAL_PREFIX = ".partial-"
SCRATCH_PREFIX = ".scratch-"
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
    epoch's source dtype where it differs from the store's.
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

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("renamed", "dtypes", "state_key", "size", "mtime_ns", "sha256"):
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
        )


def scratch_result_name() -> str:
    """A name for a decomposition that is only needed while its writer runs (``sweep``'s
    fits): hidden from :meth:`TrajectoryStore.result_names`, and removed by the next
    writer if its own was killed before deleting it."""
    return SCRATCH_PREFIX + uuid.uuid4().hex[:12]


def check_result_name(name: str) -> str:
    """Validate a results-group name (``--name``)."""
    if name.startswith(SCRATCH_PREFIX) and _NAME_RE.match(name[len(SCRATCH_PREFIX) :]):
        return name
    if not _NAME_RE.match(name) or name in (WEIGHTS, EXTRAS):
        raise UsageError(
            f"--name {name!r} is not usable: use letters, digits, '_', '.', '-', "
            f"starting with a letter or digit, other than {WEIGHTS!r} and {EXTRAS!r}"
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

