"""The figures of a run, computed from its request records: pure functions, tested on scripted timings.

Throughput is measured over a window: from the send of the first request after warm-up to the end of
the last request before cool-down. Tokens count where they arrived inside that window, whichever
request carried them, so requests outside the counted set that overlap the window still count for
throughput (the server was doing that work) while only counted requests enter the latency percentiles.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from loadtest.stats import RequestRecord, summarize
from loadtest.workloads import WorkloadError

_UNITS = {"ms": 1e-3, "s": 1.0, "": 1e-3}  # bare numbers are milliseconds, as in vLLM bench's --goodput


@dataclass(frozen=True)
class SLO:
    """A per-request latency bound: ``metric`` (ttft, tpot or e2e) at most ``limit_s`` seconds."""

    metric: str
    limit_s: float

    @classmethod
    def parse(cls, text: str) -> "SLO":
        match = re.fullmatch(r"\s*(ttft|tpot|e2e)\s*[=:]\s*([0-9.]+)\s*(ms|s|)\s*", text)
        if not match:
            raise WorkloadError(f"SLO {text!r} is not METRIC=VALUE with METRIC ttft, tpot or e2e and VALUE in "
                                f"ms or s (e.g. ttft=500ms, tpot=50ms, e2e=10s; a bare number is ms)")
        return cls(match[1], float(match[2]) * _UNITS[match[3]])

    def met_by(self, record: RequestRecord) -> bool:
        value = getattr(record, self.metric)
        return value is not None and value <= self.limit_s

    def __str__(self) -> str:
        return f"{self.metric}<={self.limit_s * 1000:g}ms"


def excluded_count(value: float, issued: int) -> int:
    """Requests to leave out: ``value`` below 1 is a fraction of those issued, otherwise a count."""
    return int(value * issued) if value < 1 else int(value)


def counted_records(records: Sequence[RequestRecord], warmup: float, cooldown: float) -> list[RequestRecord]:
    """The records that enter the figures: issue order minus warm-up and cool-down, minus cancelled."""
    ordered = sorted(records, key=lambda r: r.index)
    w, c = excluded_count(warmup, len(ordered)), excluded_count(cooldown, len(ordered))
    if w + c >= len(ordered):
        w = c = 0  # too few requests to exclude any: all of them count
    return [r for r in ordered[w:len(ordered) - c] if not r.cancelled]


def _tokens_in_window(records: Sequence[RequestRecord], lo: float, hi: float) -> tuple[float, float, int]:
    """Output tokens, decode tokens (after each request's first) and prompt tokens arriving in [lo, hi]."""
    output = decode = 0.0
    prompt = 0
    for r in records:
        times = r.chunk_times
        if not r.ok or not times:
            continue
        first_in = lo <= r.start + times[0] <= hi
        prompt += r.prompt_tokens if first_in else 0
        output += 1.0 if first_in and r.output_tokens else 0.0
        if len(times) > 1 and r.output_tokens > 1:
            per_chunk = (r.output_tokens - 1) / (len(times) - 1)  # a chunk may carry several tokens
            inside = sum(1 for t in times[1:] if lo <= r.start + t <= hi)
            decode += per_chunk * inside
    return output + decode, decode, prompt


def _errors(records: Sequence[RequestRecord]) -> dict[str, Any]:
    failed = [r for r in records if not r.ok and not r.cancelled]
    return {"count": len(failed), "by_status": dict(Counter(str(r.status or "no response") for r in failed)),
            "samples": [f"{n} x {msg}" for msg, n in Counter(r.error for r in failed).most_common(3)]}


def goodput(counted: Sequence[RequestRecord], slos: Sequence[SLO], request_throughput: Optional[float]) -> dict[str, Any]:
    """Requests that succeeded within every SLO: their count, their fraction of the counted requests,
    and that fraction of the request throughput."""
    good = [r for r in counted if r.ok and all(s.met_by(r) for s in slos)]
    fraction = len(good) / len(counted) if counted else None
    return {"slos": [str(s) for s in slos], "requests": len(good), "fraction": fraction,
            "request_throughput": fraction * request_throughput if fraction is not None and request_throughput else None}


def run_figures(records: Sequence[RequestRecord], warmup: float = 0.0, cooldown: float = 0.0,
                slos: Sequence[SLO] = ()) -> dict[str, Any]:
    """Throughput over the measurement window, latency percentiles of the counted requests, goodput."""
    counted = counted_records(records, warmup, cooldown)
    ok = [r for r in counted if r.ok]
    lo = min((r.start for r in counted), default=None)
    hi = max((r.end for r in ok), default=None)
    duration = hi - lo if lo is not None and hi is not None and hi > lo else None
    output, decode, prompt = _tokens_in_window(records, lo, hi) if duration else (0.0, 0.0, 0)
    finished = sum(1 for r in records if r.ok and lo <= r.end <= hi) if duration else 0
    rate = (lambda x: x / duration) if duration else (lambda x: None)
    sources = Counter(r.token_source for r in ok)
    return {
        "requests": {"issued": len(records), "counted": len(counted), "ok": len(ok),
                     "cancelled": sum(1 for r in records if r.cancelled)},
        "errors": _errors(records),
        "window_s": duration, "request_throughput": rate(finished),
        "input_tok_s": rate(prompt), "output_tok_s": rate(output), "decode_tok_s": rate(decode),
        "decode_tok_s_per_stream": summarize([d for r in ok if (d := r.decode_rate)]),
        "prompt_tokens": summarize([r.prompt_tokens for r in ok]),
        "output_tokens": summarize([r.output_tokens for r in ok]),
        "ttft_s": summarize([r.ttft for r in ok]), "tpot_s": summarize([t for r in ok if (t := r.tpot)]),
        "itl_s": summarize([g for r in ok for g in r.itl]), "e2e_s": summarize([r.e2e for r in ok]),
        "goodput": goodput(counted, slos, rate(finished)) if slos else None,
        "token_source": dict(sources),
    }


def prefill_figures(single: Sequence[RequestRecord], aggregate: Sequence[RequestRecord],
                    concurrency: int) -> dict[str, Any]:
    """Prefill throughput from ``max_tokens=1`` requests: prompt tokens per second of TTFT one at a time,
    and prompt tokens per second of wall time at ``concurrency`` streams."""
    one = [r for r in single if r.ok and r.ttft]
    many = [r for r in aggregate if r.ok]
    wall = (max(r.end for r in many) - min(r.start for r in many)) if many else None
    return {
        "requests": len(single) + len(aggregate), "errors": _errors([*single, *aggregate]),
        "single_stream_tok_s": sum(r.prompt_tokens for r in one) / sum(r.ttft for r in one) if one else None,
        "single_stream_ttft_s": summarize([r.ttft for r in one]),
        "aggregate_tok_s": sum(r.prompt_tokens for r in many) / wall if wall else None,
        "aggregate_concurrency": concurrency,
        "prompt_tokens": summarize([r.prompt_tokens for r in one + many]),
    }
