"""Agreement of a served model with a baseline over the same text: how often both rank the same token
first, and the mean KL divergence of the candidate from the baseline, from each position's top-k
log-probabilities. Quantization damage shows here before it moves perplexity.

Both endpoints score the same windows one request at a time, in the same order, so a deterministic
engine compared with itself agrees exactly.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Optional

from accuracy.perplexity import score_windows, text_windows
from core.checkpoint import load_tokenizer
from accuracy.scoring import token_agreement
from core.client import EndpointError, resolve_api_key


def compare_scores(base: list, other: list) -> dict[str, Any]:
    """Top-1 agreement, mean and max KL, and the mean log-likelihood difference over every position."""
    agree, kls, delta = 0, [], 0.0
    for b, o in zip(base, other):
        for b_top, o_top, b_lp, o_lp in zip(b.top, o.top, b.logprobs, o.logprobs):
            same, kl = token_agreement(b_top, o_top)
            agree += same
            kls.append(kl)
            delta += o_lp - b_lp
    n = len(kls)
    if not n:
        raise EndpointError("no positions to compare: the endpoints returned no top-k log-probabilities")
    return {"positions": n, "top1_agreement": agree / n, "mean_kl": sum(kls) / n, "max_kl": max(kls),
            "mean_logprob_delta": delta / n}


def endpoint_agreement(url: str, baseline_url: str, text_file: Path, tokenizer: str, model: Optional[str] = None,
                       baseline_model: Optional[str] = None, seq_len: int = 512, max_windows: Optional[int] = 8,
                       top_k: int = 10, progress: bool = True, api_key: Optional[str] = None,
                       baseline_api_key: Optional[str] = None) -> dict[str, Any]:
    """Agreement of the model at ``url`` with the one at ``baseline_url`` over ``text_file``; ``api_key``
    defaults to ``$OPENAI_API_KEY``, ``baseline_api_key`` to ``api_key``."""
    key = resolve_api_key(api_key)
    base_key = key if baseline_api_key is None else resolve_api_key(baseline_api_key)
    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    windows, _ = text_windows(text, load_tokenizer(tokenizer), seq_len, max_windows)
    start = time.perf_counter()
    baseline_model, base = asyncio.run(score_windows(baseline_url, baseline_model, windows, 1, top_k, progress,
                                                               base_key))
    model, other = asyncio.run(score_windows(url, model, windows, 1, top_k, progress, key))
    return {"model": model, "baseline_model": baseline_model, "windows": len(windows), "seq_len": seq_len,
            "top_k": top_k, **compare_scores(base, other), "wall_s": time.perf_counter() - start}
