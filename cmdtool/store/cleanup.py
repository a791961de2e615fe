"""Removing what a failed or killed writer left on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cmdtool.store.layout import ZARR_TMP_RE


def remove_store(path: Path, *, keep_folder: bool) -> None:
    """Undo a store created by a failed first write (an empty folder stays a folder)."""
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
