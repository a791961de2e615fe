"""The report folder: what ``--force`` may replace, and the leftovers of killed runs.

A report is written into a hidden sibling ``.<name>.partial-<pid>-<random>``, renamed into
place. Its last file is the manifest :data:`MANIFEST`: the name, size and sha256 of
every file the run wrote. ``--force`` replaces a folder only when everything in it is
such a file, unchanged (or, for a report made before manifests existed, one of the file
names a report writes): a folder that holds a store, a stray ``report.json`` beside other
files, or an edited ``report.html`` is refused, naming what is in the way, and nothing is
deleted. The files of the replaced report are removed one by one, never with
``rmtree``, so whatever cmdtool did not write stays. A run also removes the
``.<name>.partial-<pid>`` / ``.<name>.old-<pid>`` folders of report runs that were
killed (their pid is gone), again file by file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from cmdtool.errors import StoreError, UsageError

MANIFEST = ".cmdtool-report.json"
MANIFEST_KEY = "cmdtool_report_files"
#: The files a report writes (a report made before manifests has only these names).
REPORT_FILES = frozenset(
    {
        "report.html",
        "report.json",
        "correlation.png",
        "references.png",
        "members.png",
        "bands.png",
        "tensor_modes.png",
        "errors.png",
        "evaluation.png",
        "sweep.png",
    }
)
#: What a report run writes into its partial folder (figures of any section included).
_PARTIAL_FILE_RE = re.compile(
    r"[A-Za-z0-9_]+\.png|report\.html|report\.json|" + re.escape(MANIFEST)
)
#: ``.<name>.partial-<pid>[-<random>]`` and ``.<name>.old-<pid>`` beside the folder.
_LEFTOVER_RE = re.compile(
    r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>[0-9]+)(?:-[A-Za-z0-9_]+)?"
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict[str, Any] | None:
    """The files the manifest in ``folder`` lists (name -> {size, sha256}), or None."""
    path = folder / MANIFEST
    if not path.is_file() or path.is_symlink():
        return None
    try:
        files = json.loads(path.read_text()).get(MANIFEST_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def _is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _owned(folder: Path) -> tuple[list[Path], list[str]]:
    """The entries of ``folder`` a previous report wrote, and the others (described)."""
    listed = _manifest(folder)
    ours: list[Path] = []
    other: list[str] = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        rec = None if listed is None else listed.get(name)
        if listed is None:
            why = "" if _is_plain_file(entry) and name in REPORT_FILES else "not a report's"
        elif name == MANIFEST:
            why = ""
        elif not isinstance(rec, dict) or not _is_plain_file(entry):
            why = "not written by the report"
        elif entry.stat().st_size != rec.get("size") or _sha256(entry) != rec.get("sha256"):
            why = "changed since the report wrote it"
        else:
            why = ""
        if why:
            other.append(f"{name!r} ({why})")
        else:
            ours.append(entry)
    if listed is None and ours and not (folder / "report.json").is_file():
        other.append("no report.json")  # a folder of stray PNGs is not a report
    return ours, other


def check_out(folder: Path, force: bool, store: Path) -> None:
    """Refuse an output folder the report may not (re)place; then remove what killed
    report runs left beside it (:func:`clean_leftovers`).

    Raises
    ------
    UsageError
        ``folder`` is a file, is inside ``store`` or holds it, or is not empty and either
        ``force`` is not given or it holds anything a previous report did not write.
    """
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"report folder {folder} exists and is not a folder")
    where, st = folder.resolve(), store.resolve()
    if where == st or st in where.parents:
        raise UsageError(f"report folder {folder} is inside the store {store}; pick another --out")
    if where in st.parents:
        raise UsageError(
            f"report folder {folder} holds the store {store}; --force never replaces it, "
            "pick another --out"
        )
    clean_leftovers(folder)  # may put back the report a killed --force run had moved away
    _check_contents(folder, force)


def _check_contents(folder: Path, force: bool) -> None:
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not force:
        raise UsageError(
            f"report folder {folder} exists and is not empty; pass --force to replace it"
        )
    _, other = _owned(folder)
    if other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise UsageError(
            f"report folder {folder} holds {', '.join(other[:3])}{more}: --force replaces "
            "only a previous report, unchanged; move those away or pick another --out"
        )


def write_manifest(folder: Path) -> None:
    """List every file in ``folder`` (the finished partial report) in its manifest."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if _is_plain_file(p) and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({MANIFEST_KEY: files}, indent=1) + "\n")


def _remove_owned(folder: Path, *, listed_only: bool) -> None:
    """Delete the report files in ``folder``, then the folder if that emptied it."""
    if listed_only:
        ours, _ = _owned(folder)
    else:  # a partial report: the kinds of file a report writes, manifest included
        ours = [
            p for p in folder.iterdir() if _is_plain_file(p) and _PARTIAL_FILE_RE.fullmatch(p.name)
        ]
    for p in ours:
        p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something cmdtool did not write is in it: it stays


def replace_folder(folder: Path, tmp: Path, force: bool) -> None:
    """Move the finished report ``tmp`` to ``folder``, replacing a previous report there.

    ``folder`` is checked again first (a file may have appeared while the report was
    computed); the replaced report's own files are then deleted one by one.
    """
    write_manifest(tmp)
    if not folder.exists():
        os.replace(tmp, folder)
        return
    _check_contents(folder, force)
    old = folder.parent / f".{folder.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except OSError:
        os.replace(old, folder)
        raise
    _remove_owned(old, listed_only=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_leftovers(folder: Path) -> None:
    """Remove what killed report runs into ``folder`` left beside it: their
    ``.<name>.partial-<pid>`` and ``.<name>.old-<pid>`` folders, when that pid is gone."""
    try:
        siblings = list(folder.parent.iterdir())
    except OSError:
        return
    for node in sorted(siblings, key=lambda n: ".old-" not in n.name):  # .old first
        m = _LEFTOVER_RE.fullmatch(node.name)
        if m is None or m["name"] != folder.name or not node.is_dir() or node.is_symlink():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        old = m["kind"] == "old"
        try:
            if old and not folder.exists():
                os.replace(node, folder)  # killed between the two renames: put it back
                continue
            _remove_owned(node, listed_only=old)
        except OSError as exc:
            raise StoreError(f"cannot remove {node}: {exc.strerror or exc}") from exc
