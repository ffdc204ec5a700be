"""A one-line progress bar for long work (conversion, loading, benchmarks), on stderr.

Redraws at most a few times a second; on a non-terminal it prints nothing until the
final summary line, so logs stay clean.
"""

from __future__ import annotations

import sys
import time

from tide_local.units import human_bytes, human_seconds


class Progress:
    """Progress over `total` bytes and `items` units of work (tensors, layers...)."""

    def __init__(self, label: str, total: int, items: int = 0, item_name: str = "tensors", stream=None, enabled=None):
        self.label, self.total, self.items, self.item_name = label, max(1, total), items, item_name
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0
        self.items_done = 0
        self.start = time.monotonic()
        self._last_draw = 0.0

    def advance(self, nbytes: int = 0, items: int = 0) -> None:
        self.done += nbytes
        self.items_done += items
        now = time.monotonic()
        if self.enabled and now - self._last_draw > 0.2:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.done / self.total)
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0
        eta = (self.total - self.done) / rate if rate > 0 else 0
        items = f" {self.items_done}/{self.items} {self.item_name}" if self.items else ""
        line = (
            f"\r{self.label} [{bar}] {frac * 100:5.1f}%{items} "
            f"{human_bytes(self.done)}/{human_bytes(self.total)} {human_bytes(rate)}/s ETA {human_seconds(eta)}"
        )
        self.stream.write(line + "\033[K")
        self.stream.flush()

    def close(self, summary: str | None = None) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
        if summary:
            self.stream.write(f"{summary} in {human_seconds(time.monotonic() - self.start)}\n")
        self.stream.flush()
