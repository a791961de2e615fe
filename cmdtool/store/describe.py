"""What a store holds, for ``cmdtool info``."""

from __future__ import annotations

import os
from typing import Any

from cmdtool.store import RESULT_ATTR, TrajectoryStore


def describe(store: TrajectoryStore | str | os.PathLike[str]) -> dict[str, Any]:
    """Epochs, tensors, size on disk and decompositions of a store, as plain data."""
    st = store if isinstance(store, TrajectoryStore) else TrajectoryStore.open(store)
    results = []
    for name in st.result_names():
        attrs = dict(st.open_result(name).attrs[RESULT_ATTR])  # type: ignore[arg-type]
        results.append(
            {
                "name": name,
                "n_modes": attrs["n_modes"],
                "mode_sizes": attrs["mode_sizes"],
                "window": attrs["window"],
                "stride": attrs["stride"],
                "epochs": attrs["epochs"],
                "relative_error": attrs["relative_error"],
                "created": attrs.get("created"),
            }
        )
    return {
        "store": str(st.path),
        "format_version": st._meta["format_version"],
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
        "disk_bytes": st.disk_bytes(),
        "decompositions": results,
    }
