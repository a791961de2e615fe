"""The CMD estimator: sample, cluster, then one streamed pass that assigns and fits.

Steps 1-4 of ``docs/design.md`` ("The method") run on the K sampled trajectories in
memory (K x T'); steps 5-6 stream column blocks of ``weights`` through
:func:`cmdtool.method.kernels.fit_block` on a backend (:mod:`cmdtool.backends`: this
process on one torch device, or Dask tasks). The N x T matrix is never held in memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cmdtool.backends import Backend, check_request, open_backend
from cmdtool.decomposition.normstats import stats_labels, store_stats, window_fit
from cmdtool.errors import UsageError
from cmdtool.method.clustering import find_modes
from cmdtool.method.running import relative_errors
from cmdtool.method.sampling import sample_from_pool, sample_indices
from cmdtool.store import RESULT_ATTR, RESULT_COLUMNS, TrajectoryStore, as_store, check_result_name
from cmdtool.store.epochs import select_window
from cmdtool.store.integrity import create_array
from cmdtool.store.normstats import (
    DEFAULT_STATS,
    LEGACY_STATS,
    check_stats_choice,
    stats_columns,
    stats_pattern_of,
)
from cmdtool.store.results import ResultPin

Progress = Callable[[int, int], None]
#: The constant rule, as recorded in each decomposition's attributes (``constant_rule``).
CONSTANT_RULE = (
    "constant over the window when max - min <= 4 * eps32 * max(|max|, |min|) "
    "(eps32 = 2**-23): not clustered, never a reference, a = 0, b = its mean "
    "(its value when exactly constant), counted in 'constant', not in mode_sizes"
)
#: Fewest epochs a window must hold (a correlation of two points is always +-1).
MIN_EPOCHS = 3


class CMD:
    """Correlation Mode Decomposition of a trajectory store (post-hoc CMD).

    Parameters
    ----------
    n_modes : int or None, default 10
        Number of modes to cut the linkage tree into (``maxclust``); the fit may find
        fewer when the samples do not separate into that many. None with ``threshold``.
    threshold : float, optional
        Cut the tree at ``threshold`` times the largest pairwise distance instead
        (0 < threshold <= 1). Give either ``n_modes`` or ``threshold``.
    n_samples : int, default 1000
        K, the number of sampled parameters that are clustered.
    epochs : str, optional
        The window as a half-open range of epoch labels ``"A:B"``; default all.
    stride : int, default 1
        Use every ``stride``-th epoch of the window.
    seed : int, default 0
        Seed of the sampling.
    device : str, default "auto"
        Torch device of the streamed pass: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    stats : str, optional
        How rebuilt checkpoints hold the normalization statistics (``running_mean``,
        ``running_var``): one of :data:`cmdtool.store.normstats.STATS_CHOICES`, recorded
        with the decomposition. Default ``gated``; ``model`` for a store made before
        cmdtool recognised statistics.
    cluster : str, optional
        Run the streamed pass as Dask tasks on this ``dask.distributed`` scheduler
        address, or ``"local"`` for a LocalCluster started for the fit (needs
        ``pip install "cmdtool[dask]"``; see :mod:`cmdtool.backends.dask`). The workers must
        see the store at the same path; each resolves ``device`` for itself. The results
        are the same as without it.

    Attributes
    ----------
    n_modes_ : int
        Number of modes found.
    ref_index_ : ndarray, int64, shape (M,)
        Column of ``weights`` holding each mode's reference parameter.
    ref_traj_ : ndarray, float32, shape (M, T')
        The references over the window.
    sample_index_ : ndarray, int64, shape (K,)
    window_rows_ : ndarray, int64, shape (T',)
        Store rows of the window.
    mode_sizes_ : ndarray, int64, shape (M,)
        Parameters assigned to each mode (constant parameters are in none).
    n_constant_ : int
        Parameters constant over the window (modelled exactly: ``a = 0``, ``b`` = the
        constant; ``docs/design.md``, "Constant parameters and normalization
        statistics").
    relative_error_ : float
        ``||W - W_hat||_F / ||W||_F`` over the window.
    mode_errors_ : ndarray, float64, shape (M,)
        The same ratio restricted to each mode's parameters.
    labels_, a_, b_ : ndarray, shape (N,)
        Mode (int32) and affine coefficients (float32) of every parameter, read from
        the store when accessed, always from the version in ``pin_``.
    pin_ : ResultPin
        The published version of the decomposition this estimator holds (its folder and
        ``cmdtool_generation`` token); reads after it was republished raise
        ResultChangedError.
    """

    def __init__(
        self,
        n_modes: int | None = 10,
        *,
        threshold: float | None = None,
        n_samples: int = 1000,
        epochs: str | None = None,
        stride: int = 1,
        seed: int = 0,
        device: str = "auto",
        cluster: str | None = None,
        stats: str | None = None,
    ) -> None:
        self.n_modes = n_modes
        self.threshold = threshold
        self.n_samples = n_samples
        self.epochs = epochs
        self.stride = stride
        self.seed = seed
        self.device = device
        self.cluster = cluster
        self.stats = stats

    # ---------------------------------------------------------------- checking
    def _check(self, store: TrajectoryStore) -> tuple[np.ndarray, int | None]:
        n_modes = self.n_modes
        if self.threshold is not None:
            if not 0.0 < self.threshold <= 1.0:
                raise UsageError(f"threshold={self.threshold} must be > 0 and <= 1")
            n_modes = None
        elif n_modes is None:
            raise UsageError("give n_modes or threshold")
        if self.n_samples < 1:
            raise UsageError(f"samples={self.n_samples} must be >= 1")
        if self.n_samples > store.n_params:
            raise UsageError(
                f"samples={self.n_samples} must be <= the number of parameters {store.n_params}"
            )
        if n_modes is not None and not 1 <= n_modes <= self.n_samples:
            raise UsageError(
                f"modes={n_modes} must be >= 1 and <= the number of sampled parameters "
                f"{self.n_samples}"
            )
        if self.stats is not None:
            check_stats_choice(self.stats)
        if store.n_epochs == 0:
            raise UsageError(f"store {store.path} holds no epoch; run 'cmdtool ingest' first")
        rows = select_window(store.labels, self.epochs, self.stride)
        if rows.size < MIN_EPOCHS:
            raise UsageError(
                f"the window holds {rows.size} epoch(s) "
                f"(--epochs {self.epochs or 'all'}, --stride {self.stride}); "
                f"CMD needs at least {MIN_EPOCHS}"
            )
        return rows, n_modes

    # --------------------------------------------------------------------- fit
    def fit(
        self,
        store: TrajectoryStore | str | os.PathLike[str],
        *,
        name: str = "cmd",
        progress: Progress | None = None,
    ) -> CMD:
        """Decompose ``store`` and save the result in its subgroup ``name``.

        The previous result of that name stays readable until the new one is complete.

        Returns
        -------
        self
        """
        check_result_name(name)
        check_request(store, self.cluster, self.device)
        st = as_store(store, "r+")
        try:
            self._fit(st, name, progress)
        finally:
            if st is not store:
                st.close()  # release the write lock; the estimator keeps reading
        return self

    def _fit(
        self,
        st: TrajectoryStore,
        name: str,
        progress: Progress | None,
    ) -> None:
        rows, n_modes = self._check(st)  # bad settings fail before a device or cluster is used
        with open_backend(self.cluster, self.device) as backend:
            self._fit_on(st, name, progress, backend, rows, n_modes)

    def _fit_on(
        self,
        st: TrajectoryStore,
        name: str,
        progress: Progress | None,
        backend: Backend,
        rows: np.ndarray,
        n_modes: int | None,
    ) -> None:
        t0 = time.perf_counter()

        sizes = [p.size for p in st.params]
        pool = st.pool_index if st.has_pool() else None
        sample_index = (
            None if pool is None else sample_from_pool(sizes, pool, self.n_samples, self.seed)
        )
        if sample_index is None:  # no usable pool: the samples come from weights
            sample_index = sample_indices(sizes, self.n_samples, self.seed)
        samples = st.read_columns(rows, sample_index).T  # (K, T'), from the pool if it can
        modes = find_modes(samples, n_modes=n_modes, threshold=self.threshold)
        ref_index = sample_index[modes.ref_rows]
        ref_traj = np.ascontiguousarray(samples[modes.ref_rows])  # (M, T')
        m = modes.n_modes

        with st.writing_result(name) as group:
            n = st.n_params
            chunk = st.chunk
            arrays = {
                key: create_array(group, key, shape=(n,), chunks=(min(chunk, n),), dtype=dt)
                for key, dt in RESULT_COLUMNS
            }
            totals = backend.fit_pass(st, rows, ref_traj, arrays, progress)
            used = totals.device
            err2, sq, count = totals.err2, totals.sq, totals.count
            create_array(group, "ref_index", data=ref_index.astype(np.int64))
            create_array(group, "ref_traj", data=ref_traj.astype(np.float32))
            create_array(group, "sample_index", data=sample_index.astype(np.int64))
            stats, stats_names = self._write_stats(st, group, rows, ref_index)
            seconds = time.perf_counter() - t0
            rel, mode_err = relative_errors(err2, sq)
            count, mode_err = count[:m], mode_err[:m]  # slot m: the constant parameters
            attrs: dict[str, Any] = {
                "format_version": 1,
                "method": "cmd",
                "n_modes": m,
                "requested_modes": n_modes,
                "threshold": self.threshold,
                "samples": int(self.n_samples),
                "seed": int(self.seed),
                "window": self.epochs or ":",
                "stride": int(self.stride),
                "epochs": [st.labels[int(r)] for r in rows],
                "rows": [int(r) for r in rows],
                "mode_sizes": [int(c) for c in count],
                "relative_error": rel,
                "mode_errors": [float(e) for e in mode_err],
                "constant": int(totals.count[m]),
                "constant_samples": int(modes.constant.sum()),
                "constant_rule": CONSTANT_RULE,
                "stats": stats,
                "stats_tensors": stats_names,
                "seconds": seconds,
                "device": used,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            group.attrs.put({RESULT_ATTR: attrs})
            pin = st.publish_result(name)
        self._set_learned(st, name, attrs, ref_index, ref_traj, sample_index)
        self.pin_ = pin

    def _write_stats(
        self, st: TrajectoryStore, group: Any, rows: np.ndarray, ref_index: np.ndarray
    ) -> tuple[str, list[str]]:
        """The statistics treatment and tensors of this fit; the window arrays of the
        ``positive`` / ``clamp`` treatments go into the partial ``group``."""
        _, recorded = stats_pattern_of(st.filters)
        stats = self.stats or (DEFAULT_STATS if recorded else LEGACY_STATS)
        tensors = store_stats(st)
        if tensors and stats in ("positive", "clamp"):
            cols, _ = stats_columns(tensors)
            fit = window_fit(st, rows, ref_index, stats_labels(group, cols))
            for key, values in fit.items():
                create_array(group, key, data=values)
        return stats, [t.name for t in tensors]

    def partial_fit(
        self,
        store: TrajectoryStore | str | os.PathLike[str],
        *,
        name: str = "cmd",
        progress: Progress | None = None,
    ) -> CMD:
        """Fold the epochs ingested since the decomposition ``name`` into it (online CMD,
        :func:`cmdtool.decomposition.update.update`); the first call, when there is none yet, fits.

        Modes, references and labels stay those of the first fit; ``a``, ``b`` and the
        errors become those of the longer window. Reads only the new rows.

        Returns
        -------
        self
        """
        from cmdtool.decomposition.update import update

        check_request(store, self.cluster, self.device)
        st = as_store(store, "r+")
        try:
            if name not in st.result_names():
                self._fit(st, name, progress)
            else:
                update(st, name, progress=progress)
                loaded = CMD.load(st, name)
                self._set_learned(
                    st,
                    name,
                    loaded.summary_,
                    loaded.ref_index_,
                    loaded.ref_traj_,
                    loaded.sample_index_,
                )
                self.pin_ = loaded.pin_
        finally:
            if st is not store:
                st.close()
        return self

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, store: TrajectoryStore | str | os.PathLike[str], name: str = "cmd") -> CMD:
        """A fitted estimator from the decomposition ``name`` saved in ``store``.

        The estimator is pinned to the published version it read (``pin_``): a writer that
        republishes ``name`` during the load makes it start again, and once ``name`` is
        replaced, reading ``labels_``, ``a_`` or ``b_`` raises ResultChangedError (load it
        again) instead of mixing the two versions.
        """
        st = as_store(store, "r")

        def read(pin: ResultPin, group: Any) -> tuple[Any, ...]:
            attrs: dict[str, Any] = dict(group.attrs[RESULT_ATTR])
            return (
                pin,
                attrs,
                np.asarray(group["ref_index"][:], dtype=np.int64),
                np.asarray(group["ref_traj"][:], dtype=np.float32),
                np.asarray(group["sample_index"][:], dtype=np.int64),
            )

        pin, attrs, ref_index, ref_traj, sample_index = st.read_result(name, read)
        est = cls(
            attrs.get("requested_modes"),
            threshold=attrs.get("threshold"),
            n_samples=attrs["samples"],
            epochs=None if attrs.get("window") == ":" else attrs.get("window"),
            stride=attrs.get("stride", 1),
            seed=attrs.get("seed", 0),
            device=attrs.get("device", "auto"),
            stats=attrs.get("stats", LEGACY_STATS),
        )
        est._set_learned(st, name, attrs, ref_index, ref_traj, sample_index)
        est.pin_ = pin
        return est

    def _set_learned(
        self,
        st: TrajectoryStore,
        name: str,
        attrs: dict[str, Any],
        ref_index: np.ndarray,
        ref_traj: np.ndarray,
        sample_index: np.ndarray,
    ) -> None:
        self.store_ = st
        self.name_ = name
        self.summary_ = attrs
        self.n_modes_ = int(attrs["n_modes"])
        self.ref_index_ = ref_index
        self.ref_traj_ = ref_traj
        self.sample_index_ = sample_index
        self.window_rows_ = np.asarray(attrs["rows"], dtype=np.int64)
        self.mode_sizes_ = np.asarray(attrs["mode_sizes"], dtype=np.int64)
        self.n_constant_ = int(attrs.get("constant", 0))
        self.relative_error_ = float(attrs["relative_error"])
        self.mode_errors_ = np.asarray(attrs["mode_errors"], dtype=np.float64)
        self.seconds_ = float(attrs["seconds"])

    def _result_array(self, key: str) -> np.ndarray:
        if not hasattr(self, "store_"):
            raise AttributeError(f"{key}_ is set by fit(); call fit() or CMD.load() first")
        return self.read_pinned(lambda group: np.asarray(group[key][:]))  # type: ignore[no-any-return]

    def read_pinned(self, read: Callable[[Any], Any]) -> Any:
        """``read(group)`` on the results group of the version this estimator was fitted
        on or loaded from (``pin_``).

        Raises
        ------
        ResultChangedError
            The decomposition was republished since (load it again).
        """
        pin: ResultPin | None = getattr(self, "pin_", None)
        if pin is None:  # pragma: no cover - every fit and load sets pin_
            return read(self.store_.open_result(self.name_))
        with pin.guard("after it was loaded; load it again (CMD.load)"):
            return read(self.store_.open_pinned(pin))

    @property
    def labels_(self) -> np.ndarray:
        return self._result_array("labels")

    @property
    def a_(self) -> np.ndarray:
        return self._result_array("a")

    @property
    def b_(self) -> np.ndarray:
        return self._result_array("b")

    @property
    def constant_(self) -> np.ndarray:
        """bool (N,): parameters constant over the window (all False for a decomposition
        made before cmdtool knew the constant rule)."""
        if not hasattr(self, "store_"):
            raise AttributeError("constant_ is set by fit(); call fit() or CMD.load() first")
        n = self.store_.n_params

        def read(group: Any) -> np.ndarray:
            if "constant" not in group:
                return np.zeros(n, dtype=bool)
            return np.asarray(group["constant"][:], dtype=bool)

        return self.read_pinned(read)  # type: ignore[no-any-return]
