"""A minimal progress display on stderr for long fits: on by default only when stderr is a
terminal, so logs and CI output stay clean."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    def __init__(self, total: Optional[int] = None, desc: str = "", enabled: Optional[bool] = None, unit: str = ""):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.n = 0
        self._start = time.perf_counter()
        self._last = 0.0
        self.note = ""

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        if note:
            self.note = note
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or (self.total is not None and self.n >= self.total)):
            self._last = now
            self._draw(now)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self.enabled:
            self._draw(time.perf_counter())

    def _draw(self, now: float) -> None:
        elapsed = now - self._start
        if self.total:
            frac = min(1.0, self.n / self.total)
            bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
            text = f"{self.desc} [{bar}] {self.n}/{self.total}{self.unit} {elapsed:.1f}s"
        else:
            text = f"{self.desc} {self.n}{self.unit} {elapsed:.1f}s"
        if self.note:
            text += f" {self.note}"
        sys.stderr.write("\r" + text[:120].ljust(120))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
