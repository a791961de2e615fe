"""Whether a checkpoint file is completely written, from its own bytes (``cmdtool watch``).

Writers (``torch.save``, ``safetensors.save_file``, most training loops) write straight
to the final name, so a file may be seen half written. :func:`check_file` reads only the
safetensors header, or the zip directory and the records' local headers of a torch zip
file, never the tensor data:

- ``.safetensors``: the 8-byte header length, a header that parses as JSON, and a file
  size of exactly ``8 + header + max(data_offsets end)``;
- zip-format torch files (``PK`` at the start): the end-of-central-directory record is
  there, :mod:`zipfile` lists the archive, and every record's data lies inside the file;
- legacy pickle torch files carry no length: ``complete`` is None, the caller decides.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cmdtool.checkpoints.safetensors import MAX_HEADER
from cmdtool.checkpoints.torchfile import ZIP_LOCAL_HEADER, ZIP_LOCAL_SIGNATURE

#: ``(size, mtime_ns, inode)`` of a file: a change means it was written to or replaced.
Signature = tuple[int, int, int]
# ----------------------------------------------------------------- completeness


@dataclass(frozen=True)
class FileCheck:
    """What a file's own bytes say about whether it is completely written.

    Attributes
    ----------
    path : pathlib.Path
    size, mtime_ns, inode : int
        From :func:`os.fstat` of the handle the check read.
    complete : bool or None
        True or False from the format; None for a legacy pickle torch file, whose
        completeness only the settle rule (unchanged across polls) can tell.
    expected : int or None
        The size the file will have, where its header says (safetensors).
    problem : str
        Why it is incomplete, e.g. ``"1200 bytes, the header says 4096"``; empty otherwise.
    """

    path: Path
    size: int
    mtime_ns: int
    inode: int
    complete: bool | None
    expected: int | None = None
    problem: str = ""

    @property
    def signature(self) -> Signature:
        """``(size, mtime_ns, inode)``: a change means the file was written to or replaced."""
        return (self.size, self.mtime_ns, self.inode)


def signature_of(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _data_end(header: object) -> int | None:
    """End of the last tensor's bytes per a safetensors header; None if malformed."""
    if not isinstance(header, dict):
        return None
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            offsets = entry["data_offsets"]
            stop = offsets[1]
        except (TypeError, KeyError, IndexError):
            return None
        if not isinstance(stop, int) or isinstance(stop, bool) or stop < 0:
            return None
        end = max(end, stop)
    return end


def _check_safetensors(fh: IO[bytes], size: int) -> tuple[bool, int | None, str]:
    if size < 8:
        return False, None, f"{size} bytes, too short for the 8-byte header length"
    length = int.from_bytes(fh.read(8), "little")
    if length > MAX_HEADER:
        return False, None, f"{size} bytes, its header length {length} exceeds safetensors' limit"
    if size < 8 + length:
        return False, None, f"{size} bytes, its header alone needs {8 + length}"
    raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        return False, None, f"{size} bytes, its header does not parse as JSON"
    end = _data_end(header)
    if end is None:  # whole but malformed: ingest's validation says what is wrong
        return True, None, ""
    expected = 8 + length + end
    if size != expected:
        return False, expected, f"{size} bytes, the header says {expected}"
    return True, expected, ""


def _check_torch(fh: IO[bytes], size: int) -> tuple[bool | None, int | None, str]:
    if size < 4:
        return False, None, f"{size} bytes, too short for a torch file"
    if fh.read(2) != b"PK":
        return None, None, ""  # legacy pickle: no length to check, the settle rule decides
    try:
        fh.seek(0)
        with zipfile.ZipFile(fh) as archive:
            infos = archive.infolist()
    except Exception:  # zipfile raises many kinds on a partial archive
        return False, None, f"{size} bytes, no complete zip directory at its end yet"
    if not infos:
        return False, None, f"{size} bytes, its zip directory lists no record"
    for info in infos:
        fh.seek(info.header_offset)
        local = fh.read(ZIP_LOCAL_HEADER.size)
        if len(local) < ZIP_LOCAL_HEADER.size:
            return False, None, f"{size} bytes, record {info.filename!r} starts past the end"
        fields = ZIP_LOCAL_HEADER.unpack(local)
        if fields[0] != ZIP_LOCAL_SIGNATURE:
            return False, None, f"{size} bytes, record {info.filename!r} has no local header yet"
        end = info.header_offset + ZIP_LOCAL_HEADER.size + fields[9] + fields[10]
        end += info.compress_size
        if end > size:
            return False, None, f"{size} bytes, record {info.filename!r} ends at byte {end}"
    return True, None, ""


def check_file(path: str | os.PathLike[str]) -> FileCheck:
    """Whether a checkpoint file is completely written, from its own bytes.

    Reads only the safetensors header, or the zip directory and the records' local
    headers of a torch zip file; never the tensor data.

    Parameters
    ----------
    path : path
        A ``.safetensors`` file or a torch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``).

    Returns
    -------
    FileCheck

    Raises
    ------
    OSError
        The file cannot be opened (e.g. it was removed meanwhile).
    """
    p = Path(path)
    with p.open("rb") as fh:
        st = os.fstat(fh.fileno())
        complete: bool | None
        if p.suffix.lower() == ".safetensors":
            complete, expected, problem = _check_safetensors(fh, st.st_size)
        else:
            complete, expected, problem = _check_torch(fh, st.st_size)
    return FileCheck(p, st.st_size, st.st_mtime_ns, st.st_ino, complete, expected, problem)


