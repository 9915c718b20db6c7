"""One timed request against an OpenAI-compatible endpoint (aiohttp: the load tester's hot path)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

from core.client import error_text
from loadtest.stats import RequestRecord
from loadtest.workloads import RequestSpec, Tokenizer

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _completion_text(choice: dict) -> Optional[str]:
    return choice.get("text")


def _chat_text(choice: dict) -> Optional[str]:
    return (choice.get("delta") or choice.get("message") or {}).get("content")


@dataclass
class Requester:
    """Sends requests to ``base_url`` for ``model`` and records their timings into a ``RequestRecord``.

    Streaming requests time the first output chunk (TTFT) and every chunk after it; the token counts
    come from the usage the server sends with ``stream_options.include_usage``, or from ``tokenizer``
    where it sends none (else output chunks are counted as tokens, and the record says so).
    """

    session: aiohttp.ClientSession
    base_url: str
    model: str
    endpoint: str = "completions"
    stream: bool = True
    ignore_eos: bool = True
    tokenizer: Optional[Tokenizer] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def payload(self, spec: RequestSpec, max_tokens: Optional[int] = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens or spec.max_tokens,
                                "temperature": 0.0, "stream": self.stream, "ignore_eos": self.ignore_eos}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": spec.text}]
        else:
            body["prompt"] = list(spec.token_ids) if spec.token_ids is not None else spec.text
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return {**body, **self.extra}

    async def send(self, spec: RequestSpec, record: RequestRecord, max_tokens: Optional[int] = None) -> None:
        """Fills ``record`` as the request proceeds (a cancelled request leaves it partial)."""
        text_of = _chat_text if self.endpoint == "chat" else _completion_text
        pieces: list[str] = []
        start = time.perf_counter()
        try:
            async with self.session.post(self.base_url + ENDPOINTS[self.endpoint],
                                         json=self.payload(spec, max_tokens)) as resp:
                record.status = resp.status
                if resp.status != 200:
                    record.error = error_text(resp.status, await resp.read())
                    return
                if self.stream:
                    await self._read_stream(resp, record, start, text_of, pieces)
                else:
                    body = await resp.json(content_type=None)
                    record.chunk_times.append(time.perf_counter() - start)
                    record.ttft = record.chunk_times[0]
                    pieces.extend(text_of(c) or "" for c in body.get("choices") or [])
                    self._take_usage(record, body.get("usage"))
        except asyncio.TimeoutError:
            record.error = f"timed out after {time.perf_counter() - start:.1f} s"
            return
        except aiohttp.ClientError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            return
        if record.error:
            return
        record.e2e = time.perf_counter() - start if self.stream else record.ttft
        record.ok = record.ttft is not None
        if not record.ok:
            record.error = "no tokens streamed"
        elif record.token_source != "usage" or not record.output_tokens:
            self._count_tokens(record, spec, "".join(pieces))

    async def _read_stream(self, resp: aiohttp.ClientResponse, record: RequestRecord, start: float,
                           text_of: Any, pieces: list[str]) -> None:
        record.token_source = "chunks"
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                break
            event = json.loads(line[6:])
            if "error" in event:
                record.error = (event["error"] or {}).get("message", "stream error")
                return
            choices = event.get("choices")
            if choices:
                text = text_of(choices[0])
                if text is not None and (text or self.endpoint == "completions"):
                    now = time.perf_counter() - start
                    if record.ttft is None:
                        record.ttft = now
                    record.chunk_times.append(now)
                    pieces.append(text)
            if event.get("usage"):
                self._take_usage(record, event["usage"])

    @staticmethod
    def _take_usage(record: RequestRecord, usage: Optional[dict]) -> None:
        if usage:
            record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            record.output_tokens = int(usage.get("completion_tokens") or 0)
            record.token_source = "usage"

    def _count_tokens(self, record: RequestRecord, spec: RequestSpec, output: str) -> None:
        """The fallback where the server sent no usage: the tokenizer, else one token per chunk."""
        if self.tokenizer is not None:
            record.output_tokens = len(self.tokenizer.encode(output, add_special_tokens=False))
            record.prompt_tokens = (len(spec.token_ids) if spec.token_ids is not None else
                                    len(self.tokenizer.encode(spec.text, add_special_tokens=False)))
            record.token_source = "tokenizer"
        else:
            record.output_tokens = len(record.chunk_times)
            record.prompt_tokens = len(spec.token_ids) if spec.token_ids is not None else 0
            record.token_source = "chunks"
