"""Write rebuilt (or stored) epochs as checkpoint files, on this machine or a Dask cluster."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from cmdtool.backends import check_request, open_backend
from cmdtool.decomposition import CMD
from cmdtool.errors import StoreError, UsageError
from cmdtool.reconstruction.rebuild import raw_state, rebuild_state
from cmdtool.store import TrajectoryStore
from cmdtool.store.epochs import select_epochs

FORMATS = ("safetensors", "pt")


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same folder, then rename over ``path``."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class ReconstructSummary:
    files: list[str]
    epochs: list[int]


def reconstruct(
    store: TrajectoryStore | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epochs: str = "last",
    name: str = "cmd",
    fmt: str = "safetensors",
    raw: bool = False,
    cluster: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> ReconstructSummary:
    """Write ``OUT/epoch_<label>.safetensors`` (or ``.pt``) for the chosen epochs.

    Parameters
    ----------
    store : TrajectoryStore or path
    out : path
        Output folder, created if missing.
    epochs : str
        ``last``, ``all``, ``A:B`` (labels, half-open) or ``3,7,10``.
    name : str
        The decomposition to use.
    fmt : {"safetensors", "pt"}
    raw : bool
        Write the stored epochs themselves instead of the model's (no decomposition
        needed): an export of the store.
    cluster : str, optional
        Write one file per Dask task on this ``dask.distributed`` scheduler address, or
        ``"local"`` (see :mod:`cmdtool.backends.dask`); the workers must see the store and
        ``out`` at the same paths. The files are the same as without it.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    check_request(store, cluster, "auto")
    st = store if isinstance(store, TrajectoryStore) else TrajectoryStore.open(store)
    model = None if raw else CMD.load(st, name)
    rows = select_epochs(st.labels, epochs)
    out_dir = Path(out)
    where = out_dir.resolve()
    if where == st.path.resolve() or st.path.resolve() in where.parents:
        raise UsageError(f"output folder {out_dir} is inside the store {st.path}; pick another")
    if str(where) in st.source_roots:
        raise UsageError(
            f"output folder {out_dir} holds the source checkpoints of this store; "
            "writing there could overwrite them, pick another"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from exc
    for leftover in out_dir.glob(".epoch_*.tmp"):  # from a reconstruct that was killed
        leftover.unlink(missing_ok=True)
    labels = [st.labels[int(r)] for r in rows]
    writer = EpochWriter(
        str(st.path.resolve()),
        None if model is None else model.name_,
        str(out_dir.resolve()),
        fmt,
        _st=st,
        _model=model,
    )
    with open_backend(cluster) as backend:
        backend.map(
            writer,
            labels,
            lambda label: f"epoch {label}",
            None if progress is None else lambda i, n, path: progress(i, n, Path(path).name),
        )
    return ReconstructSummary(
        files=[str(_target(out_dir, label, fmt)) for label in labels], epochs=labels
    )


@dataclass
class EpochWriter:
    """``writer(label)`` writes epoch ``label`` into ``out_dir`` and returns the file's path:
    the task a backend maps over the epochs. Picklable: a copy sent to a Dask worker
    opens the store (and loads the decomposition ``name``; None: ``--raw``) there, once.
    """

    store: str
    name: str | None
    out_dir: str
    fmt: str
    _st: TrajectoryStore | None = field(default=None, repr=False)
    _model: CMD | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_st": None, "_model": None}

    def __call__(self, label: int) -> str:
        if self._st is None:
            self._st = TrajectoryStore.open(self.store)
            self._model = None if self.name is None else CMD.load(self._st, self.name)
        return write_epoch(self._st, self._model, label, Path(self.out_dir), self.fmt)


def _target(out_dir: Path, label: int, fmt: str) -> Path:
    return out_dir / f"epoch_{label}.{'safetensors' if fmt == 'safetensors' else 'pt'}"


def write_epoch(st: TrajectoryStore, model: CMD | None, label: int, out_dir: Path, fmt: str) -> str:
    """Write epoch ``label`` rebuilt from ``model`` (None: as stored) into ``out_dir``.

    The file is written under a temporary name and renamed; returns its path.
    """
    state = raw_state(st, label) if model is None else rebuild_state(model, label)
    target = _target(out_dir, label, fmt)
    if fmt == "safetensors":
        _atomic_write(target, lambda p, s=state: save_file(s, p))  # type: ignore[misc]
    else:
        _atomic_write(target, lambda p, s=state: torch.save(s, p))  # type: ignore[misc]
    return str(target)
