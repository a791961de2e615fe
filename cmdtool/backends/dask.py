"""The Dask backend: the streamed pass (steps 5-6) and mapped tasks (reconstruct's epochs)
as ``dask.distributed`` tasks.

Optional: ``pip install "cmdtool[dask]"``. dask is imported only when a cluster is used,
so the rest of cmdtool neither needs nor loads it.

The client (``CMD.fit``) does everything but the pass: it samples, clusters, creates the
hidden ``.partial-<name>`` results group and publishes it by rename once complete. Each
task handles one chunk-aligned column block: it opens the store read-only by path, reads
the block, fits it with :func:`cmdtool.backends.base.fit_columns` on the worker's device and
writes labels, a and b straight into the partial group's arrays. As blocks are chunk
aligned, no two tasks write the same chunk, and a block recomputed after a lost worker
writes the same bytes again. The tasks return the small per-mode totals, which the
client adds in block order, piece by piece, exactly as :class:`~cmdtool.backends.local.LocalBackend`
does: labels, a, b and the error figures are bit-identical to the single-process run on
the same kind of device.

Workers must see the store (and reconstruct's OUT folder) at the same path: one machine,
or a shared file system; or the store is at an object-store URL (``s3://bucket/prefix``):
then each worker opens it by URL with the credentials of its own environment
(``AWS_*``; a LocalCluster's workers inherit the client's) and reads its chunks straight
from the object store, no shared disk needed. ``memory://`` stores are refused.
``cluster="local"`` spawns worker processes, which import the caller's main module as
``multiprocessing`` does: a script must call it under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr

from cmdtool.backends.base import MapProgress, PassProgress, PassTotals, fit_columns, write_block
from cmdtool.errors import (
    ClusterError,
    CmdtoolError,
    DeviceError,
    NotFoundError,
    StoreError,
    UsageError,
)
from cmdtool.method.kernels import References
from cmdtool.store import TrajectoryStore, remove_zarr_temporaries
from cmdtool.store.integrity import WRITE_CONFIG

if TYPE_CHECKING:
    from distributed import Client

#: ``--cluster local``: a LocalCluster of worker processes started (and closed) by cmdtool.
LOCAL = "local"
#: Worker processes of ``--cluster local``: one per GPU, at least this many.
LOCAL_WORKERS = 2
_INSTALL_HINT = 'the Dask backend needs dask.distributed: pip install "cmdtool[dask]"'
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

#: Test hook: called as ``hook(start, stop)`` on the worker before each column block.
_before_block: Callable[[int, int], None] | None = None


# ------------------------------------------------------------------ checking, connecting
def check_store_path(store: object) -> None:
    """Refuse a URL: workers open the store by local path (same machine or shared FS)."""
    path = str(getattr(store, "path", store))
    if _URL_RE.match(path):
        from cmdtool.store.objects import normalize

        url = normalize(path)  # an unsupported scheme: a UsageError naming it
        if url.startswith("memory://"):
            raise UsageError(
                f"STORE {path}: a memory:// store lives in this process only; the Dask "
                "workers cannot reach it"
            )


def check_device_request(device: str) -> None:
    """Check the syntax of ``--device`` on the client; the workers resolve it."""
    if not _DEVICE_RE.match(device):
        raise UsageError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise UsageError(_INSTALL_HINT) from exc
    return distributed


@contextlib.contextmanager
def connect(cluster: str, *, timeout: float | str | None = None) -> Iterator[Client]:
    """A ``distributed.Client`` for ``cluster``, closed on exit.

    Parameters
    ----------
    cluster : str
        A scheduler address (``tcp://host:8786``, ``host:8786``), or ``"local"`` to start a
        LocalCluster of worker processes (one per GPU, at least two, one thread each) that
        is closed again on exit.
    timeout : float or str, optional
        How long to try reaching the scheduler; default dask's
        ``distributed.comm.timeouts.connect`` (30 s unless configured, e.g. with the
        environment variable ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s``).

    Raises
    ------
    UsageError
        dask.distributed is not installed, or ``cluster`` is not an address.
    ClusterError
        The scheduler cannot be reached or has no worker.
    """
    distributed = _import_distributed()
    import dask

    wait = timeout if timeout is not None else dask.config.get("distributed.comm.timeouts.connect")
    if cluster == LOCAL:
        try:
            local = distributed.LocalCluster(
                n_workers=max(LOCAL_WORKERS, torch.cuda.device_count()),
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.CRITICAL,
            )
        except Exception as exc:
            raise ClusterError(f"cannot start a local Dask cluster: {exc}") from exc
        with local, distributed.Client(local, set_as_default=False) as client:
            yield client
        return
    _check_address(cluster)
    failure: ClusterError | None = None
    try:
        client = distributed.Client(cluster, timeout=wait, set_as_default=False)
    except Exception as exc:  # OSError, TimeoutError; TLS misconfiguration
        failure = ClusterError(
            f"cannot reach the Dask scheduler at {cluster} ({exc}); check the address "
            "and that 'dask scheduler' runs there, or use --cluster local"
        )
    if failure is not None:
        # the half-made Client must be collected while its event loop still runs: at
        # interpreter exit its __del__ would wait 60 s and print a traceback
        gc.collect()
        raise failure
    try:
        try:
            client.wait_for_workers(1, timeout=dask.utils.parse_timedelta(wait))
        except Exception as exc:
            raise ClusterError(
                f"the Dask scheduler at {cluster} has no worker (waited {wait}); "
                "start some with 'dask worker ADDRESS'"
            ) from exc
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _check_address(cluster: str) -> None:
    """Refuse what is not a scheduler address before a Client is made of it."""
    from distributed.comm.addressing import (
        get_address_host_port,
        normalize_address,
        parse_address,
    )

    try:
        address = normalize_address(cluster)
        if parse_address(address)[0] != "inproc":
            get_address_host_port(address)
    except ValueError as exc:
        raise UsageError(
            f"--cluster {cluster!r} is not a usable scheduler address ({exc}); give "
            "tcp://HOST:PORT as printed by 'dask scheduler', or 'local'"
        ) from None


# --------------------------------------------------------------------- on the workers
def worker_device(request: str) -> torch.device:
    """The torch device a task uses on this worker for ``--device request``.

    ``cpu`` is the CPU; ``auto`` this worker's GPU when CUDA is available, else the CPU;
    ``cuda`` this worker's GPU (a DeviceError without one); ``cuda:N`` exactly that GPU.
    "This worker's GPU" is ``cuda:<worker name mod GPU count>`` where the worker's name
    is a number (LocalCluster numbers its workers 0, 1, ...), else the current device
    (the one GPU a worker sees when ``CUDA_VISIBLE_DEVICES`` gives each its own).
    """
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {request}: no CUDA device is available on this worker")
    if request.startswith("cuda:"):
        return torch.device(request)
    name: object = None
    with contextlib.suppress(Exception):
        from distributed import get_worker

        name = get_worker().name
    count = torch.cuda.device_count()
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        return torch.device("cuda", int(name) % count)
    return torch.device("cuda", torch.cuda.current_device())


def _worker_address() -> str:
    with contextlib.suppress(Exception):
        from distributed import get_worker

        return str(get_worker().address)
    return "(no worker)"


def _raise_in_context(exc: BaseException, store: str, where: str) -> None:
    """Re-raise a task's error as a cmdtool error that names the worker and the task."""
    if not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, NotFoundError | FileNotFoundError):
        raise ClusterError(
            f"{where}: {exc}; the workers must see the store at the same path as the "
            "client (the same machine or a shared file system)"
        ) from exc
    if isinstance(exc, CmdtoolError):
        raise type(exc)(f"{where}: {exc}") from exc
    if isinstance(exc, OSError):
        raise StoreError(f"cannot access store {store} ({where}): {exc.strerror or exc}") from exc
    raise ClusterError(f"{where} failed: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class _FitJob:
    """What every block task needs, shipped to the cluster once.

    ``arrays`` maps ``labels``, ``a``, ``b`` to the paths of the partial group's arrays.
    """

    store: str
    rows: np.ndarray
    ref_traj: np.ndarray
    device: str
    arrays: dict[str, str]
    before_block: Callable[[int, int], None] | None = None


@dataclass(frozen=True)
class _BlockTotals:
    """Per-piece totals of one block: err2, sq (float64) and count (int64), shape (P, M)."""

    err2: np.ndarray
    sq: np.ndarray
    count: np.ndarray
    device: str


def _identity(job: _FitJob) -> _FitJob:
    return job


def _fit_block_task(job: _FitJob, start: int, stop: int) -> _BlockTotals:
    """Fit columns ``start:stop`` on this worker and write their labels, a and b."""
    where = f"columns {start}:{stop} on worker {_worker_address()}"
    try:
        if job.before_block is not None:
            job.before_block(start, stop)
        device = worker_device(job.device)
        if device.type == "cuda":  # this worker's GPU is its current one (streams, events,
            torch.cuda.set_device(device)  # cuBLAS); its pinned buffers are reused per thread
        st = TrajectoryStore.open(job.store)
        block = st.read_block(job.rows, start, stop)
        parts = fit_columns(block, References.from_trajectories(job.ref_traj, device), device)
        arrays = {  # every chunk written, zeros too (format v2: an absent chunk is damage)
            key: zarr.open_array(_array_store(path), mode="r+", config=WRITE_CONFIG)
            for key, path in job.arrays.items()
        }
        write_block(arrays, start, parts)
    except BaseException as exc:
        _raise_in_context(exc, job.store, where)
        raise  # not reached
    return _BlockTotals(
        err2=np.stack([p.err2 for p in parts]),
        sq=np.stack([p.sq for p in parts]),
        count=np.stack([p.count for p in parts]),
        device=str(device),
    )


def _run_task(task: Callable[[Any], Any], item: Any, what: str) -> Any:
    """``task(item)`` on this worker, its errors re-raised naming the worker and ``what``."""
    where = f"{what} on worker {_worker_address()}"
    try:
        return task(item)
    except BaseException as exc:
        _raise_in_context(exc, str(getattr(task, "store", "?")), where)
        raise  # not reached


# ----------------------------------------------------------------------- on the client
def _cluster_failure(exc: BaseException, what: str) -> CmdtoolError:
    """A ClusterError for a task that did not complete (not an error raised by the task)."""
    from distributed.scheduler import KilledWorker

    if isinstance(exc, CmdtoolError):
        return exc
    if isinstance(exc, KilledWorker):
        return ClusterError(
            f"{what}: workers died running it more often than dask allows "
            f"(distributed.scheduler.allowed-failures): {exc}"
        )
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ClusterError(f"{what}: lost to the cluster ({reason})")


def _collect(
    client: Client,
    futures: dict[Any, Any],
    what: Callable[[Any], str],
    done: Callable[[Any, Any], None],
) -> None:
    """Wait for every future; call ``done(tag, result)`` as each completes. The first one
    that fails raises (ClusterError or the task's own cmdtool error); every future is
    released on the way out, so no task is retried once this returns."""
    from distributed import as_completed

    try:
        for fut in as_completed(list(futures), loop=client.loop):
            tag = futures[fut]
            try:
                result = fut.result()
            except Exception as exc:
                raise _cluster_failure(exc, what(tag)) from exc
            done(tag, result)
    except CmdtoolError:
        raise
    except Exception as exc:  # the connection to the scheduler, mostly
        raise ClusterError(f"the Dask cluster failed mid-run: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            client.cancel(list(futures), force=True)


def _array_store(path: str) -> Any:
    """Where a worker opens a result array: a local path, or (an object-store URL) the
    object store rooted at the array, credentials from the worker's environment."""
    from cmdtool.store.objcheck import zarr_store
    from cmdtool.store.objects import is_url

    return zarr_store(path, read_only=False) if is_url(path) else path


def _array_path(arr: zarr.Array) -> str:
    url = getattr(arr.store, "url", None)
    if isinstance(url, str):  # a store on an object store: workers reach it by URL
        return f"{url}/{arr.path}"
    root = getattr(arr.store, "root", None)
    if root is None:
        raise UsageError("the Dask backend writes results to a store on a local file system")
    return str(Path(root).resolve() / arr.path)


class DaskBackend:
    """Run passes and tasks as tasks of a ``dask.distributed`` cluster.

    Parameters
    ----------
    client : distributed.Client
        From :func:`connect`.
    device : str
        ``--device`` as given; each worker resolves it (:func:`worker_device`).
    """

    def __init__(self, client: Client, device: str = "auto") -> None:
        check_device_request(device)
        self.client = client
        self.device = device

    def fit_pass(
        self,
        st: TrajectoryStore,
        rows: np.ndarray,
        ref_traj: np.ndarray,
        arrays: dict[str, zarr.Array],
        progress: PassProgress | None = None,
    ) -> PassTotals:
        """:meth:`LocalBackend.fit_pass <cmdtool.backends.local.LocalBackend.fit_pass>`
        as one task per column block (:func:`dask_pass`)."""
        return dask_pass(self.client, st, rows, ref_traj, arrays, self.device, progress)

    def map(
        self,
        task: Callable[[Any], Any],
        items: Sequence[Any],
        what: Callable[[Any], str],
        progress: MapProgress | None = None,
    ) -> list[Any]:
        """One Dask task per item; ``task`` must be picklable and the workers must see
        what it reads and writes at the same paths."""
        futures = {
            self.client.submit(_run_task, task, item, what(item), pure=False): i
            for i, item in enumerate(items)
        }
        results: list[Any] = [None] * len(items)
        count = [0]

        def done(i: int, result: Any) -> None:
            results[i] = result
            count[0] += 1
            if progress is not None:
                progress(count[0], len(items), result)

        _collect(self.client, futures, lambda i: what(items[i]), done)
        return results


def dask_pass(
    client: Client,
    st: TrajectoryStore,
    rows: np.ndarray,
    ref_traj: np.ndarray,
    arrays: dict[str, zarr.Array],
    device: str,
    progress: PassProgress | None = None,
) -> PassTotals:
    """Steps 5-6 over every column block as Dask tasks.

    Parameters
    ----------
    client : distributed.Client
        From :func:`connect`.
    st : TrajectoryStore
        The store, on a path every worker sees.
    rows : ndarray, int64, shape (T',)
        Store rows of the window.
    ref_traj : ndarray, float32, shape (M, T')
        The reference trajectories.
    arrays : dict of str to zarr.Array
        ``labels`` (int32), ``a``, ``b`` (float32), shape (N,), chunked like ``weights``:
        the partial results group's arrays, which the tasks write.
    device : str
        ``--device`` as given; each worker resolves it (:func:`worker_device`).
    progress : callable, optional
        ``progress(columns_done, N)`` as blocks complete (in any order).

    Returns
    -------
    PassTotals
        Per-mode sums, added in block order (float64, deterministic), and the device
        kind the workers ran on (``auto`` when both were used).

    Raises
    ------
    ClusterError
        A block failed or was lost with its worker more often than dask retries it.
    """
    check_device_request(device)
    blocks = list(st.column_blocks())
    job = _FitJob(
        store=str(st.path.resolve()),
        rows=np.asarray(rows, dtype=np.int64),
        ref_traj=np.asarray(ref_traj, dtype=np.float32),
        device=device,
        arrays={key: _array_path(arr) for key, arr in arrays.items()},
        before_block=_before_block,
    )
    token = uuid.uuid4().hex[:12]
    # a task, not scattered data: if the workers holding it die, dask recomputes it
    job_future = client.submit(_identity, job, key=f"cmdtool-job-{token}", pure=False)
    futures = {
        client.submit(
            _fit_block_task, job_future, start, stop, key=f"cmdtool-fit-{token}-{start}"
        ): (start, stop)
        for start, stop in blocks
    }
    results: dict[int, _BlockTotals] = {}
    columns = [0]

    def done(tag: tuple[int, int], result: _BlockTotals) -> None:
        results[tag[0]] = result
        columns[0] += tag[1] - tag[0]
        if progress is not None:
            progress(columns[0], st.n_params)

    try:
        _collect(client, futures, lambda tag: f"columns {tag[0]}:{tag[1]}", done)
    finally:
        with contextlib.suppress(Exception):
            client.cancel([job_future], force=True)
    for path in job.arrays.values():  # a worker that died mid-write; its retry rewrote the block
        remove_zarr_temporaries(path)
    m = ref_traj.shape[0]
    totals = PassTotals.zeros(m)
    for start, _ in blocks:  # block order, piece by piece: the sums of local_pass
        r = results[start]
        for i in range(r.err2.shape[0]):
            totals.add(PassTotals(r.err2[i], r.sq[i], r.count[i]))
    kinds = {torch.device(r.device).type for r in results.values()}
    totals.device = kinds.pop() if len(kinds) == 1 else "auto"
    return totals
