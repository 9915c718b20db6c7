"""Issues a workload's requests under a load profile, bounded by count and duration, stoppable at once."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from loadtest.profiles import Profile
from loadtest.requester import Requester
from loadtest.stats import RequestRecord
from loadtest.workloads import RequestSpec


@dataclass(frozen=True)
class Bounds:
    """When a run stops issuing: after ``count`` requests and/or ``duration_s`` seconds; in-flight requests
    then get ``drain_s`` seconds to finish before they are cancelled (and reported as cancelled)."""

    count: Optional[int] = None
    duration_s: Optional[float] = None
    drain_s: float = 30.0


async def _race(stop: asyncio.Event, awaitable: Any, timeout: Optional[float] = None) -> bool:
    """Awaits ``awaitable`` unless ``stop`` is set first (or ``timeout`` passes); True if it finished."""
    work = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({work, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in (work, stopper):
        if task not in done:
            task.cancel()
    if work in done and not work.cancelled():
        work.result()
        return True
    return False


async def issue(requester: Requester, specs: Iterator[RequestSpec], profile: Profile, bounds: Bounds,
                stop: asyncio.Event, seed: int = 0, max_tokens: Optional[int] = None,
                on_done: Callable[[RequestRecord], None] = lambda r: None) -> list[RequestRecord]:
    """Sends requests as ``profile`` schedules them until ``bounds`` or ``stop``; returns every record,
    in issue order, cancelled ones marked."""
    limit = asyncio.Semaphore(profile.limit) if profile.limit else None
    gaps, records, tasks = profile.gaps(random.Random(seed)), [], set()
    t0 = time.perf_counter()
    deadline = t0 + bounds.duration_s if bounds.duration_s else None
    next_at = t0

    def finished(task: asyncio.Task, record: RequestRecord) -> None:
        tasks.discard(task)
        if limit:
            limit.release()
        if not task.cancelled():
            on_done(record)

    for index in itertools.count() if bounds.count is None else range(bounds.count):
        if stop.is_set() or (deadline and time.perf_counter() >= deadline):
            break
        if limit and limit.locked():
            remaining = deadline - time.perf_counter() if deadline else None
            if not await _race(stop, limit.acquire(), remaining):
                break
        elif limit:
            await limit.acquire()
        next_at += next(gaps)
        delay = next_at - time.perf_counter()
        if delay > 0 and not await _race(stop, asyncio.sleep(delay)):
            if limit:
                limit.release()
            break
        record = RequestRecord(ok=False, index=index, start=time.perf_counter() - t0)
        records.append(record)
        task = asyncio.ensure_future(requester.send(next(specs), record, max_tokens))
        task.add_done_callback(lambda t, r=record: finished(t, r))
        tasks.add(task)
    await _drain(tasks, stop, bounds.drain_s if deadline else None)
    for record in records:
        if record.e2e is None and record.error is None:
            record.cancelled, record.error = True, "cancelled"
    return records


async def _drain(tasks: set[asyncio.Task], stop: asyncio.Event, drain_s: Optional[float]) -> None:
    """Waits for in-flight requests (at most ``drain_s`` when a duration bound ended the run), cancels
    the rest when stopped."""
    if tasks and not stop.is_set():
        await _race(stop, asyncio.wait(set(tasks)), drain_s)
    pending = set(tasks)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
