"""``run_loadtest``: a prefill phase, then one run per load profile (a sweep stops at saturation)."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import aiohttp

from core.client import EndpointError, auth_error, auth_headers, base_url, resolve_api_key
from core.progress import finish, progress as progress_bar
from loadtest.figures import SLO, counted_records, prefill_figures, run_figures
from loadtest.issuer import Bounds, issue
from loadtest.profiles import Concurrency, Profile
from loadtest.requester import Requester
from loadtest.server_metrics import scrape, server_figures
from loadtest.stats import RequestRecord
from loadtest.workloads import WORKLOADS, LengthDist, RequestSpec, WorkloadError

SCHEMA = "qserve.loadtest/2"
DEFAULT_TEXT_NAME = "wikitext2-valid.tokens"
PREFILL_MAX_STREAMS = 32  # enough to fill a CPU engine's batch; a GPU sweep's prefill phase stays short


@dataclass(frozen=True)
class LoadSettings:
    """Everything a load test is run with; it is written into the report as given."""

    profiles: tuple[Profile, ...] = (Concurrency(8),)
    workload: str = "synthetic"
    source: Optional[Path] = None  # text (synthetic), prompts (file) or conversations (sharegpt)
    input_len: LengthDist = LengthDist("fixed", 512)
    output_len: Optional[LengthDist] = None  # synthetic and file: 64; sharegpt: the reply's length
    shared_prefix: float = 0.0
    num_requests: Optional[int] = 32
    duration_s: Optional[float] = None
    drain_s: float = 30.0
    warmup: float = 0.1
    cooldown: float = 0.1
    prefill_requests: int = 8
    warmup_requests: int = 1
    endpoint: str = "completions"
    stream: bool = True
    ignore_eos: bool = True
    slos: tuple[SLO, ...] = ()
    request_timeout_s: float = 600.0
    seed: int = 0
    tokenizer: Optional[str] = None
    cache_salt: Optional[str] = "auto"  # "auto": a fresh salt per load test; None: not sent
    stop_at_saturation: bool = True
    saturation_gain: float = 0.05
    extra_body: dict[str, Any] = field(default_factory=dict)

    def described(self) -> dict[str, Any]:
        return {"profiles": [p.label for p in self.profiles], "workload": self.workload,
                "source": str(self.source or DEFAULT_TEXT_NAME), "input_len": str(self.input_len),
                "output_len": str(self.output_len) if self.output_len else None,
                "shared_prefix": self.shared_prefix, "num_requests": self.num_requests,
                "duration_s": self.duration_s, "warmup": self.warmup, "cooldown": self.cooldown,
                "prefill_requests": self.prefill_requests, "warmup_requests": self.warmup_requests,
                "endpoint": self.endpoint, "stream": self.stream,
                "ignore_eos": self.ignore_eos, "slos": [str(s) for s in self.slos], "seed": self.seed,
                "tokenizer": self.tokenizer, "cache_salt": self.cache_salt}


def _workload(settings: LoadSettings, tokenizer: Any) -> Iterator[RequestSpec]:
    from core.data import data_file

    if settings.workload not in WORKLOADS:
        raise WorkloadError(f"unknown workload {settings.workload!r}; use one of {', '.join(WORKLOADS)}")
    if settings.workload != "synthetic" and settings.source is None:
        raise WorkloadError(f"the {settings.workload} workload needs a file: pass --prompt-file PATH")
    default_out = None if settings.workload == "sharegpt" else LengthDist("fixed", 64)
    return WORKLOADS[settings.workload](
        path=settings.source or data_file(DEFAULT_TEXT_NAME), input_len=settings.input_len,
        output_len=settings.output_len or default_out, shared_prefix=settings.shared_prefix,
        tokenizer=tokenizer, seed=settings.seed)


def request_rows(records: list[RequestRecord], counted: set[int]) -> list[dict[str, Any]]:
    """One row per request (no per-chunk times): what the CSV and the plots are made from."""
    return [{"index": r.index, "start_s": r.start, "ok": r.ok, "counted": r.index in counted,
             "status": r.status, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
             "ttft_s": r.ttft, "tpot_s": r.tpot, "e2e_s": r.e2e, "max_itl_s": max(r.itl, default=None),
             "cancelled": r.cancelled, "error": r.error} for r in records]


class _Progress:
    """A live bar per run: completed requests, errors and output tokens so far."""

    def __init__(self, enabled: bool, desc: str, total: Optional[int]) -> None:
        self.bar = progress_bar(total=total, desc=desc, unit="req", disable=not enabled, leave=False)
        self.errors = self.tokens = 0

    def __call__(self, record: RequestRecord) -> None:
        self.errors += not record.ok
        self.tokens += record.output_tokens
        self.bar.set_postfix_str(f"errors {self.errors}, {self.tokens} output tokens", refresh=False)
        self.bar.update(1)

    def close(self, failed: bool = False) -> None:
        finish(self.bar, failed)


class LoadTest:
    """One load test against one endpoint: holds the session, the workload and the stop signal."""

    def __init__(self, url: str, model: str, settings: LoadSettings, specs: Iterator[RequestSpec], tokenizer: Any,
                 progress: bool, log: Callable[[str], None], api_key: str = "") -> None:
        self.url, self.model, self.settings, self.log, self.progress = url, model, settings, log, progress
        self.specs, self.tokenizer, self.api_key = specs, tokenizer, api_key
        self.stop = asyncio.Event()
        self.refused: Optional[EndpointError] = None

    def _check_auth(self, record: RequestRecord) -> None:
        """A refused key stops the test at once: every further request would be refused too."""
        error = auth_error(self.url, record.status or 0, record.error or "", self.api_key)
        if error and not self.refused:
            self.refused = error
            self.stop.set()

    async def _issue(self, requester: Requester, profile: Profile, bounds: Bounds, desc: str,
                     max_tokens: Optional[int] = None) -> list[RequestRecord]:
        bar = _Progress(self.progress, desc, bounds.count)

        def done(record: RequestRecord) -> None:
            self._check_auth(record)
            bar(record)

        try:
            records = await issue(requester, self.specs, profile, bounds, self.stop, self.settings.seed,
                                  max_tokens, on_done=done)
        except BaseException:
            bar.close(failed=True)
            raise
        bar.close(failed=self.refused is not None)
        if self.refused:
            raise self.refused
        return records

    @property
    def streams(self) -> int:
        """The concurrency of the prefill and warm-up phases: the profiles' highest, within bounds."""
        limits = [p.limit for p in self.settings.profiles if p.limit]
        return min(max(limits), PREFILL_MAX_STREAMS) if limits else 8

    async def warm_up(self, requester: Requester) -> None:
        """Unmeasured requests first: a fresh engine runs its first request slower."""
        n = self.settings.warmup_requests
        if n > 0:
            self.log(f"warm-up: {n} unmeasured requests at {min(n, self.streams)} streams")
            await self._issue(requester, Concurrency(min(n, self.streams)), Bounds(n), "warm-up")

    async def prefill(self, requester: Requester) -> Optional[dict[str, Any]]:
        """``max_tokens=1`` requests one at a time, then at the profiles' highest concurrency (at most
        ``PREFILL_MAX_STREAMS``; 8 for open-loop profiles)."""
        n = self.settings.prefill_requests
        if n <= 0:
            return None
        streams = self.streams
        self.log(f"prefill phase: {n} requests one at a time, then {max(n, 2 * streams)} at {streams} streams, "
                 f"max_tokens=1")
        single = await self._issue(requester, Concurrency(1), Bounds(n), "prefill 1 stream", 1)
        many = await self._issue(requester, Concurrency(streams), Bounds(max(n, 2 * streams)),
                                 f"prefill {streams} streams", 1)
        return prefill_figures(single, many, streams)

    async def one_run(self, requester: Requester, session: aiohttp.ClientSession, profile: Profile,
                      auto_scaled: bool) -> dict[str, Any]:
        s = self.settings
        count = s.num_requests
        if auto_scaled and count is not None and profile.limit:
            count = max(count, 4 * profile.limit)  # a doubling sweep needs several rounds per step
        bounds = Bounds(count, s.duration_s, s.drain_s)
        self.log(f"run: {profile.label}, {count or 'unbounded'} requests"
                 + (f", {s.duration_s:g} s at most" if s.duration_s else ""))
        before = await scrape(session, self.url, self.model)
        t = time.perf_counter()
        records = await self._issue(requester, profile, bounds, profile.label)
        wall = time.perf_counter() - t
        after = await scrape(session, self.url, self.model)
        figures = run_figures(records, s.warmup, s.cooldown, s.slos)
        counted = {r.index for r in counted_records(records, s.warmup, s.cooldown)}
        return {"profile": profile.label, "kind": profile.kind, "concurrency": profile.limit,
                "rate": getattr(profile, "rate", None), "wall_s": wall, **figures,
                "server": server_figures(before, after, sum(r.prompt_tokens for r in records),
                                         sum(r.output_tokens for r in records)),
                "request_rows": request_rows(records, counted)}

    async def run(self) -> dict[str, Any]:
        s = self.settings
        report: dict[str, Any] = {"schema": SCHEMA, "url": self.url, "model": self.model,
                                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": s.described(),
                                  "prefill": None, "runs": [], "saturated_at": None, "interrupted": False}
        timeout = aiohttp.ClientTimeout(total=s.request_timeout_s, sock_connect=5.0)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False),
                                         timeout=timeout, headers=auth_headers(self.api_key)) as session:
            salt = secrets.token_hex(8) if s.cache_salt == "auto" else s.cache_salt
            report["cache_salt"] = salt
            requester = Requester(session, self.url, self.model, s.endpoint, s.stream, s.ignore_eos,
                                  self.tokenizer, {**({"cache_salt": salt} if salt else {}), **s.extra_body})
            await self.warm_up(requester)
            report["prefill"] = await self.prefill(requester)
            best, auto = 0.0, len(s.profiles) > 1
            for profile in s.profiles:
                if self.stop.is_set():
                    break
                result = await self.one_run(requester, session, profile, auto)
                report["runs"].append(result)
                if auto and s.stop_at_saturation and profile.saturated(result, best, s.saturation_gain):
                    report["saturated_at"] = profile.label
                    self.log(f"saturated at {profile.label}: the sweep stops here")
                    break
                best = max(best, result["output_tok_s"] or 0.0)
        report["interrupted"] = self.stop.is_set()
        report["summary"] = summary(report)
        return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: prefill (1 stream and aggregate), decode per stream at the lowest
    concurrency run, and the best aggregate output and decode throughput across runs."""
    runs, prefill = report["runs"], report.get("prefill") or {}
    lowest = min(runs, key=lambda r: r["concurrency"] or 1e9, default=None)
    return {
        "prefill_tok_s": prefill.get("single_stream_tok_s"), "prefill_tok_s_aggregate": prefill.get("aggregate_tok_s"),
        "decode_tok_s_per_stream": lowest["decode_tok_s_per_stream"]["p50"] if lowest else None,
        "output_tok_s": max((r["output_tok_s"] or 0.0 for r in runs), default=None),
        "decode_tok_s": max((r["decode_tok_s"] or 0.0 for r in runs), default=None),
        "ttft_p50_s": runs[-1]["ttft_s"]["p50"] if runs else None,
        "errors": sum(r["errors"]["count"] for r in runs),
    }


async def _main(url: str, model: Optional[str], settings: LoadSettings, progress: bool,
                log: Callable[[str], None], api_key: str) -> dict[str, Any]:
    import httpx

    from core.client import check_endpoint

    tokenizer = None
    if settings.tokenizer:
        from core.checkpoint import load_tokenizer

        tokenizer = load_tokenizer(settings.tokenizer)
    specs = _workload(settings, tokenizer)  # bad files fail here, before any request
    url = base_url(url)
    async with httpx.AsyncClient(headers=auth_headers(api_key)) as client:
        model = await check_endpoint(client, url, model)
    test = LoadTest(url, model, settings, specs, tokenizer, progress, log, api_key)
    loop = asyncio.get_running_loop()
    try:  # Ctrl-C stops issuing and cancels what is in flight; the partial report is still returned
        loop.add_signal_handler(signal.SIGINT, test.stop.set)
    except (NotImplementedError, RuntimeError):  # not the main thread (tests), or no signals here
        pass
    try:
        return await test.run()
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError):
            pass


def run_async(coro: Any) -> Any:
    """Runs ``coro`` on uvloop where it is installed (the tester's own overhead halves), else asyncio."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    if not hasattr(asyncio, "Runner"):  # Python 3.10
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def run_loadtest(url: str, model: Optional[str] = None, settings: LoadSettings = LoadSettings(),
                 log: Callable[[str], None] = print, progress: bool = True,
                 api_key: Optional[str] = None) -> dict[str, Any]:
    """Runs the load test of ``settings`` against ``url``; returns the report (schema ``qserve.loadtest/2``).
    ``api_key`` (default ``$OPENAI_API_KEY``) goes with every request and scrape, never into the report."""
    return run_async(_main(url, model, settings, progress, log, resolve_api_key(api_key)))

