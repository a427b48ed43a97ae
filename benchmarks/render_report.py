"""Opens a written report (:func:`edpairs.report.write_report`) in headless Chromium, as a person
would offline: reads back how many images the page loaded (the page's own load check sets
``data-broken-images`` / ``data-images-total`` on <body>), takes a screenshot and checks it is
not blank, and runs :func:`edpairs.report.check_report`. Prints one line; exits 1 on any
problem.

    PYTHONPATH=python python benchmarks/render_report.py REPORT_DIR [--screenshot out.png] [--chromium PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    from edpairs.report import check_report
except ImportError:  # a checkout that is not installed: its sources (imported as a module, sys.path is left alone)
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    from edpairs.report import check_report

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 120
WINDOW = "1400,2400"
MIN_COLOURS = 8  # a blank or failed page shows a handful of colours at most


def find_chromium(explicit: Optional[str] = None) -> Optional[str]:
    """The Chromium binary: ``explicit`` if given (a path or a name on PATH), else the first of
    CANDIDATES on PATH; None when there is none."""
    if explicit:
        return shutil.which(explicit) or (explicit if os.path.isfile(explicit) else None)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _Body(HTMLParser):
    def __init__(self):
        super().__init__()
        self.attrs: Optional[dict] = None

    def handle_starttag(self, tag, attrs):
        if tag == "body" and self.attrs is None:
            self.attrs = dict(attrs)


def _chromium(binary: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--allow-file-access-from-files", f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"chromium did not finish within {TIMEOUT_S} s: {' '.join(cmd)}") from exc


def _colours(png: str) -> int:
    """Distinct colours of a PNG (read with Pillow, which the report's matplotlib needs anyway)."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        a = np.asarray(im.convert("RGB"))
    flat = a.reshape(-1, 3).astype(np.int64)
    return int(len(np.unique(flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2])))


def render(report_dir, screenshot=None, chromium: Optional[str] = None) -> dict:
    """Loads ``report_dir/index.html`` in headless Chromium. Returns ``broken_images``,
    ``images_total`` (from the page's load check), ``screenshot`` (path), ``screenshot_colours``,
    ``check_report`` (its problems), ``problems`` (everything wrong; empty: fine) and
    ``seconds``."""
    t0 = time.perf_counter()
    root = Path(report_dir).resolve()
    index = root / "index.html"
    binary = find_chromium(chromium)
    if binary is None:
        wanted = chromium or " / ".join(CANDIDATES)
        raise FileNotFoundError(f"no Chromium found ({wanted}); install one (Debian: apt-get install chromium) "
                                f"or pass --chromium PATH")
    if not index.is_file():
        raise FileNotFoundError(f"{index} does not exist: is {root} a report folder?")
    problems = []
    with tempfile.TemporaryDirectory(prefix="render_report-") as scratch:
        done = _chromium(binary, os.path.join(scratch, "profile1"), "--dump-dom", index.as_uri())
        body = _Body()
        body.feed(done.stdout)
        attrs = body.attrs or {}
        broken, total = attrs.get("data-broken-images"), attrs.get("data-images-total")
        if done.returncode != 0 or body.attrs is None:
            problems.append(f"chromium --dump-dom failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
        elif broken is None or total is None:
            problems.append("the page's load check did not run (no data-broken-images on <body>)")
        broken = None if broken is None else int(broken)
        total = None if total is None else int(total)
        if broken:
            problems.append(f"{broken} of {total} images failed to load")
        if total == 0:
            problems.append("the page has no images")

        shot = Path(screenshot).resolve() if screenshot else Path(scratch) / "screenshot.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        if shot.exists():
            shot.unlink()
        done = _chromium(binary, os.path.join(scratch, "profile2"), f"--screenshot={shot}",
                         f"--window-size={WINDOW}", "--hide-scrollbars", index.as_uri())
        colours = None
        if not shot.is_file() or shot.stat().st_size == 0:
            problems.append(f"no screenshot written (exit {done.returncode}): {done.stderr.strip()[-400:]}")
        else:
            colours = _colours(str(shot))
            if colours <= MIN_COLOURS:
                problems.append(f"the screenshot looks blank ({colours} distinct colours)")
    checked = check_report(root)
    problems += [f"check_report: {p}" for p in checked]
    return dict(report=str(root), chromium=binary, broken_images=broken, images_total=total,
                screenshot=str(shot) if screenshot else None, screenshot_colours=colours, check_report=checked,
                problems=problems, seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_dir")
    ap.add_argument("--screenshot", help="where to keep the screenshot (PNG); default: a temporary file")
    ap.add_argument("--chromium", help="the Chromium / Chrome binary (default: found on PATH)")
    ap.add_argument("--json", help="also write the result as JSON here")
    args = ap.parse_args(argv)
    try:
        result = render(args.report_dir, args.screenshot, args.chromium)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"render_report: {exc}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    status = "OK" if not result["problems"] else "FAIL"
    print(f"{status}: {result['report']}: {result['images_total']} images, {result['broken_images']} broken, "
          f"screenshot {result['screenshot_colours']} colours, check_report {len(result['check_report'])} problems, "
          f"{result['seconds']:.1f} s" + "".join(f"\n  - {p}" for p in result["problems"]))
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
