"""The proxy logic behind the OpenAI endpoints: no routing here, only forwarding and accounting."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional

import aiohttp

from serving.backends import Backend, BackendPool
from serving.errors import APIError
from serving.keys import APIKey, KeyRing
from serving.metrics import GatewayMetrics
from serving.protocol import ModelCard, ModelList, _GenerationRequest
from serving.relay import UPSTREAM_ERRORS, RelayStream, StreamContext


class OpenAIProxy:
    """Forwards validated requests to the backend serving their model and records metrics."""

    def __init__(self, pool: BackendPool, metrics: GatewayMetrics, client: aiohttp.ClientSession,
                 keys: Optional[KeyRing] = None) -> None:
        self.pool = pool
        self.metrics = metrics
        self.client = client
        self.keys = keys or KeyRing([])

    def models(self) -> ModelList:
        cards = []
        for model, replicas in self.pool.replicas.items():
            first = replicas[0]
            cards.append(ModelCard(id=model, created=first.created, root=model, max_model_len=first.max_model_len))
        return ModelList(data=cards)

    def _record(self, model: str, endpoint: str, status: int, started: float, usage: Optional[dict],
                key: Optional[APIKey] = None) -> None:
        m = self.metrics
        if model not in self.pool.replicas:
            model = "unknown"  # a client's made-up names must not become label values without bound
        m.requests.labels(model, endpoint, str(status), key.id if key else "-").inc()
        m.latency.labels(model, endpoint).observe(time.perf_counter() - started)
        if usage:
            prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
            m.prompt_tokens.labels(model).inc(prompt)
            m.completion_tokens.labels(model).inc(completion)
            self.keys.record_tokens(key, prompt + completion)

    async def _send(self, endpoint: str, request: _GenerationRequest, payload: dict[str, Any],
                    authorization: Optional[str], started: float
                    ) -> tuple[Optional[APIKey], Backend, aiohttp.ClientResponse]:
        """Authenticates, checks the request against the model's context, takes a slot at the least busy
        replica and sends; a connection refused there (no byte reached an engine) is retried on another
        replica. Returns with the slot held and the engine's status line read; a refusal is counted, then
        raised."""
        key, tried = None, ()
        try:
            key = self.keys.identify(authorization)
            self.keys.admit(key, request.model)
            while True:
                backend = self.pool.get(request.model, exclude=tried)
                check_context(request, backend)
                await backend.admission.acquire()
                try:
                    body = {**payload, "model": backend.upstream_model} if backend.upstream_model else payload
                    return key, backend, await self.client.post(f"{backend.url}{endpoint}", json=body,
                                                                headers=backend.headers)
                except aiohttp.ClientConnectorError as exc:
                    await backend.admission.release()
                    error = self._upstream_error(backend, exc)
                    tried += (backend,)
                    if len(tried) == len(self.pool.replicas[request.model]):
                        raise error from None
                except UPSTREAM_ERRORS as exc:
                    await backend.admission.release()
                    raise self._upstream_error(backend, exc) from None
        except APIError as err:
            self._record(request.model, endpoint, err.status, started, None, key)
            raise

    def _upstream_error(self, backend: Backend, exc: BaseException) -> APIError:
        if isinstance(exc, asyncio.TimeoutError):
            self.metrics.upstream_errors.labels(backend.name, "timeout").inc()
            return APIError(504, f"model {backend.model!r} did not answer in time", code="upstream_timeout")
        self.metrics.upstream_errors.labels(backend.name, "connection").inc()
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
        payload = request.model_dump(exclude_none=True)
        key, backend, resp = await self._send(endpoint, request, payload, authorization, started)
        self.metrics.in_flight.labels(request.model).inc()
        try:
            async with resp:
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
        if backend.upstream_model and isinstance(body, dict):
            body["model"] = request.model  # the name the client asked for, not the upstream's
        self._record(request.model, endpoint, 200, started, body.get("usage"), key)
        return body

    async def open_stream(self, endpoint: str, request: _GenerationRequest,
                          authorization: Optional[str] = None) -> RelayStream:
        """Starts a streaming request; errors before the first byte raise, later ones become an error event."""
        started = time.perf_counter()
        wants_usage = bool(request.stream_options and request.stream_options.include_usage)
        payload = request.model_dump(exclude_none=True)
        payload["stream_options"] = {**payload.get("stream_options", {}), "include_usage": True}
        key, backend, upstream = await self._send(endpoint, request, payload, authorization, started)
        if upstream.status != 200:
            try:
                content = await upstream.read()
            except UPSTREAM_ERRORS:
                content = b""
            upstream.release()
            await backend.admission.release()
            self._record(request.model, endpoint, upstream.status, started, None, key)
            raise self._relay_error(upstream.status, content)
        return RelayStream(self, StreamContext(backend, endpoint, request.model, upstream, started, wants_usage, key))


def check_context(request: _GenerationRequest, backend: Backend) -> None:
    """400 for what cannot fit the model's context: ``max_tokens`` alone, or a token-id prompt plus it.
    Text prompts are measured by the engine's tokenizer (its 400 is relayed as it says)."""
    limit, budget = backend.max_model_len, request.generation_budget()
    if not limit:
        return
    if budget is not None and budget >= limit:
        raise APIError(400, f"max_tokens {budget} leaves no room for a prompt in the context of model "
                            f"{backend.model!r} ({limit} tokens); lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    for length in request.prompt_token_lengths():
        if length + (budget or 1) > limit:
            param = "prompt" if length >= limit else "max_tokens"
            raise APIError(400, f"the prompt ({length} tokens) plus max_tokens ({budget or 1}) exceeds the context "
                                f"of model {backend.model!r} ({limit} tokens); shorten the prompt or lower max_tokens",
                           param=param, code="context_length_exceeded")
