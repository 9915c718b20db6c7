"""What evaluation asks of an OpenAI-compatible endpoint: log-probabilities of a prompt's own tokens
(``/v1/completions`` with ``echo`` and ``logprobs``, no generation) and greedy chat answers.

Failures become :class:`EndpointError` messages that say which server option or endpoint is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import httpx

from core.client import EndpointError, auth_error, error_text, sent_key


@dataclass
class PromptScores:
    """Per token after the first: its log-probability, whether it was the most likely token, and the
    top-k alternatives (token key -> log-probability; keys are ``token_id:N`` on vLLM)."""

    logprobs: list[float]
    greedy: list[bool]
    top: list[dict[str, float]] = field(default_factory=list)


def _explain(status: int, text: str, top_k: int) -> str:
    if status == 404:
        return ("it has no /v1/completions: prompt log-probabilities need the completions endpoint with "
                "`echo` and `logprobs` (vLLM serves it; chat-only APIs cannot score a text)")
    if status == 400 and "logprob" in text.lower():
        return (f"it refuses {top_k} log-probabilities per token: vLLM caps them with --max-logprobs "
                f"(default 20); restart it with a larger --max-logprobs or ask for fewer (--top-k)")
    if status == 400 and ("context" in text.lower() or "too long" in text.lower()):
        return "a window is longer than the model's context: lower --seq-len"
    return "see its answer above"


def _raise_for_auth(client: httpx.AsyncClient, url: str, resp: httpx.Response) -> None:
    """A 401/403 says how to pass the key, whatever the route (some servers list models without a key)."""
    refused = auth_error(url, resp.status_code, error_text(resp.status_code, resp.content),
                         sent_key(client))
    if refused:
        raise refused


async def score_prompt(client: httpx.AsyncClient, url: str, model: str, ids: Sequence[int],
                       top_k: int = 1) -> PromptScores:
    """Log-probabilities the served model gives each token of ``ids`` after the first."""
    payload: dict[str, Any] = {"model": model, "prompt": list(ids), "max_tokens": 0, "echo": True,
                               "logprobs": max(top_k, 1), "temperature": 0.0, "return_tokens_as_token_ids": True}
    resp = await client.post(f"{url}/v1/completions", json=payload)
    _raise_for_auth(client, f"{url}/v1/completions", resp)
    if resp.status_code != 200:
        message = error_text(resp.status_code, resp.content)
        raise EndpointError(f"{url}/v1/completions answered {message}; {_explain(resp.status_code, message, top_k)}")
    choice = resp.json()["choices"][0]
    logprobs = choice.get("logprobs") or {}
    token_lps, tops = logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
    if not token_lps or len(token_lps) < len(ids) or not tops:
        raise EndpointError(f"{url} returned no prompt log-probabilities: the server must honour `echo: true` with "
                            f"`logprobs` on /v1/completions (vLLM does; OpenAI's chat models and chat-only servers "
                            f"do not), and accept `max_tokens: 0`")
    lps = [float(x) for x in token_lps[1:len(ids)]]
    top = [{k: float(v) for k, v in (t or {}).items()} for t in tops[1:len(ids)]]
    greedy = [lp >= max(t.values(), default=lp) - 1e-6 for lp, t in zip(lps, top)]
    return PromptScores(lps, greedy, top if top_k > 1 else [])


async def chat_answer(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> str:
    """The greedy chat answer to one user message."""
    payload = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
               "temperature": 0.0}
    resp = await client.post(f"{url}/v1/chat/completions", json=payload)
    _raise_for_auth(client, f"{url}/v1/chat/completions", resp)
    if resp.status_code != 200:
        message = error_text(resp.status_code, resp.content)
        hint = ("generation tasks need /v1/chat/completions and a chat template in the checkpoint"
                if resp.status_code in (400, 404) else "see its answer above")
        raise EndpointError(f"{url}/v1/chat/completions answered {message}; {hint}")
    return resp.json()["choices"][0]["message"].get("content") or ""
