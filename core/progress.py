"""Progress for people and for logs.

On a terminal a live tqdm bar redraws in place. Written to a file or a CI log, every tqdm redraw becomes a
new line (one evaluation of 300 items wrote 1,199), so there :class:`LineProgress` writes one line every
10 % of the work or every 30 s, whichever comes first, and always a final line.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO, Union

EVERY_FRACTION = 0.1
EVERY_S = 30.0


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a closed or odd stream counts as not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class LineProgress:
    """A tqdm-like progress report for non-terminals: ``update``, ``set_postfix_str``, ``close``, ``write``,
    iteration and ``with`` work as on tqdm; each report is one whole line."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: str = "",
                 unit: str = "it", file: Optional[TextIO] = None, every_fraction: float = EVERY_FRACTION,
                 every_s: float = EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.file = file if file is not None else sys.stderr
        self.every_s, self.clock = every_s, clock
        # with no total only the clock paces the lines
        self.step = max(1, math.ceil(total * every_fraction)) if total else None
        self.n = 0
        self.postfix = ""
        self.start = self.last_t = clock()
        self.last_n = 0
        self.closed = False

    def update(self, n: float = 1) -> None:
        """Counts ``n`` more done; writes a line when a step of work or of time has passed since the last."""
        self.n += n
        if self.total is not None and self.n >= self.total:
            return  # the final line, at close, reports the end
        now = self.clock()
        if (self.step and self.n - self.last_n >= self.step) or now - self.last_t >= self.every_s:
            self._emit(now)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Text shown after the count in the next line (tqdm's signature; ``refresh`` has no meaning here)."""
        self.postfix = s

    def write(self, s: str) -> None:
        """A message of its own line, as ``tqdm.write``."""
        self.file.write(s.rstrip("\n") + "\n")
        self.file.flush()

    def close(self) -> None:
        """Writes the final line once."""
        if not self.closed:
            self.closed = True
            self._emit(self.clock(), final=True)

    def cancel(self) -> None:
        """Closes without the final line: the caller reports what went wrong instead."""
        self.closed = True

    def _emit(self, now: float, final: bool = False) -> None:
        count = f"{_num(self.n)}/{_num(self.total)}" if self.total else f"{_num(self.n)}"
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        line = f"{self.desc + ': ' if self.desc else ''}{count} {self.unit}{share}, {now - self.start:.1f} s"
        line += (f", {self.postfix}" if self.postfix else "") + (", done" if final else "")
        self.write(line)
        self.last_n, self.last_t = self.n, now

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finish(bar: Any, failed: bool = False) -> None:
    """Closes a bar from :func:`progress`; on failure a log gets no final progress line, so the error that
    follows is the last word (a terminal bar is closed as usual)."""
    if failed and isinstance(bar, LineProgress):
        bar.cancel()
    else:
        bar.close()


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.2f}"


def progress(iterable: Optional[Iterable] = None, *, total: Optional[float] = None, desc: str = "",
             unit: str = "it", disable: bool = False, leave: bool = True,
             file: Optional[TextIO] = None) -> Union["LineProgress", Any]:
    """A progress bar for ``iterable`` or ``total`` steps, written to ``file`` (default: stderr): a tqdm bar on
    a terminal, a :class:`LineProgress` elsewhere. ``leave=False`` clears a terminal bar at the end; a log
    always keeps its final line."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    if disable or is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, file=stream,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, file=stream)
