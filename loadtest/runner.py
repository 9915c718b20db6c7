"""``run_loadtest``: prefill, single-stream decode and concurrent phases against one endpoint."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from loadtest.data import data_file
from loadtest.client import EndpointError, base_url, check_endpoint, timed_completion
from loadtest.stats import RequestRecord, summarize

DEFAULT_TEXT_NAME = "wikitext2-valid.tokens"
WORDS_PER_TOKEN = 0.75  # English text; the report gives the token counts the server measured


@dataclass(frozen=True)
class LoadSpec:
    """What to send. Prompt lengths are approximate; the server's usage gives the exact counts."""

    input_len: int = 512
    output_len: int = 64
    concurrency: int = 8
    num_requests: int = 32
    prefill_requests: int = 8
    seed: int = 0
    text_file: Optional[Path] = None


def make_prompts(spec: LoadSpec, count: int) -> list[str]:
    """``count`` prompts of about ``input_len`` tokens, cut at seeded offsets from real text."""
    path = spec.text_file or data_file(DEFAULT_TEXT_NAME)
    if not path.exists():
        raise EndpointError(f"prompt text {path} not found; pass --text-file with any local text file")
    words = path.read_text(errors="replace").split()
    n_words = max(1, int(spec.input_len * WORDS_PER_TOKEN))
    if len(words) < n_words + 1:
        raise EndpointError(f"{path} has {len(words)} words; {n_words} are needed for one prompt")
    rng = random.Random(spec.seed)
    return [" ".join(words[o:o + n_words]) for o in (rng.randrange(len(words) - n_words) for _ in range(count))]


async def _run_phase(client: httpx.AsyncClient, url: str, model: str, prompts: list[str], max_tokens: int,
                     concurrency: int, desc: Optional[str] = None) -> tuple[list[RequestRecord], float]:
    from tqdm import tqdm

    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(prompts), desc=desc, unit="req", disable=desc is None, leave=False)

    async def one(prompt: str) -> RequestRecord:
        async with sem:
            record = await timed_completion(client, url, model, prompt, max_tokens)
            bar.update(1)
            return record

    start = time.perf_counter()
    records = await asyncio.gather(*(one(p) for p in prompts))
    bar.close()
    return list(records), time.perf_counter() - start


def _phase_figures(records: list[RequestRecord], wall: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    decode = [(r.output_tokens - 1) / (r.e2e - r.ttft) for r in ok if r.output_tokens > 1 and r.e2e > r.ttft]
    return {
        "requests": len(records), "errors": len(records) - len(ok),
        "error_samples": sorted({r.error for r in records if r.error})[:3],
        "wall_s": wall, "request_throughput": len(ok) / wall if wall else None,
        "output_tok_s": out_tokens / wall if wall else None,
        "mean_prompt_tokens": sum(r.prompt_tokens for r in ok) / len(ok) if ok else None,
        "decode_tok_s_per_stream": sum(decode) / len(decode) if decode else None,
        "ttft_s": summarize([r.ttft for r in ok]), "tpot_s": summarize([r.tpot for r in ok if r.tpot]),
        "itl_s": summarize([g for r in ok for g in r.itl]), "e2e_s": summarize([r.e2e for r in ok]),
    }


async def _run(url: str, model: Optional[str], spec: LoadSpec, log: Callable[[str], None],
               progress: bool) -> dict[str, Any]:
    url = base_url(url)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0),
                                 limits=httpx.Limits(max_connections=None)) as client:
        model = await check_endpoint(client, url, model)
        prompts = make_prompts(spec, spec.prefill_requests + spec.num_requests + 2)
        await _run_phase(client, url, model, prompts[:1], 4, 1)  # warm-up, not counted
        log(f"prefill phase: {spec.prefill_requests} single-stream requests, max_tokens=1")
        pre, pre_wall = await _run_phase(client, url, model, prompts[2:2 + spec.prefill_requests], 1, 1,
                                         "prefill" if progress else None)
        log(f"decode phase: 1 stream, {spec.output_len} tokens")
        single, single_wall = await _run_phase(client, url, model, prompts[1:2], spec.output_len, 1,
                                               "decode" if progress else None)
        log(f"load phase: {spec.num_requests} requests at concurrency {spec.concurrency}")
        load, load_wall = await _run_phase(client, url, model, prompts[2 + spec.prefill_requests:],
                                           spec.output_len, spec.concurrency, "load" if progress else None)
    pre_ok = [r for r in pre if r.ok]
    prefill_tok_s = sum(r.prompt_tokens for r in pre_ok) / sum(r.ttft for r in pre_ok) if pre_ok else None
    single_fig, load_fig = _phase_figures(single, single_wall), _phase_figures(load, load_wall)
    return {
        "schema": "qserve.loadtest/1", "url": url, "model": model, "spec": {**asdict(spec), "text_file": str(spec.text_file or DEFAULT_TEXT_NAME)},
        "prefill_tok_s": prefill_tok_s, "decode_tok_s": single_fig["decode_tok_s_per_stream"],
        "aggregate_output_tok_s": load_fig["output_tok_s"], "ttft_p50_s": load_fig["ttft_s"]["p50"],
        "phases": {"prefill": _phase_figures(pre, pre_wall), "single_stream": single_fig, "load": load_fig},
    }


def run_loadtest(url: str, model: Optional[str] = None, spec: LoadSpec = LoadSpec(),
                 log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Measures prefill tok/s, single-stream decode tok/s and a concurrent load; returns the report dict."""
    return asyncio.run(_run(url, model, spec, log, progress))
