"""Perplexity through a served endpoint, from the prompt log-probabilities of ``/v1/completions``.

The text is tokenized here with the model's own tokenizer and cut into non-overlapping windows of
``seq_len`` tokens; each window goes to the server as token ids with ``echo`` and ``logprobs``, so
the server scores exactly the tokens we count. The first token of a window has no context and is
not scored.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any, Optional

import httpx

from loadtest.client import EndpointError, check_endpoint


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - many loader errors, one message
        raise EndpointError(f"cannot load a tokenizer from {source!r} ({type(exc).__name__}); "
                            f"pass --tokenizer with the model's checkpoint directory") from None


def make_windows(token_ids: list[int], seq_len: int, max_windows: Optional[int]) -> list[list[int]]:
    """Non-overlapping windows of exactly ``seq_len`` tokens (a shorter tail is dropped)."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    windows = [token_ids[i:i + seq_len] for i in range(0, len(token_ids) - seq_len + 1, seq_len)]
    return windows[:max_windows] if max_windows else windows


def _prompt_logprobs(body: dict[str, Any]) -> list[float]:
    choice = body["choices"][0]
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    if not logprobs:
        raise EndpointError("the endpoint returned no prompt log-probabilities; it must support "
                            "`echo: true` with `logprobs` on /v1/completions (vLLM does; chat-only APIs do not)")
    return [lp for lp in logprobs if lp is not None]


async def _score(client: httpx.AsyncClient, url: str, model: str, window: list[int]) -> list[float]:
    payload = {"model": model, "prompt": window, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0.0}
    resp = await client.post(f"{url}/v1/completions", json=payload)
    if resp.status_code != 200:
        raise EndpointError(f"{url}/v1/completions answered {resp.status_code}: {resp.text[:300]}")
    # with echo, the list covers the prompt then the one generated token: keep the prompt's
    return _prompt_logprobs(resp.json())[: len(window) - 1]


async def _perplexity(url: str, model: Optional[str], windows: list[list[int]], concurrency: int,
                      progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    url = url.rstrip("/").removesuffix("/v1")
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0)) as client:
        model = await check_endpoint(client, url, model)
        sem = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)

        async def one(window: list[int]) -> list[float]:
            async with sem:
                scores = await _score(client, url, model, window)
                bar.update(1)
                return scores

        start = time.perf_counter()
        scored = await asyncio.gather(*(one(w) for w in windows))
        bar.close()
    nll = -sum(sum(s) for s in scored)
    count = sum(len(s) for s in scored)
    return {"model": model, "url": url, "windows": len(windows), "seq_len": len(windows[0]) if windows else 0,
            "tokens_scored": count, "nll": nll, "perplexity": math.exp(nll / count) if count else None,
            "wall_s": time.perf_counter() - start}


def endpoint_perplexity(url: str, text_file: Path, tokenizer: str, model: Optional[str] = None,
                        seq_len: int = 2048, max_windows: Optional[int] = 20, concurrency: int = 2,
                        progress: bool = True) -> dict[str, Any]:
    """Token perplexity of the served model over ``text_file``."""
    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    ids = load_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"]
    windows = make_windows(ids, seq_len, max_windows)
    if not windows:
        raise EndpointError(f"{text_file} has {len(ids)} tokens, fewer than one window of {seq_len}")
    result = asyncio.run(_perplexity(url, model, windows, concurrency, progress))
    result["text_file"] = str(text_file)
    return result
