"""Perplexity through a served endpoint, from the log-probabilities ``/v1/completions`` gives a prompt's
own tokens.

The text is tokenized here with the model's tokenizer and cut into rolling windows that score every
token once (see :mod:`accuracy.scoring`); each window goes to the server as token ids, so the server
scores exactly the tokens counted here. Token perplexity, word perplexity and bits per byte follow
lm-evaluation-harness's definitions, over the whole file taken as one document.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

import httpx

from accuracy.client import PromptScores, score_prompt
from accuracy.scoring import Window, perplexity_figures, rolling_windows
from core.checkpoint import load_tokenizer
from core.client import EndpointError, auth_headers, base_url, check_endpoint, resolve_api_key
from core.progress import finish, progress as progress_bar

T = TypeVar("T")


def prefix_token(tokenizer) -> int:
    """The token that conditions the first one: BOS, else end-of-text (lm-evaluation-harness's choice)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise EndpointError("the tokenizer has neither a BOS nor an EOS token to start the first window with")
    return token


def text_windows(text: str, tokenizer, seq_len: int, max_windows: Optional[int]) -> tuple[list[Window], str]:
    """Rolling windows over ``text`` (the first ``max_windows`` of them) and the text they cover."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = rolling_windows(ids, seq_len, prefix_token(tokenizer))
    if max_windows and len(windows) > max_windows:
        windows = windows[:max_windows]
        text = tokenizer.decode(ids[:sum(w.scored for w in windows)])
    return windows, text


async def gather_limited(jobs: Sequence[Callable[[], Awaitable[T]]], concurrency: int, label: str,
                         progress: bool) -> list[T]:
    """Runs the jobs with at most ``concurrency`` at once, in order of results, with a progress bar."""
    sem = asyncio.Semaphore(max(concurrency, 1))
    bar = progress_bar(total=len(jobs), desc=label, disable=not progress)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with sem:
            result = await job()
            bar.update(1)
            return result

    try:
        results = await asyncio.gather(*(one(j) for j in jobs))
    except BaseException:
        finish(bar, failed=True)
        raise
    finish(bar)
    return results


def client_for(url: str, api_key: str = "") -> httpx.AsyncClient:
    """The evaluation client: long timeouts, many connections, the key sent with every request."""
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0), headers=auth_headers(api_key),
                             limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))


async def score_windows(url: str, model: Optional[str], windows: Sequence[Window], concurrency: int,
                        top_k: int = 1, progress: bool = False, api_key: str = "") -> tuple[str, list[PromptScores]]:
    """The served model's scores of each window; returns the model name used too."""
    url = base_url(url)
    async with client_for(url, api_key) as client:
        model = await check_endpoint(client, url, model)
        jobs = [lambda w=w: score_prompt(client, url, model, w.ids, top_k) for w in windows]
        return model, await gather_limited(jobs, concurrency, "windows", progress)


def endpoint_perplexity(url: str, text_file: Path, tokenizer: Any, model: Optional[str] = None,
                        seq_len: int = 1024, max_windows: Optional[int] = None, concurrency: int = 4,
                        progress: bool = True, api_key: Optional[str] = None) -> dict[str, Any]:
    """Token and word perplexity and bits per byte of the served model over ``text_file``; ``tokenizer`` is
    a loaded tokenizer or where to load one from; ``api_key`` defaults to ``$OPENAI_API_KEY``."""
    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    windows, covered = text_windows(text, tokenizer, seq_len, max_windows)
    if not windows:
        raise EndpointError(f"{text_file} holds no tokens to score")
    start = time.perf_counter()
    model, scored = asyncio.run(score_windows(url, model, windows, concurrency, progress=progress,
                                              api_key=resolve_api_key(api_key)))
    figures = perplexity_figures([lp for s in scored for lp in s.logprobs], covered)
    return {"model": model, "url": base_url(url), "text_file": str(text_file), "windows": len(windows),
            "seq_len": seq_len, "concurrency": concurrency, "tokens_scored": figures.tokens,
            "perplexity": figures.token_perplexity, **figures.to_dict(), "wall_s": time.perf_counter() - start}
