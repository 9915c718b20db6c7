"""Async clients of an OpenAI-compatible endpoint: a streamed timed completion, and error mapping."""

from __future__ import annotations

import json
import time
from typing import Any, Union

import httpx

from loadtest.stats import RequestRecord


class EndpointError(RuntimeError):
    """The endpoint cannot be used as asked; the message says what to check."""


def base_url(url: str) -> str:
    """The server's root URL, whether it was given with or without the ``/v1`` suffix."""
    return url.rstrip("/").removesuffix("/v1")


async def check_endpoint(client: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    """Fails fast on an unreachable URL or unknown model; returns the model to use."""
    try:
        resp = await client.get(f"{base_url}/v1/models", timeout=10.0)
    except httpx.HTTPError as exc:
        raise EndpointError(f"cannot reach {base_url} ({type(exc).__name__}); is the server running?") from None
    if resp.status_code != 200:
        raise EndpointError(f"{base_url}/v1/models answered {resp.status_code}: {resp.text[:200]}")
    names = [m["id"] for m in resp.json().get("data", [])]
    if model is None:
        if not names:
            raise EndpointError(f"{base_url} serves no models")
        return names[0]
    if model not in names:
        raise EndpointError(f"model {model!r} is not served at {base_url}; it serves: {', '.join(names)}")
    return model


def error_text(status: int, body: bytes) -> str:
    try:
        return f"{status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}: {body[:200].decode(errors='replace')}"


async def timed_completion(client: httpx.AsyncClient, base_url: str, model: str, prompt: Union[str, list[int]],
                           max_tokens: int, ignore_eos: bool = True, **extra: Any) -> RequestRecord:
    """One streamed ``/v1/completions`` request, timing the first token and every gap after it."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos, **extra}
    start = time.perf_counter()
    last, record = None, RequestRecord(ok=False)
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=payload) as resp:
            if resp.status_code != 200:
                record.error = error_text(resp.status_code, await resp.aread())
                return record
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = event["error"].get("message", "stream error")
                    return record
                now = time.perf_counter()
                if event.get("choices"):
                    if last is None:
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
                if event.get("usage"):
                    record.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    record.output_tokens = event["usage"].get("completion_tokens", 0)
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    record.e2e = time.perf_counter() - start
    record.ok = record.ttft is not None
    if not record.ok:
        record.error = "no tokens streamed"
    return record
