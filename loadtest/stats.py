"""Percentiles and the per-request record that the load tester and its reports share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request measured.

    ``start`` is seconds from the run's start; ``ttft``/``e2e`` are seconds from the request's own
    send; ``chunk_times`` are the arrival times (from the send) of every streamed chunk that carried
    output, so ``itl`` and in-window token counts can be derived from them.
    """

    ok: bool
    index: int = 0
    start: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: Optional[float] = None
    e2e: Optional[float] = None
    chunk_times: list[float] = field(default_factory=list)
    error: Optional[str] = None
    status: Optional[int] = None
    cancelled: bool = False
    token_source: str = "usage"

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive output chunks (vLLM bench's ITL)."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> Optional[float]:
        """Time per output token after the first (None unless the tokens arrived in two chunks or more)."""
        if self.e2e is None or self.ttft is None or self.output_tokens < 2 or len(self.chunk_times) < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def decode_rate(self) -> Optional[float]:
        """Tokens after the first per second of this request's decode time."""
        tpot = self.tpot
        return 1.0 / tpot if tpot else None

    @property
    def end(self) -> Optional[float]:
        """When the request finished, in seconds from the run's start."""
        return self.start + self.e2e if self.e2e is not None else None


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, Optional[float]]:
    """Mean, p50/p90/p99 and max of ``values`` (None each where there are none)."""
    summary: dict[str, Optional[float]] = {"mean": sum(values) / len(values) if values else None}
    summary.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    summary["max"] = max(values) if values else None
    return summary
