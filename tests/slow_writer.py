"""A stand-in for a training job that writes checkpoints slowly (run by tests/test_online_watch.py).

    python tests/slow_writer.py STAGING DEST NAME... [--pause S] [--split NAME]
        [--split-pause S] [--stop-at NAME]

Copies each ``STAGING/NAME`` to ``DEST/NAME`` in the order given, straight to the final
name (no temporary file, no rename), sleeping ``--pause`` seconds after each file.

``--split NAME`` writes that file in two halves: the first half, a flush, a pause of
``--split-pause`` seconds, the *next* file in full, another pause, then the rest. A
watcher must wait for it and must not ingest the next epoch first.
``--stop-at NAME`` writes the first half of that file and exits, as a job that died
mid-write. Only the standard library is used, so the process starts at once.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _write(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("staging", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--pause", type=float, default=0.3)
    parser.add_argument("--split", default=None)
    parser.add_argument("--split-pause", type=float, default=0.6)
    parser.add_argument("--stop-at", default=None)
    args = parser.parse_args()

    names: list[str] = args.names
    done: set[str] = set()
    for i, name in enumerate(names):
        if name in done:
            continue
        data = (args.staging / name).read_bytes()
        target = args.dest / name
        if name in (args.split, args.stop_at):
            half = len(data) // 2
            with target.open("wb") as fh:
                fh.write(data[:half])
                fh.flush()
                if name == args.stop_at:
                    return
                time.sleep(args.split_pause)
                if i + 1 < len(names):
                    nxt = names[i + 1]
                    _write(args.dest / nxt, (args.staging / nxt).read_bytes())
                    done.add(nxt)
                    time.sleep(args.split_pause)
                fh.write(data[half:])
        else:
            _write(target, data)
        done.add(name)
        time.sleep(args.pause)


if __name__ == "__main__":
    main()
