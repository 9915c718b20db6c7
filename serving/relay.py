"""The streaming hot path: an engine's SSE stream relayed to the client at about one send per read.

A generated token costs the gateway one upstream read and one downstream write, so nothing here works per
event unless it must: blocks of complete events pass through as bytes, and only a block that carries usage
or ``[DONE]`` is split and parsed. The response is raw ASGI (no task group, no per-chunk wrapper); one
``receive()`` future watches for the client leaving, which aborts the upstream request.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Optional

import aiohttp
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from serving.backends import Backend
from serving.errors import APIError
from serving.keys import APIKey

if TYPE_CHECKING:
    from serving.service import OpenAIProxy

DONE = b"data: [DONE]\n\n"
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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


def _error_tail(status: int, message: str, code: Optional[str]) -> bytes:
    """How a stream that failed after its 200 ends: one error event in the envelope, then ``[DONE]``."""
    return APIError(status, message, code=code).sse() + DONE


class RelayStream:
    """An engine's SSE stream as blocks of complete events, usage stripped where it was not asked for.

    ``close`` (idempotent) frees the backend slot, closes or releases the upstream connection (closing is
    how vLLM learns to abort) and counts the request: 200 at ``[DONE]``, 499 when the client left, 502/504
    when the engine failed mid-stream (the client then gets an error event, then ``[DONE]``).
    """

    def __init__(self, proxy: "OpenAIProxy", ctx: StreamContext) -> None:
        self.proxy, self.ctx = proxy, ctx
        self.closed = self.aborted = False
        self.usage: Optional[dict] = None
        self.tail = DONE  # what the response sends last
        upstream = ctx.backend.upstream_model
        # chunks name the model as the client asked for it (compact and spaced JSON both)
        self.renames = [(f'"model":{sep}{json.dumps(upstream)}'.encode(), f'"model":{sep}{json.dumps(ctx.model)}'.encode())
                        for sep in ("", " ")] if upstream else []
        proxy.metrics.in_flight.labels(ctx.model).inc()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._blocks()

    def abort(self) -> None:
        """The client left: drop the upstream connection now; the relay then ends as 499."""
        if not self.closed:
            self.aborted = True
            self.ctx.upstream.close()

    async def _blocks(self) -> AsyncIterator[bytes]:
        """The blocks before the last; the last (the final events, or an error event) and ``[DONE]`` are left
        in ``tail`` for the response's closing send, which writes them with the chunked terminator at once."""
        ctx, status, buffer, first = self.ctx, 502, b"", True
        try:
            async for piece in ctx.upstream.content.iter_any():
                buffer += piece
                if b"\r" in buffer:  # servers that end lines with CRLF; a lone trailing \r waits for its \n
                    buffer = buffer.replace(b"\r\n", b"\n")
                end = buffer.rfind(b"\n\n")
                if end < 0:
                    continue
                block, buffer = buffer[:end + 2], buffer[end + 2:]
                if first:
                    self.proxy.metrics.ttft.labels(ctx.model).observe(time.perf_counter() - ctx.started)
                    first = False
                done = False
                for old, new in self.renames:
                    block = block.replace(old, new)
                if b'"usage"' in block or b"[DONE]" in block:
                    block, done = self._rewrite(block)
                if done:
                    status, self.tail = 200, block + DONE
                    break
                if block:
                    yield block
            else:  # the engine closed the stream without its [DONE]
                self.tail = _error_tail(502, "stream interrupted: the engine closed it early", "upstream_closed")
        except UPSTREAM_ERRORS as exc:
            if self.aborted:
                status = 499
            else:
                err = self.proxy._upstream_error(ctx.backend, exc)
                status = err.status
                self.tail = _error_tail(err.status, f"stream interrupted: {err.message}", err.code)
        except ValueError:
            self.tail = _error_tail(502, "the engine sent a malformed stream event", "upstream_malformed")
        finally:
            await self.close(499 if self.aborted else status)

    def _rewrite(self, block: bytes) -> tuple[bytes, bool]:
        """The events of a block that carries usage or ``[DONE]``: usage kept only where the client asked
        for it (the gateway always asks, to count tokens); True once ``[DONE]`` is reached."""
        kept = []
        for event in block[:-2].split(b"\n\n"):
            data = next((line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")), None)
            if data == b"[DONE]":
                return b"".join(kept), True
            if data is not None and b'"usage"' in data:
                parsed = json.loads(data)
                if parsed.get("usage"):
                    self.usage = parsed["usage"]
                    if not self.ctx.wants_usage:
                        if not parsed.get("choices"):
                            continue  # the usage-only event the gateway asked for on its own account
                        parsed["usage"] = None
                        event = b"data: " + json.dumps(parsed).encode()
            kept.append(event + b"\n\n")
        return b"".join(kept), False

    async def close(self, status: int = 499) -> None:
        if self.closed:
            return
        self.closed = True
        ctx = self.ctx
        self.proxy.metrics.in_flight.labels(ctx.model).dec()
        self.proxy._record(ctx.model, ctx.endpoint, status, ctx.started, self.usage, ctx.key)
        await ctx.backend.admission.release()
        if status == 200:
            ctx.upstream.release()  # the engine finished: its connection goes back to the pool
        else:
            ctx.upstream.close()


class RelayResponse(Response):
    """A ``RelayStream`` as a raw ASGI response: one ``send`` per block, the stream closed however it ends."""

    media_type = "text/event-stream"

    def __init__(self, stream: RelayStream) -> None:
        # no super().__init__: it would render an empty body and declare Content-Length: 0
        self.status_code, self.background, self.stream = 200, None, stream
        self.init_headers(SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self.stream
        # the request body is read, so receive() now returns only when the client disconnects (or the
        # response completes, by which time the stream is closed and abort is a no-op)
        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(lambda f: f.cancelled() or stream.abort())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for block in stream:
                await send({"type": "http.response.body", "body": block, "more_body": True})
            # one write for the last events, [DONE] and the chunked terminator (for a short answer, the
            # whole body): a syscall per send is a good part of the gateway's cost per request
            await send({"type": "http.response.body", "body": stream.tail, "more_body": False})
        finally:
            watcher.cancel()
            await stream.close()
