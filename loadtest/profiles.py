"""Load profiles: when each request is issued and how many may be in flight.

A profile is a small frozen dataclass; ``parse_profiles`` maps the command line's ``KIND:VALUES``
to a list of them (several values make a sweep). Closed-loop profiles (synchronous, concurrency)
issue a request whenever a slot frees; open-loop ones (constant, poisson) issue on a schedule
whatever the server does, optionally capped by ``max_concurrency``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from loadtest.workloads import WorkloadError

AUTO_CONCURRENCY_CAP = 256


@dataclass(frozen=True)
class Synchronous:
    """One request at a time."""

    kind = "synchronous"

    @property
    def label(self) -> str:
        return "synchronous"

    @property
    def limit(self) -> Optional[int]:
        return 1

    def gaps(self, rng: random.Random) -> Iterator[float]:
        while True:
            yield 0.0

    def saturated(self, figures: dict, best_output_tok_s: float, min_gain: float) -> bool:
        return False


@dataclass(frozen=True)
class Concurrency:
    """A fixed number of requests in flight; a new one starts as soon as one ends."""

    streams: int
    kind = "concurrency"

    @property
    def label(self) -> str:
        return f"concurrency {self.streams}"

    @property
    def limit(self) -> Optional[int]:
        return self.streams

    def gaps(self, rng: random.Random) -> Iterator[float]:
        while True:
            yield 0.0

    def saturated(self, figures: dict, best_output_tok_s: float, min_gain: float) -> bool:
        """More streams no longer raise output throughput by ``min_gain`` over the best so far."""
        return best_output_tok_s > 0 and (figures["output_tok_s"] or 0.0) < best_output_tok_s * (1 + min_gain)


def _rate_saturated(rate: float, figures: dict) -> bool:
    """The server completes fewer than 90 % of the requests offered per second: it cannot keep up."""
    return (figures["request_throughput"] or 0.0) < 0.9 * rate


@dataclass(frozen=True)
class ConstantRate:
    """Requests issued every ``1/rate`` seconds."""

    rate: float
    max_concurrency: Optional[int] = None
    kind = "constant"

    @property
    def label(self) -> str:
        return f"constant {self.rate:g} req/s"

    @property
    def limit(self) -> Optional[int]:
        return self.max_concurrency

    def gaps(self, rng: random.Random) -> Iterator[float]:
        while True:
            yield 1.0 / self.rate

    def saturated(self, figures: dict, best_output_tok_s: float, min_gain: float) -> bool:
        return _rate_saturated(self.rate, figures)


@dataclass(frozen=True)
class Poisson:
    """Gamma-distributed gaps of mean ``1/rate``: ``burstiness`` 1 is a Poisson process, below 1 burstier,
    above 1 more regular (vLLM bench's convention)."""

    rate: float
    burstiness: float = 1.0
    max_concurrency: Optional[int] = None
    kind = "poisson"

    @property
    def label(self) -> str:
        extra = f", burstiness {self.burstiness:g}" if self.burstiness != 1.0 else ""
        return f"poisson {self.rate:g} req/s{extra}"

    @property
    def limit(self) -> Optional[int]:
        return self.max_concurrency

    def gaps(self, rng: random.Random) -> Iterator[float]:
        while True:
            yield rng.gammavariate(self.burstiness, 1.0 / (self.rate * self.burstiness))

    def saturated(self, figures: dict, best_output_tok_s: float, min_gain: float) -> bool:
        return _rate_saturated(self.rate, figures)


Profile = Union[Synchronous, Concurrency, ConstantRate, Poisson]


def _positive(text: str, what: str, kind: type = float) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise WorkloadError(f"{what} {text!r} must be a positive {'integer' if kind is int else 'number'}")
    return value


_BUILDERS: dict[str, Callable[[str, float, Optional[int]], Profile]] = {
    "synchronous": lambda v, b, m: Synchronous(),
    "concurrency": lambda v, b, m: Concurrency(int(_positive(v, "concurrency", int))),
    "constant": lambda v, b, m: ConstantRate(_positive(v, "rate"), m),
    "poisson": lambda v, b, m: Poisson(_positive(v, "rate"), b, m),
}


def auto_concurrency(cap: int = AUTO_CONCURRENCY_CAP) -> list[int]:
    """1, 2, 4, ... up to ``cap``: the doubling sweep that ``concurrency:auto`` runs until saturation."""
    values, c = [], 1
    while c <= cap:
        values.append(c)
        c *= 2
    return values


def parse_profiles(text: str, burstiness: float = 1.0, max_concurrency: Optional[int] = None) -> list[Profile]:
    """``synchronous``, ``concurrency:8``, ``constant:4``, ``poisson:4``; comma lists sweep
    (``concurrency:1,2,4,8``, ``poisson:1,2,4``); ``concurrency:auto`` doubles until saturation."""
    kind, _, values = text.partition(":")
    if kind == "sync":
        kind = "synchronous"
    if kind not in _BUILDERS:
        raise WorkloadError(f"unknown load profile {text!r}; use synchronous, concurrency:N, constant:RATE or "
                            f"poisson:RATE (comma-separated values sweep, concurrency:auto doubles)")
    if burstiness <= 0:
        raise WorkloadError(f"--burstiness {burstiness} must be positive (1 is Poisson)")
    if kind == "synchronous":
        return [Synchronous()]
    if not values:
        raise WorkloadError(f"profile {text!r} needs a value, e.g. {kind}:{'8' if kind == 'concurrency' else '4'}")
    if values == "auto":
        if kind != "concurrency":
            raise WorkloadError("only concurrency:auto is supported; give rates as a list, e.g. poisson:1,2,4,8")
        return [Concurrency(c) for c in auto_concurrency(max_concurrency or AUTO_CONCURRENCY_CAP)]
    return [_BUILDERS[kind](v.strip(), burstiness, max_concurrency) for v in values.split(",")]
