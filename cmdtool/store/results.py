"""Results groups (decompositions) inside a store: written hidden, published by rename,
read as one version.

A decomposition is written under ``.partial-<name>``, stamped with a fresh
``cmdtool_generation`` token and renamed into place once complete; the previous one is
renamed to ``.partial-<name>.old`` first and removed after (renamed to ``.trash-<hex>``,
then deleted), and a reader that finds only the ``.old`` folder uses it. ``.scratch-<hex>``
groups are fits a writer needs only while it runs.

Readers pin the version they open (:class:`ResultPin`: the folder and its generation),
read, and check the pin again afterwards: a generation is stamped into one folder only,
and a folder leaves a path (rename, trash) in one atomic step, so an unchanged token
means that every file read came from that one version. On a switch the reader starts
again from scratch (:func:`retry_republished`). See ``docs/design.md``, "Publishing
results".
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import zarr
import zarr.storage

from cmdtool.errors import (
    CmdtoolError,
    DecompositionNotFoundError,
    ResultChangedError,
    StoreError,
)
from cmdtool.store.layout import (
    GENERATION_ATTR,
    PARTIAL_PREFIX,
    RESULT_ATTR,
    SCRATCH_PREFIX,
    TRASH_PREFIX,
    check_result_name,
)
from cmdtool.store.validate import unreadable_group

T = TypeVar("T")
#: Times a reader starts again when the decomposition it reads is republished meanwhile.
READ_ATTEMPTS = 8
#: Pause before the i-th new attempt: RETRY_PAUSE_S * 2**i, at most 0.5 s (the writer's
#: renames take milliseconds; a writer republishing in a loop gets time to pause).
RETRY_PAUSE_S = 0.01
OLD_SUFFIX = ".old"


def new_generation() -> str:
    """A fresh generation token: 32 hex digits, never reused."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class ResultPin:
    """One published version of a decomposition, as a reader opened it.

    Attributes
    ----------
    root : Path
        The store folder.
    name : str
        The decomposition's name.
    folder : str
        The folder it was read from: ``name``, or ``.partial-<name>.old`` while a writer
        is between its two renames.
    generation : str or None
        The group's ``cmdtool_generation`` when it was opened (None: written before
        cmdtool stamped generations).
    """

    root: Path
    name: str
    folder: str
    generation: str | None

    def is_current(self) -> bool:
        """Whether ``folder`` still holds this version (one read of its ``zarr.json``)."""
        attrs = _group_attrs(self.root / self.folder)
        return attrs is not None and RESULT_ATTR in attrs and (
            attrs.get(GENERATION_ATTR) == self.generation
        )

    def changed(self, when: str = "while it was being read") -> ResultChangedError:
        return ResultChangedError(
            f"decomposition {self.name!r} of store {self.root} was republished {when}"
        )

    def check(self) -> None:
        """Raise :class:`ResultChangedError` unless ``folder`` still holds this version."""
        if not self.is_current():
            raise self.changed()

    @contextmanager
    def guard(self, when: str = "while it was being read") -> Iterator[None]:
        """``with pin.guard(): <reads>``: the reads came from this version, or
        :class:`ResultChangedError` is raised (also in place of any error the reads raised
        after a switch: a vanished file, an index out of range)."""
        try:
            yield
        except ResultChangedError:
            raise
        except Exception as exc:
            if not self.is_current():
                raise self.changed(when) from exc
            raise
        if not self.is_current():
            raise self.changed(when)


def retry_republished(what: str, attempt: Callable[[], T], attempts: int | None = None) -> T:
    """``attempt()``, started again from scratch each time it raises
    :class:`ResultChangedError` (a writer republished what it read), at most
    ``attempts`` (default :data:`READ_ATTEMPTS`) times; then a :class:`StoreError` naming
    ``what``."""
    attempts = READ_ATTEMPTS if attempts is None else attempts
    for i in range(attempts):
        try:
            return attempt()
        except ResultChangedError:
            if i + 1 < attempts:
                time.sleep(min(RETRY_PAUSE_S * 2**i, 0.5))  # let the writer finish
    raise StoreError(
        f"{what} was republished {attempts} times while it was being read; run the command "
        "again once the writer (decompose, update, watch) has finished"
    )


def _group_attrs(folder: Path) -> dict[str, Any] | None:
    """The attributes of the zarr group at ``folder``; None if there is none (now)."""
    try:
        meta = json.loads((folder / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = meta.get("attributes", {})
    return attrs if isinstance(attrs, dict) else None


class ResultGroups:
    """The results-group half of :class:`~cmdtool.store.TrajectoryStore`."""

    path: Path
    _group: zarr.Group

    def _require_writable(self) -> None:  # pragma: no cover - TrajectoryStore's
        raise NotImplementedError

    def _check_result(self, pin: ResultPin, group: zarr.Group) -> None:  # pragma: no cover
        raise NotImplementedError  # TrajectoryStore's: validate.validate_result, cached

    def _recover_results(self) -> None:
        """Undo what a killed result writer left: finish or drop its partial groups."""
        for node in self.path.glob(PARTIAL_PREFIX + "*"):
            if node.name.endswith(OLD_SUFFIX):
                final = self.path / node.name[len(PARTIAL_PREFIX) : -len(OLD_SUFFIX)]
                if not final.exists():
                    # killed between the two renames of publish: restore the old version
                    # under a fresh generation, so that a reader that pinned it at either
                    # path sees a change
                    self._stamp(node)
                    os.replace(node, final)
                    continue
            self._remove(node)
        for node in self.path.glob(SCRATCH_PREFIX + "*"):
            shutil.rmtree(node, ignore_errors=True)  # a killed writer's scratch fits
        for node in self.path.glob(TRASH_PREFIX + "*"):
            shutil.rmtree(node, ignore_errors=True)  # a killed writer's removed version

    def result_names(self) -> list[str]:
        """Names of the complete decompositions in this store (one a writer is
        publishing right now included)."""
        names = set()
        with os.scandir(self.path) as entries:
            folders = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        for folder in folders:
            name = folder
            if folder.startswith(PARTIAL_PREFIX) and folder.endswith(OLD_SUFFIX):
                name = folder[len(PARTIAL_PREFIX) : -len(OLD_SUFFIX)]
            elif folder.startswith("."):
                continue  # partial, scratch and trash groups; no name starts with "."
            attrs = _group_attrs(self.path / folder)
            if attrs is not None and RESULT_ATTR in attrs:
                names.add(name)
        return sorted(names)

    def pin_result(self, name: str) -> tuple[ResultPin, zarr.Group]:
        """The current version of decomposition ``name``: its pin and its group.

        Reads through the group are of that version only if ``pin.check()`` (or
        ``pin.guard()``) passes after them; :meth:`read_result` does both.

        Raises
        ------
        DecompositionNotFoundError
            The store has no decomposition ``name``.
        """
        folders = [name, PARTIAL_PREFIX + name + OLD_SUFFIX]
        if name.startswith(SCRATCH_PREFIX):
            folders = [name]
        # a publish renames <name> to .old, then the new one to <name>: one of the two is
        # always there, so a second look finds what the first missed
        switched: ResultChangedError | None = None
        for _ in range(3):
            for folder in folders:
                if not (self.path / folder / "zarr.json").is_file():
                    continue
                try:
                    group = self._group[folder]
                except (KeyError, OSError, ValueError):
                    continue  # gone since the look above
                if not isinstance(group, zarr.Group):
                    continue
                attrs = group.attrs.asdict()
                if RESULT_ATTR not in attrs:
                    continue
                generation = attrs.get(GENERATION_ATTR)
                pin = ResultPin(
                    self.path, name, folder, generation if isinstance(generation, str) else None
                )
                try:
                    with pin.guard():  # a republish during the check: look again
                        self._check_result(pin, group)  # issue 11: its arrays against the store
                except ResultChangedError as exc:
                    switched = exc
                    continue
                return pin, group
        if switched is not None:
            raise switched  # read_result starts again
        damaged = unreadable_group(self.path / name)  # issue 11: exit 6, not "not found"
        if damaged is not None:
            raise StoreError(f"store {self.path} is damaged: decomposition {name!r} {damaged}")
        have = ", ".join(self.result_names()) or "none"
        raise DecompositionNotFoundError(
            f"store {self.path} has no decomposition named {name!r} (it has: {have}); "
            "run 'cmdtool decompose' first"
        )

    def open_result(self, name: str) -> zarr.Group:
        """The group of decomposition ``name`` as it is now (a writer's view: a reader
        that must not mix versions uses :meth:`read_result`)."""
        return self.pin_result(name)[1]

    def open_pinned(self, pin: ResultPin) -> zarr.Group:
        """The group at ``pin``'s folder; whether it is still that version is told by
        ``pin.check()`` after the reads."""
        try:
            group = self._group[pin.folder]
        except (KeyError, OSError, ValueError) as exc:
            raise pin.changed() from exc
        if not isinstance(group, zarr.Group):
            raise pin.changed()
        return group

    def read_result(
        self,
        name: str,
        read: Callable[[ResultPin, zarr.Group], T],
        *,
        expect: ResultPin | None = None,
    ) -> T:
        """``read(pin, group)`` on one version of decomposition ``name``, started again
        when a writer republishes it meanwhile (at most :data:`READ_ATTEMPTS` times).

        Parameters
        ----------
        name : str
        read : callable
            Reads what it needs through ``group`` and returns it.
        expect : ResultPin, optional
            Read exactly this version: :class:`ResultChangedError` if it is no longer
            the current one (no retry; the caller starts again).
        """

        def once() -> T:
            pin, group = self.pin_result(name)
            if expect is not None and pin.generation != expect.generation:
                raise expect.changed()
            with pin.guard():
                return read(pin, group)

        if expect is not None:
            return once()
        return retry_republished(f"decomposition {name!r} of store {self.path}", once)

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

    def _stamp(self, folder: Path) -> str:
        """Give the group at ``folder`` a fresh generation (one atomic rewrite of its
        ``zarr.json``); returns it."""
        generation = new_generation()
        group = self._group[folder.name]
        group.attrs.update({GENERATION_ATTR: generation})
        return generation

    def _remove(self, folder: Path) -> None:
        """Delete ``folder``: renamed away first (atomic), so that a reader that pinned
        it never finds it half deleted."""
        trash = self.path / (TRASH_PREFIX + new_generation()[:12])
        try:
            os.replace(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def publish_result(self, name: str) -> ResultPin:
        """Replace the results group ``name`` by its completed partial group, under a
        fresh generation; returns the pin of the published version."""
        partial = self.path / (PARTIAL_PREFIX + name)
        final = self.path / name
        old = self.path / (PARTIAL_PREFIX + name + OLD_SUFFIX)
        try:
            generation = self._stamp(partial)
            if final.exists():
                self._remove(old)
                os.replace(final, old)
            os.replace(partial, final)
            self._remove(old)
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc
        return ResultPin(self.path, name, name, generation)

    def set_result_attr(
        self, name: str, key: str, value: Any, *, expect: ResultPin | None = None
    ) -> None:
        """Set the JSON attribute ``key`` of the results group ``name`` (a writer only).

        The caller holds the write lock (a store opened with ``mode="r+"``); zarr rewrites
        the group's one ``zarr.json`` through a temporary file, so readers see the old or
        the new attributes, never a mix. The generation is kept: the arrays did not change.
        With ``expect``, the attribute is set only on that version
        (:class:`ResultChangedError` if another one was published since).
        """
        self._require_writable()
        pin, group = self.pin_result(name)
        if expect is not None and pin.generation != expect.generation:
            raise expect.changed("after it was read")
        try:
            group.attrs.update({key: value})
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: {exc.strerror or exc}") from exc

    def result_attr(self, name: str, key: str) -> Any:
        """The JSON attribute ``key`` of the results group ``name``; None if unset."""
        return self.open_result(name).attrs.asdict().get(key)

    def discard_result(self, name: str) -> None:
        shutil.rmtree(self.path / (PARTIAL_PREFIX + name), ignore_errors=True)
