"""Numbered stage logs and progress lines, readable in a terminal and in `ray job logs`."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    """One line on stderr, flushed (job logs must show it as it happens)."""
    print(msg, file=sys.stderr, flush=True)


def stage(i: int, n: int, msg: str) -> None:
    log(f"[{i}/{n}] {msg}")


def _fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Counts done units; prints ``label done/total rate eta``.

    On a terminal the line is redrawn in place; otherwise a line is printed every
    ``every`` seconds and at the end, so logs stay short.
    """

    def __init__(self, total: int, label: str, unit: str = "chunks", every: float = 10.0,
                 stream=None):
        self.total, self.label, self.unit, self.every = total, label, unit, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.t0 = time.monotonic()
        self._last = 0.0

    def line(self) -> str:
        el = time.monotonic() - self.t0
        rate = self.done / el if el > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = _fmt_secs(left) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
                f"{rate:.2f} {self.unit}/s, elapsed {_fmt_secs(el)}, left {eta}")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        final = self.done >= self.total
        if self.tty:
            print("\r" + self.line(), end="\n" if final else "", file=self.stream, flush=True)
        elif final or now - self._last >= self.every:
            print(self.line(), file=self.stream, flush=True)
            self._last = now

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0
