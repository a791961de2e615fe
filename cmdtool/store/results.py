"""Results groups (decompositions) inside a store: written hidden, published by rename.

A decomposition is written under ``.partial-<name>`` and renamed into place once
complete; the previous one is renamed to ``.partial-<name>.old`` first and removed
after, and a reader that finds only that folder uses it. ``.scratch-<hex>`` groups are
fits a writer needs only while it runs. See ``docs/design.md``, "Publishing results".
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zarr
import zarr.storage

from cmdtool.errors import CmdtoolError, StoreError
from cmdtool.store.layout import (
    PARTIAL_PREFIX,
    RESULT_ATTR,
    SCRATCH_PREFIX,
    check_result_name,
)


class ResultGroups:
    """The results-group half of :class:`~cmdtool.store.TrajectoryStore`."""

    path: Path
    _group: zarr.Group

    def _require_writable(self) -> None:  # pragma: no cover - TrajectoryStore's
        raise NotImplementedError

    def _recover_results(self) -> None:
        """Undo what a killed result writer left: finish or drop its partial groups."""
        for node in self.path.glob(PARTIAL_PREFIX + "*"):
            if node.name.endswith(".old"):
                final = self.path / node.name[len(PARTIAL_PREFIX) : -len(".old")]
                if not final.exists():
                    os.replace(node, final)  # killed between the two renames of publish
                    continue
            shutil.rmtree(node, ignore_errors=True)
        for node in self.path.glob(SCRATCH_PREFIX + "*"):
            shutil.rmtree(node, ignore_errors=True)  # a killed writer's scratch fits

    def result_names(self) -> list[str]:
        """Names of the complete decompositions in this store."""
        names = []
        with warnings.catch_warnings():
            # the lock file is not a zarr node; zarr warns when it lists the group
            warnings.filterwarnings("ignore", message=".*not recognized as a component")
            groups = list(self._group.groups())
        for name, node in groups:
            if name.startswith((PARTIAL_PREFIX, SCRATCH_PREFIX)):
                continue
            if RESULT_ATTR in node.attrs:
                names.append(name)
        return sorted(names)

    def open_result(self, name: str) -> zarr.Group:
        from cmdtool.errors import DecompositionNotFoundError

        if name.startswith(SCRATCH_PREFIX) and (self.path / name / "zarr.json").is_file():
            return self._group[name]  # type: ignore[return-value]
        if name not in self.result_names():
            old = PARTIAL_PREFIX + name + ".old"
            if (self.path / old / "zarr.json").is_file():
                # a writer was killed between the two renames of publish_result
                return self._group[old]  # type: ignore[return-value]
            have = ", ".join(self.result_names()) or "none"
            raise DecompositionNotFoundError(
                f"store {self.path} has no decomposition named {name!r} (it has: {have}); "
                "run 'cmdtool decompose' first"
            )
        return self._group[name]  # type: ignore[return-value]

    def begin_result(self, name: str) -> zarr.Group:
        """Create a hidden partial results group; :meth:`publish_result` makes it visible."""
        self._require_writable()
        check_result_name(name)
        partial = PARTIAL_PREFIX + name
        shutil.rmtree(self.path / partial, ignore_errors=True)
        try:
            return self._group.create_group(partial)
        except OSError as exc:
            shutil.rmtree(self.path / partial, ignore_errors=True)
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc

    @contextmanager
    def writing_result(self, name: str) -> Iterator[zarr.Group]:
        """``with st.writing_result(name) as group:`` a partial results group, discarded
        when the block raises (an OSError becomes a StoreError); the block ends with
        :meth:`publish_result`."""
        group = self.begin_result(name)
        try:
            yield group
        except CmdtoolError:  # already says what failed (a ClusterError is an OSError too)
            self.discard_result(name)
            raise
        except OSError as exc:
            self.discard_result(name)
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc
        except BaseException:
            self.discard_result(name)
            raise

    def publish_result(self, name: str) -> None:
        """Replace the results group ``name`` by its completed partial group."""
        partial = self.path / (PARTIAL_PREFIX + name)
        final = self.path / name
        old = self.path / (PARTIAL_PREFIX + name + ".old")
        try:
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc

    def set_result_attr(self, name: str, key: str, value: Any) -> None:
        """Set the JSON attribute ``key`` of the results group ``name`` (a writer only).

        The caller holds the write lock (a store opened with ``mode="r+"``); zarr rewrites
        the group's one ``zarr.json`` through a temporary file, so readers see the old or
        the new attributes, never a mix.
        """
        self._require_writable()
        group = self.open_result(name)
        try:
            group.attrs.update({key: value})
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc

    def result_attr(self, name: str, key: str) -> Any:
        """The JSON attribute ``key`` of the results group ``name``; None if unset."""
        return self.open_result(name).attrs.asdict().get(key)

    def discard_result(self, name: str) -> None:
        shutil.rmtree(self.path / (PARTIAL_PREFIX + name), ignore_errors=True)

