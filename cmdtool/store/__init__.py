"""Stage 2 of the flow: the trajectory store (named tensors -> store rows -> row blocks).

:class:`TrajectoryStore` (:mod:`~cmdtool.store.trajectory`) is a zarr v3 group whose
format (:mod:`~cmdtool.store.layout`) is public; results groups are published by
:mod:`~cmdtool.store.results`, one writer at a time (:mod:`~cmdtool.store.lock`);
:mod:`~cmdtool.store.epochs` turns ``--epochs`` windows into rows.
"""

from cmdtool.store import remote as _remote  # noqa: F401  (registers URL stores)
from cmdtool.store.cleanup import remove_store, remove_zarr_temporaries
from cmdtool.store.layout import (
    ATTR,
    CHUNK,
    EXTRAS,
    FORMAT_VERSION,
    POOL,
    POOL_INDEX,
    POOL_SIZE,
    RESULT_ATTR,
    RESULT_COLUMNS,
    WEIGHTS,
    EpochInfo,
    ExtraInfo,
    ParamInfo,
    check_result_name,
    scratch_result_name,
)
from cmdtool.store.lock import LOCK_NAME, StoreLock
from cmdtool.store.trajectory import TrajectoryStore, as_store

__all__ = [
    "ATTR",
    "CHUNK",
    "EXTRAS",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "POOL",
    "POOL_INDEX",
    "POOL_SIZE",
    "RESULT_ATTR",
    "RESULT_COLUMNS",
    "WEIGHTS",
    "EpochInfo",
    "ExtraInfo",
    "ParamInfo",
    "StoreLock",
    "TrajectoryStore",
    "as_store",
    "check_result_name",
    "remove_store",
    "remove_zarr_temporaries",
    "scratch_result_name",
]
