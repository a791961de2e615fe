"""Stage 4 of the flow: where the streamed pass (column blocks -> kernels) runs.

:func:`open_backend` gives a :class:`~cmdtool.backends.base.Backend`: this process on
one torch device (:mod:`~cmdtool.backends.local`), or ``dask.distributed`` tasks
(:mod:`~cmdtool.backends.dask`, optional extra ``cmdtool[dask]``, imported only when a
cluster is asked for). The estimator and reconstruct call it; a backend never imports
them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from cmdtool.backends.base import Backend, PassTotals, fit_columns, write_block

__all__ = ["Backend", "PassTotals", "check_request", "fit_columns", "open_backend", "write_block"]


def check_request(store: object, cluster: str | None, device: str) -> None:
    """Refuse an unusable ``--cluster``/``--device`` pair before any work starts (the
    store must be a local path for a cluster; the device syntax is checked on the
    client, each worker resolves it)."""
    if cluster is None:
        return
    from cmdtool.backends.dask import check_device_request, check_store_path

    check_store_path(store)
    check_device_request(device)


@contextlib.contextmanager
def open_backend(cluster: str | None, device: str = "auto") -> Iterator[Backend]:
    """The backend for ``cluster`` (None: this process; an address or ``"local"``: a
    Dask cluster, connected for the ``with`` block) with the pass on ``device``.

    Raises
    ------
    DeviceError
        ``device`` names CUDA and there is none (local backend).
    ClusterError, UsageError
        As :func:`cmdtool.backends.dask.connect`.
    """
    if cluster is None:
        from cmdtool.backends.local import LocalBackend
        from cmdtool.method.kernels import resolve_device

        yield LocalBackend(resolve_device(device))
        return
    from cmdtool.backends.dask import DaskBackend, connect

    with connect(cluster) as client:
        yield DaskBackend(client, device)
