"""Backpressure: a bound on the requests in flight at a backend and a bounded queue in front of it.

Beyond the queue, or after waiting ``queue_timeout_s`` in it, a request is refused with 429 and a
``Retry-After``, instead of piling up in the engine (where it would only add to everyone's latency).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional

from serving.errors import APIError


@dataclass(frozen=True)
class AdmissionLimits:
    """``max_in_flight`` requests at once per backend (None: unbounded), ``max_queue`` waiting for a slot."""

    max_in_flight: Optional[int] = None
    max_queue: int = 0
    queue_timeout_s: float = 30.0
    retry_after_s: int = 1


class Admission:
    """The slots of one backend. ``acquire`` waits in the queue or raises 429; ``release`` frees a slot."""

    def __init__(self, name: str, limits: AdmissionLimits) -> None:
        self.name, self.limits = name, limits
        self.in_flight = 0
        self.queued = 0
        self._freed = asyncio.Condition()

    def _full(self) -> bool:
        return self.limits.max_in_flight is not None and self.in_flight >= self.limits.max_in_flight

    def _refuse(self, why: str) -> APIError:
        return APIError(429, f"model {self.name!r} is at capacity ({why}); retry after "
                             f"{self.limits.retry_after_s} s", code="overloaded",
                        headers={"Retry-After": str(self.limits.retry_after_s)})

    async def acquire(self) -> None:
        if not self._full() and not self.queued:  # a free slot goes to the queue first
            self.in_flight += 1
            return
        if self.queued >= self.limits.max_queue:
            raise self._refuse(f"{self.in_flight} requests in flight and {self.queued} queued")
        self.queued += 1
        try:
            async with self._freed:
                await asyncio.wait_for(self._freed.wait_for(lambda: not self._full()), self.limits.queue_timeout_s)
                self.in_flight += 1
        except asyncio.TimeoutError:
            raise self._refuse(f"waited {self.limits.queue_timeout_s:g} s in the queue") from None
        finally:
            self.queued -= 1

    async def release(self) -> None:
        self.in_flight -= 1
        if self.queued:
            async with self._freed:
                self._freed.notify_all()  # every waiter re-checks; one takes the slot (none is lost on a timeout)
