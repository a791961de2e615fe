"""Write rebuilt (or stored) epochs as checkpoint files, on this machine or a Dask cluster."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from cmdtool.backends import check_request, open_backend
from cmdtool.decomposition import CMD
from cmdtool.errors import StoreError, UsageError
from cmdtool.reconstruction.layouts import (
    LAYOUTS,
    check_sources,
    header_metadata,
    remove_leftovers,
    target_path,
    unshare,
    write_source_layout,
)
from cmdtool.reconstruction.rebuild import raw_state, rebuild_state
from cmdtool.store import TrajectoryStore
from cmdtool.store.epochs import select_epochs
from cmdtool.store.results import retry_republished

FORMATS = ("safetensors", "pt")
#: OUT ending so names one checkpoint file (of this format), not a folder
FILE_SUFFIXES = {".safetensors": "safetensors", ".pt": "pt"}


#: ``.<file>.cmdtool-<host hash>-<pid>-<random>.tmp``: the temporaries of
#: :func:`_atomic_write`, named after their writer so that a later run removes only
#: those of a writer that is gone, never a user's file (nor a running writer's).
_TMP_RE = re.compile(r"\..+\.cmdtool-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[A-Za-z0-9_]+\.tmp")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _remove_dead_temporaries(out_dir: Path) -> None:
    """Delete the temporaries that killed writers on this host left in ``out_dir``."""
    host = _host_tag()
    for node in out_dir.glob(".*.tmp"):
        m = _TMP_RE.fullmatch(node.name)
        if m is None or m["host"] != host or not node.is_file() or node.is_symlink():
            continue
        pid = int(m["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            node.unlink(missing_ok=True)  # its writer is gone
        except (PermissionError, OverflowError):
            pass


@functools.cache
def _umask() -> int:
    """The process's umask (read from /proc where it can be; setting it back at once
    elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary file in the same folder, then rename over ``path``."""
    prefix = f".{path.name}.cmdtool-{_host_tag()}-{os.getpid()}-"
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        write(tmp)
        # mkstemp (and safetensors, which writes a file of its own) make 0600: the
        # checkpoint gets the mode any file the user creates gets
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except Exception as exc:
        # safetensors and torch report a failed write (a full disk) as their own errors
        reason = _write_failure(exc, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if reason is None:
            raise
        raise StoreError(f"cannot write {path}: {reason}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_failure(exc: BaseException, folder: Path) -> str | None:
    """Why a checkpoint writer failed, when the file system refused the write (issue 11:
    a full disk is exit 6, not an internal error): the errno it names, or a full file
    system; None when the failure is not an I/O one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.strerror or os.strerror(seen.errno)
        found = re.search(r"os error (\d+)", str(seen))
        if found:
            return os.strerror(int(found.group(1)))
        seen = seen.__cause__ or seen.__context__
    try:
        full = os.statvfs(folder).f_bavail == 0
    except OSError:
        full = False
    return os.strerror(errno.ENOSPC) if full else None


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
    fmt: str | None = None,
    raw: bool = False,
    cluster: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    layout: str = "flat",
) -> ReconstructSummary:
    """Write ``OUT/epoch_<label>.safetensors`` (or ``.pt``) for the chosen epochs.

    Parameters
    ----------
    store : TrajectoryStore or path
    out : path
        Output folder, created if missing; or one checkpoint file: a path ending in
        ``.safetensors`` or ``.pt`` (that is not an existing folder) is written as that
        file, in the format its suffix names, when exactly one epoch is selected
        (UsageError otherwise, before anything is written).
    epochs : str
        ``last``, ``all``, ``A:B`` (labels, half-open) or ``3,7,10``.
    name : str
        The decomposition to use.
    fmt : {"safetensors", "pt"}, optional
        Default: ``safetensors``, or the suffix of a file ``out`` (which ``fmt`` must
        then agree with).
    raw : bool
        Write the stored epochs themselves instead of the model's (no decomposition
        needed): an export of the store.
    cluster : str, optional
        Write one file per Dask task on this ``dask.distributed`` scheduler address, or
        ``"local"`` (see :mod:`cmdtool.backends.dask`); the workers must see the store and
        ``out`` at the same paths. The files are the same as without it.
    layout : {"flat", "source"}
        ``flat``: ``OUT/epoch_<label>.<fmt>``. ``source``: each epoch at ``OUT/<its source
        path>`` in the layout it came from (:mod:`cmdtool.reconstruction.layouts`; ``fmt``
        does not apply); an epoch whose layout needs its source folder or file (Hugging
        Face folders, Lightning files) that is gone stops the run before anything is
        written (SourceNotFoundError).
    """
    out_path = Path(out)
    file_fmt = _file_format(out_path, fmt, layout)
    fmt = file_fmt or ("safetensors" if fmt is None else fmt)
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "source" and fmt != "safetensors":
        raise UsageError("--format applies to --layout flat: --layout source keeps each format")
    check_request(store, cluster, "auto")
    st = store if isinstance(store, TrajectoryStore) else TrajectoryStore.open(store)
    model = None if raw else CMD.load(st, name)
    rows = select_epochs(st.labels, epochs)
    if file_fmt is not None and len(rows) != 1:
        raise UsageError(
            f"OUT {out_path} names one checkpoint file but --epochs {epochs!r} selects "
            f"{len(rows)} epochs; give a folder, or select one epoch"
        )
    if layout == "source":  # before anything is written
        check_sources(st, [st.labels[int(r)] for r in rows])
    out_dir = out_path.parent if file_fmt is not None else out_path
    file_name = out_path.name if file_fmt is not None else None
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
    _remove_dead_temporaries(out_dir)  # of a reconstruct that was killed; never a user's file
    labels = [st.labels[int(r)] for r in rows]
    if layout == "source":
        remove_leftovers(out_dir)
    with open_backend(cluster) as backend:

        def write_all(model: CMD | None) -> None:
            writer = EpochWriter(
                str(st.path.resolve()),
                None if model is None else model.name_,
                str(out_dir.resolve()),
                fmt,
                None if model is None else model.pin_.generation,
                layout=layout,
                file_name=file_name,
                _st=st,
                _model=model,
            )
            backend.map(
                writer,
                labels,
                lambda label: f"epoch {label}",
                None if progress is None else lambda i, n, path: progress(i, n, Path(path).name),
            )

        if model is None:
            write_all(None)
        else:
            # every file of the run from one published version: a republish of `name`
            # meanwhile (ResultChangedError from any epoch) writes them all again from the
            # new version ("Publishing results" in docs/design.md)
            loaded = [model]
            retry_republished(
                f"decomposition {name!r} of store {st.path}",
                lambda: write_all(loaded.pop() if loaded else CMD.load(st, name)),
            )
    return ReconstructSummary(
        files=[
            str(
                target_path(out_dir, st.epochs[st.row_of(label)])
                if layout == "source"
                else _target(out_dir, label, fmt, file_name)
            )
            for label in labels
        ],
        epochs=labels,
    )


@dataclass
class EpochWriter:
    """``writer(label)`` writes epoch ``label`` into ``out_dir`` and returns the file's path:
    the task a backend maps over the epochs. Picklable: a copy sent to a Dask worker
    opens the store (and loads the decomposition ``name``; None: ``--raw``) there, once,
    and refuses (ResultChangedError) a version other than ``generation``, the one the
    client pinned.
    """

    store: str
    name: str | None
    out_dir: str
    fmt: str
    generation: str | None = None
    layout: str = "flat"
    file_name: str | None = None
    _st: TrajectoryStore | None = field(default=None, repr=False)
    _model: CMD | None = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_st": None, "_model": None}

    def __call__(self, label: int) -> str:
        if self._st is None:
            self._st = TrajectoryStore.open(self.store)
            self._model = None if self.name is None else CMD.load(self._st, self.name)
        if self._model is not None and self._model.pin_.generation != self.generation:
            raise self._model.pin_.changed("since the run started")  # the run starts again
        return write_epoch(
            self._st,
            self._model,
            label,
            Path(self.out_dir),
            self.fmt,
            layout=self.layout,
            file_name=self.file_name,
        )


def _file_format(out: Path, fmt: str | None, layout: str) -> str | None:
    """The format when ``out`` names one checkpoint file (it ends in ``.safetensors`` or
    ``.pt`` and is not an existing folder); None when it is a folder. UsageError for an
    existing file of another name, a ``fmt`` that contradicts the suffix, or
    ``layout="source"`` (which writes folders)."""
    suffix_fmt = FILE_SUFFIXES.get(out.suffix.lower())
    if suffix_fmt is None or out.is_dir():
        if out.exists() and not out.is_dir():
            raise UsageError(
                f"OUT {out} is a file: give a folder, or a checkpoint file ending in "
                ".safetensors or .pt"
            )
        return None
    if fmt is not None and fmt != suffix_fmt:
        raise UsageError(f"OUT {out} ends in {out.suffix} but --format is {fmt!r}")
    if layout != "flat":
        raise UsageError(f"--layout {layout} writes folders: give a folder as OUT, not {out}")
    return suffix_fmt


def _target(out_dir: Path, label: int, fmt: str, file_name: str | None = None) -> Path:
    if file_name is not None:
        return out_dir / file_name
    return out_dir / f"epoch_{label}.{'safetensors' if fmt == 'safetensors' else 'pt'}"


def write_epoch(
    st: TrajectoryStore,
    model: CMD | None,
    label: int,
    out_dir: Path,
    fmt: str,
    *,
    layout: str = "flat",
    file_name: str | None = None,
) -> str:
    """Write epoch ``label`` rebuilt from ``model`` (None: as stored) into ``out_dir``.

    The file is written under a temporary name and renamed; returns its path. safetensors
    files carry the source's header metadata (``{"format": "pt"}`` when it had none);
    ``layout="source"`` writes the epoch in its source's layout instead; ``file_name``
    names the file (default ``epoch_<label>.<fmt>``).
    """
    state = raw_state(st, label) if model is None else rebuild_state(model, label)
    if layout == "source":
        return write_source_layout(st, label, state, out_dir)
    target = _target(out_dir, label, fmt, file_name)
    if fmt == "safetensors":
        meta = header_metadata(st.epochs[st.row_of(label)])
        flat = unshare(state)  # tied tensors: a copy each (safetensors shares nothing)
        _atomic_write(target, lambda p, s=flat: save_file(s, p, meta))  # type: ignore[misc]
    else:
        _atomic_write(target, lambda p, s=state: _torch_save(s, p))  # type: ignore[misc]
    return str(target)


def _torch_save(state: dict[str, torch.Tensor], path: str) -> None:
    """``torch.save`` through a Python file, so that a failed write (a full disk) is an
    OSError torch chains to its own error (:func:`_write_failure` finds it)."""
    with open(path, "wb") as f:
        torch.save(state, f)
