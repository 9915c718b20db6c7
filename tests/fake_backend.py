"""An in-process OpenAI-compatible fake engine for the gateway's corner cases (beside the real-vLLM tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from serving.server import free_port


def _chunk(i: int, text: str, model: str = "fake") -> str:
    return "data: " + json.dumps({"id": "x", "object": "text_completion", "model": model,
                                  "choices": [{"index": 0, "text": text, "finish_reason": None}]}) + "\n\n"


def make_fake_engine() -> FastAPI:
    app = FastAPI()
    app.state.open_streams = 0  # streams being sent: back to 0 once every client (the gateway) has gone
    app.state.completions = 0  # completion requests received

    @app.get("/debug/open_streams")
    async def open_streams():
        return {"open": app.state.open_streams, "completions": app.state.completions}

    @app.get("/health")
    async def health():
        return {}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse("# HELP vllm:prompt_tokens_total x\n# TYPE vllm:prompt_tokens_total counter\n"
                                 "vllm:prompt_tokens_total{model_name=\"fake\"} 42.0\n")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.completions += 1
        prompt = body.get("prompt")
        if prompt == "ERROR400":
            return JSONResponse({"error": {"message": "prompt too long", "type": "BadRequestError",
                                           "param": "prompt", "code": 400}}, status_code=400)
        if prompt == "SLOW":
            await asyncio.sleep(5)
        n = body.get("max_tokens") or 4
        if not isinstance(n, int) or n > 4096:  # as vLLM refuses what exceeds the context
            return JSONResponse({"error": {"message": f"max_tokens {n!r} is too large", "type": "BadRequestError",
                                           "param": "max_tokens", "code": 400}}, status_code=400)
        usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
        if not body.get("stream"):
            return {"id": "x", "object": "text_completion", "model": body.get("model"), "usage": usage,
                    "choices": [{"index": 0, "text": " tok" * n, "finish_reason": "length"}]}

        async def events():
            app.state.open_streams += 1
            try:
                async for event in _events():
                    yield event
            finally:
                app.state.open_streams -= 1

        async def _events():
            if prompt == "GARBLED":
                yield _chunk(0, " tok")
                yield 'data: {"usage": {broken\n\n'
                return
            if prompt == "CRLF":  # servers that end lines with CRLF
                for i in range(n):
                    yield _chunk(i, " tok").replace("\n", "\r\n")
                yield "data: [DONE]\r\n\r\n"
                return
            for i in range(n):
                if prompt == "DRIP":  # tokens paced like an engine's, so that requests overlap
                    await asyncio.sleep(0.02)
                if prompt == "CRASH" and i == 2:
                    return  # the engine dies mid-stream: no [DONE]
                # BIG: 4 KB a token, more than the socket buffers between a client that stops reading and us hold
                yield _chunk(i, " tok" * (1000 if prompt == "BIG" else 1), body.get("model"))
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        n = body.get("max_completion_tokens") or body.get("max_tokens") or 4
        if not isinstance(n, int) or n > 4096:
            return JSONResponse({"error": {"message": f"max_tokens {n!r} is too large", "type": "BadRequestError",
                                           "param": "max_tokens", "code": 400}}, status_code=400)
        usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
        if not body.get("stream"):
            return {"id": "x", "object": "chat.completion", "model": body.get("model"), "usage": usage,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * n},
                                 "finish_reason": "length"}]}

        async def events():
            for i in range(n):
                delta = {"id": "x", "object": "chat.completion.chunk", "model": body.get("model"),
                         "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]}
                yield "data: " + json.dumps(delta) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@contextlib.contextmanager
def running_fake_engine() -> Iterator[str]:
    """Serves the fake engine on a free loopback port; yields its base URL."""
    with running_app(make_fake_engine()) as url:
        yield url


@contextlib.contextmanager
def fake_engine_process() -> Iterator[tuple[str, subprocess.Popen]]:
    """The fake engine in a process of its own (one that can be frozen or killed): its URL and process."""
    port = free_port()
    code = ("import uvicorn; from tests.fake_backend import make_fake_engine; "
            f"uvicorn.run(make_fake_engine(), host='127.0.0.1', port={port}, log_level='error')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _answers(url):
            if time.monotonic() > deadline:
                raise RuntimeError("the fake engine process did not start")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.kill()
        proc.wait()


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def running_app(app: FastAPI, **config: Any) -> Iterator[str]:
    """Serves ``app`` with uvicorn (``config``: more of ``uvicorn.Config``'s arguments) on a free loopback port
    in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
