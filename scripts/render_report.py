"""Render a report.html to a PNG with headless Chromium (to look at it, or for CI).

Usage: ``python scripts/render_report.py out/report/report.html [--out page.png]
[--chromium /usr/bin/chromium] [--height 20000]``. Needs Debian's ``chromium`` package
(``apt-get install chromium``); no network is used: the report is self-contained.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CHROMIUM = "/usr/bin/chromium"


def find_chromium(path: str | None) -> str | None:
    """The Chromium binary to use, or None when none is installed."""
    if path:
        return path if Path(path).is_file() else None
    if Path(DEFAULT_CHROMIUM).is_file():
        return DEFAULT_CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(html: Path, png: Path, chromium: str, width: int = 1280, height: int = 20000) -> None:
    """Screenshot ``html`` into ``png`` with headless ``chromium``.

    Parameters
    ----------
    html, png : Path
    chromium : str
        The binary.
    width, height : int
        Window size in pixels.
    """
    with tempfile.TemporaryDirectory(prefix="cmdtool-chromium-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={png.resolve()}",
            f"--window-size={width},{height}",
            html.resolve().as_uri(),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    trim_bottom(png)


def trim_bottom(png: Path, margin: int = 40) -> None:
    """Cut the blank rows below the page's content (the window is taller than any report,
    so the whole page is on the screenshot)."""
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(png)
    ink = np.flatnonzero((img[..., :3] < 0.98).any(axis=(1, 2)))
    if ink.size:
        mpimg.imsave(png, img[: min(img.shape[0], int(ink[-1]) + margin)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path, help="report.html")
    ap.add_argument("--out", type=Path, help="PNG to write [default: next to the html]")
    ap.add_argument("--chromium", help=f"Chromium binary [default: {DEFAULT_CHROMIUM}]")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=20000)
    args = ap.parse_args(argv)
    if not args.html.is_file():
        print(f"error: {args.html} not found", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(
            f"error: Chromium not found ({args.chromium or DEFAULT_CHROMIUM}); install it with "
            "'apt-get install chromium' (Debian/Ubuntu) or pass --chromium PATH",
            file=sys.stderr,
        )
        return 3
    png = args.out or args.html.with_suffix(".png")
    try:
        render(args.html, png, chromium, args.width, args.height)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        print(
            f"error: chromium failed: {exc} {stderr.decode(errors='replace')[-500:]}",
            file=sys.stderr,
        )
        return 1
    if not png.is_file():
        print(f"error: chromium wrote no {png}", file=sys.stderr)
        return 1
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
