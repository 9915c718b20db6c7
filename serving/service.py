"""The proxy logic behind the OpenAI endpoints: no routing here, only forwarding and accounting."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import aiohttp

from serving.backends import Backend, BackendPool
from serving.errors import APIError
from serving.keys import APIKey, KeyRing
from serving.metrics import GatewayMetrics
from serving.protocol import ModelCard, ModelList, _GenerationRequest

DONE = b"data: [DONE]\n\n"
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class OpenAIProxy:
    """Forwards validated requests to the backend serving their model and records metrics."""

    def __init__(self, pool: BackendPool, metrics: GatewayMetrics, client: aiohttp.ClientSession,
                 keys: Optional[KeyRing] = None) -> None:
        self.pool = pool
        self.metrics = metrics
        self.client = client
        self.keys = keys or KeyRing([])

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=b.model, created=b.created, root=b.model, max_model_len=b.max_model_len)
                               for b in self.pool.backends.values()])

    def _record(self, model: str, endpoint: str, status: int, started: float, usage: Optional[dict],
                key: Optional[APIKey] = None) -> None:
        m = self.metrics
        if model not in self.pool.backends:
            model = "unknown"  # a client's made-up names must not become label values without bound
        m.requests.labels(model, endpoint, str(status), key.id if key else "-").inc()
        m.latency.labels(model, endpoint).observe(time.perf_counter() - started)
        if usage:
            prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
            m.prompt_tokens.labels(model).inc(prompt)
            m.completion_tokens.labels(model).inc(completion)
            self.keys.record_tokens(key, prompt + completion)

    async def _admit(self, endpoint: str, request: _GenerationRequest, authorization: Optional[str],
                     started: float) -> tuple[Optional[APIKey], Backend]:
        """Authenticates, finds the backend and takes one of its slots; a refusal is counted, then raised."""
        key = None
        try:
            key = self.keys.identify(authorization)
            self.keys.admit(key, request.model)
            backend = self.pool.get(request.model)
            await backend.admission.acquire()
        except APIError as err:
            self._record(request.model, endpoint, err.status, started, None, key)
            raise
        return key, backend

    def _upstream_error(self, backend: Backend, exc: BaseException) -> APIError:
        if isinstance(exc, asyncio.TimeoutError):
            self.metrics.upstream_errors.labels(backend.model, "timeout").inc()
            return APIError(504, f"model {backend.model!r} did not answer in time", code="upstream_timeout")
        self.metrics.upstream_errors.labels(backend.model, "connection").inc()
        return APIError(502, f"model {backend.model!r} is unreachable ({type(exc).__name__})",
                        code="upstream_unreachable")

    @staticmethod
    def _relay_error(status: int, content: bytes) -> APIError:
        """An engine's own error, kept as the engine said it, in the gateway's envelope."""
        try:
            err = json.loads(content).get("error") or {}
            message = err.get("message") if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            err, message = {}, None
        return APIError(status, message or content.decode(errors="replace")[:500] or f"engine returned {status}",
                        param=err.get("param") if isinstance(err, dict) else None,
                        code=err.get("code") if isinstance(err, dict) and isinstance(err.get("code"), str) else None)

    async def complete(self, endpoint: str, request: _GenerationRequest,
                       authorization: Optional[str] = None) -> dict[str, Any]:
        """A non-streaming request: the engine's JSON answer."""
        started = time.perf_counter()
        key, backend = await self._admit(endpoint, request, authorization, started)
        self.metrics.in_flight.labels(request.model).inc()
        try:
            async with self.client.post(f"{backend.url}{endpoint}", json=request.model_dump(exclude_none=True)) as resp:
                status, content = resp.status, await resp.read()
        except UPSTREAM_ERRORS as exc:
            err = self._upstream_error(backend, exc)
            self._record(request.model, endpoint, err.status, started, None, key)
            raise err from None
        finally:
            self.metrics.in_flight.labels(request.model).dec()
            await backend.admission.release()
        if status != 200:
            self._record(request.model, endpoint, status, started, None, key)
            raise self._relay_error(status, content)
        body = json.loads(content)
        self._record(request.model, endpoint, 200, started, body.get("usage"), key)
        return body

    async def open_stream(self, endpoint: str, request: _GenerationRequest,
                          authorization: Optional[str] = None) -> "RelayStream":
        """Starts a streaming request; errors before the first byte raise, later ones become an error event."""
        started = time.perf_counter()
        key, backend = await self._admit(endpoint, request, authorization, started)
        wants_usage = bool(request.stream_options and request.stream_options.include_usage)
        payload = request.model_dump(exclude_none=True)
        payload["stream_options"] = {**payload.get("stream_options", {}), "include_usage": True}
        try:
            upstream = await self.client.post(f"{backend.url}{endpoint}", json=payload)
        except UPSTREAM_ERRORS as exc:
            await backend.admission.release()
            err = self._upstream_error(backend, exc)
            self._record(request.model, endpoint, err.status, started, None, key)
            raise err from None
        if upstream.status != 200:
            content = await upstream.read()
            upstream.release()
            await backend.admission.release()
            self._record(request.model, endpoint, upstream.status, started, None, key)
            raise self._relay_error(upstream.status, content)
        return RelayStream(self, StreamContext(backend, endpoint, request.model, upstream, started, wants_usage, key))


async def _sse_data(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The ``data:`` payloads of an SSE byte stream, split on blank lines without decoding to text
    (the relay's hot path: about one event per generated token)."""
    buffer = b""
    async for piece in upstream.content.iter_any():
        buffer += piece.replace(b"\r\n", b"\n")
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:]


@dataclass
class StreamContext:
    """One relayed stream: where it goes and what it is counted against."""

    backend: Backend
    endpoint: str
    model: str
    upstream: aiohttp.ClientResponse
    started: float
    wants_usage: bool
    key: Optional[APIKey]


class RelayStream:
    """An engine's SSE stream relayed to the client, usage stripped where it was not asked for.

    ``close`` (idempotent) frees the backend slot, closes the upstream connection (vLLM then aborts the
    request) and counts the request; the relay calls it when it ends, and the route also runs it after
    the response, so a client that leaves before the first byte leaks nothing (counted as 499).
    """

    def __init__(self, proxy: OpenAIProxy, ctx: StreamContext) -> None:
        self.proxy, self.ctx, self.closed = proxy, ctx, False
        proxy.metrics.in_flight.labels(ctx.model).inc()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        ctx, metrics = self.ctx, self.proxy.metrics
        usage, status, first = None, 499, True  # 499 (client closed request) until the stream ends otherwise
        try:
            async for data in _sse_data(ctx.upstream):
                if data.strip() == b"[DONE]":
                    status = 200
                    break
                if first:
                    metrics.ttft.labels(ctx.model).observe(time.perf_counter() - ctx.started)
                    first = False
                if b'"usage"' in data:  # only these events are parsed: the rest pass through as bytes
                    event = json.loads(data)
                    if event.get("usage"):
                        usage = event["usage"]
                        if not ctx.wants_usage and not event.get("choices"):
                            continue  # the usage-only chunk the gateway asked for on its own account
                        if not ctx.wants_usage:
                            event["usage"] = None
                            data = json.dumps(event).encode()
                yield b"data: " + data + b"\n\n"
            if status != 200:  # the engine closed the stream without its [DONE]
                status = 502
                yield APIError(502, "stream interrupted: the engine closed it early", code="upstream_closed").sse()
        except UPSTREAM_ERRORS as exc:
            err = self.proxy._upstream_error(ctx.backend, exc)
            status = err.status
            yield APIError(err.status, f"stream interrupted: {err.message}", code=err.code).sse()
        except ValueError:
            status = 502
            yield APIError(502, "the engine sent a malformed stream event", code="upstream_malformed").sse()
        finally:
            await self.close(status, usage)
        yield DONE

    async def close(self, status: int = 499, usage: Optional[dict] = None) -> None:
        if self.closed:
            return
        self.closed = True
        ctx = self.ctx
        self.proxy.metrics.in_flight.labels(ctx.model).dec()
        self.proxy._record(ctx.model, ctx.endpoint, status, ctx.started, usage, ctx.key)
        await ctx.backend.admission.release()
        if status == 200:
            ctx.upstream.release()  # the engine finished: its connection goes back to the pool
        else:
            ctx.upstream.close()  # closing the connection is how vLLM learns to abort the request
