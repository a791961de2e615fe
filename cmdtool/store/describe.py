"""What a store holds, for ``cmdtool info``."""

from __future__ import annotations

import os
from typing import Any

from cmdtool.store import RESULT_ATTR, TrajectoryStore, pipeline
from cmdtool.store.normstats import LEGACY_STATS, match_stats, stats_pattern_of


def describe(store: TrajectoryStore | str | os.PathLike[str]) -> dict[str, Any]:
    """Epochs, tensors, size on disk and decompositions of a store, as plain data."""
    st = store if isinstance(store, TrajectoryStore) else TrajectoryStore.open(store)
    results = []
    for name in st.result_names():
        # one read of the group's zarr.json (a writer may be publishing it right now)
        attrs: dict[str, Any] = st.read_result(
            name, lambda _pin, group: dict(group.attrs[RESULT_ATTR])  # type: ignore[arg-type]
        )
        results.append(
            {
                "name": name,
                "n_modes": attrs["n_modes"],
                "mode_sizes": attrs["mode_sizes"],
                "window": attrs["window"],
                "stride": attrs["stride"],
                "epochs": attrs["epochs"],
                "relative_error": attrs["relative_error"],
                "constant": int(attrs.get("constant", 0)),
                "stats": str(attrs.get("stats", LEGACY_STATS)),
                "stats_recorded": "stats" in attrs,
                "created": attrs.get("created"),
            }
        )
    return {
        "store": str(st.path),
        "format_version": st._meta["format_version"],
        # format v2 (issue 11): crc32c on every chunk, every chunk present
        "checksums": st.format_version >= 2,
        "n_epochs": st.n_epochs,
        "labels": st.labels,
        "epochs": [e.to_json() for e in st.epochs],
        "n_params": st.n_params,
        "params": [
            {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "offset": p.offset}
            for p in st.params
        ],
        "extras": [{"name": e.name, "shape": list(e.shape), "dtype": e.dtype} for e in st.extras],
        "filters": st.filters,
        "stats": _stats(st),
        "disk_bytes": st.disk_bytes(),
        # which codec pipeline reads weights (zarrs or zarr-python; issue 14)
        "codec_pipeline": pipeline.describe(st),
        "decompositions": results,
    }


def _stats(st: TrajectoryStore) -> dict[str, Any]:
    """The normalization statistics of a store: pattern, whether the store recorded it
    (a store made before cmdtool recognised them did not: the default applies, and its
    decompositions default to the ``model`` treatment), and the tensors it matches."""
    pattern, recorded = stats_pattern_of(st.filters)
    tensors = match_stats(st.params, pattern)
    return {
        "pattern": pattern,
        "recorded": recorded,
        "tensors": [t.name for t in tensors],
        "variances": [t.name for t in tensors if t.variance],
        "default_treatment": None if recorded else LEGACY_STATS,
    }
