"""Removing what a failed or killed writer left on disk."""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from pathlib import Path

from cmdtool.store.layout import EXTRAS, POOL, POOL_INDEX, WEIGHTS, ZARR_TMP_RE
from cmdtool.store.lock import LOCK_NAME, _alive, holder_gone
from cmdtool.store.objects import is_url, remote

#: Infix of the hidden sibling folder a store is built in before it is renamed into
#: place: ``.<name>.creating-<pid>-<hex>``.
CREATING = ".creating-"


def store_present(path: str | os.PathLike[str]) -> bool:
    """Whether a complete store is at ``path`` (a folder, or an object-store URL); a store
    a killed creation left half made is not one (it is created anew)."""
    if is_url(path):
        return bool(remote("exists")(str(path)))
    p = Path(path)
    return (p / "zarr.json").exists() and not is_half_made_store(p)


def remove_store(path: Path | str, *, keep_folder: bool) -> None:
    """Undo a store created by a failed first write (an empty folder stays a folder; at
    an object-store URL, every object under the prefix is deleted)."""
    if is_url(path):
        remote("remove")(str(path))
        return
    path = Path(path)
    if not keep_folder:
        shutil.rmtree(path, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def remove_zarr_temporaries(root: str | os.PathLike[str]) -> None:
    """Delete the ``<name>.<uuid hex>.partial`` files zarr writes before renaming a chunk
    or ``zarr.json`` into place, left under ``root`` by a writer that died mid-write."""
    for tmp in Path(root).rglob("*.partial"):
        if ZARR_TMP_RE.search(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)


def creation_folder(path: Path) -> Path:
    """A fresh hidden sibling of ``path`` to build a new store in (then renamed to it)."""
    return path.parent / f".{path.name}{CREATING}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_abandoned_creations(path: Path) -> None:
    """Delete the hidden folders that killed creations of the store ``path`` left: those
    whose lock's process is gone, or (killed before the lock was taken) whose creator's
    pid, part of the name, no longer runs."""
    pattern = f".{glob.escape(path.name)}{CREATING}*"
    for folder in path.parent.glob(pattern):
        if not folder.is_dir() or folder.is_symlink():
            continue
        pid_text = folder.name[len(f".{path.name}{CREATING}") :].split("-", 1)[0]
        if (folder / LOCK_NAME).exists():
            gone = holder_gone(folder)
        else:
            gone = pid_text.isdigit() and int(pid_text) != os.getpid()
            gone = gone and not _alive(int(pid_text), None)
        if gone:
            shutil.rmtree(folder, ignore_errors=True)


def is_half_made_store(path: Path) -> bool:
    """Whether ``path`` is a store an older cmdtool was killed while creating (it built
    stores in place): a folder holding only cmdtool's own names (its lock, whose process
    is gone, a root ``zarr.json`` without the ``cmdtool`` attribute, the arrays' folders,
    zarr's temporaries)."""
    if not path.is_dir() or not holder_gone(path):
        return False
    root = path / "zarr.json"
    if root.is_file():
        try:
            meta = json.loads(root.read_bytes())
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta, dict) and "cmdtool" in (meta.get("attributes") or {}):
            return False  # a complete store: not half made
    ours = {LOCK_NAME, "zarr.json", WEIGHTS, POOL, POOL_INDEX, EXTRAS}
    return all(
        c.name in ours or c.name.startswith(LOCK_NAME) or ZARR_TMP_RE.search(c.name)
        for c in path.iterdir()
    )


def clear_half_made_store(path: Path) -> bool:
    """Empty ``path`` if :func:`is_half_made_store`; returns whether it did (anything else
    is left alone)."""
    if not is_half_made_store(path):
        return False
    for child in path.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    (path / LOCK_NAME).unlink(missing_ok=True)
    return True


#: ``cmdtool upgrade`` (:mod:`cmdtool.store.upgrade`) writes the checksummed copy of array
#: ``X`` as ``.upgrade-X`` beside it, and moves the old one to ``.upgrade-old-X`` while
#: swapping them.
UPGRADE_PREFIX = ".upgrade-"
UPGRADE_OLD_PREFIX = ".upgrade-old-"


def recover_upgrade(root: Path) -> None:
    """Undo what a killed ``cmdtool upgrade`` left in the store ``root`` (top level and
    decompositions): an array caught between its two renames gets its old folder back,
    half-written copies are deleted."""
    folders = [root, *(d for d in root.iterdir() if d.is_dir() and not d.is_symlink())]
    for folder in folders:
        for node in folder.glob(UPGRADE_OLD_PREFIX + "*"):
            final = folder / node.name[len(UPGRADE_OLD_PREFIX) :]
            if not final.exists():
                os.replace(node, final)
            else:
                shutil.rmtree(node, ignore_errors=True)
        for node in folder.glob(UPGRADE_PREFIX + "*"):
            shutil.rmtree(node, ignore_errors=True)
