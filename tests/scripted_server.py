"""An in-process OpenAI-compatible server with scripted timings, to check the load tester's figures."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass
class Script:
    """First token after ``ttft_s``, then one token every ``itl_s``; every ``fail_every``-th request is a
    500 (0: none); ``usage`` off makes the client fall back to counting; ``tokens_per_chunk`` > 1 packs
    several tokens in one chunk."""

    ttft_s: float = 0.1
    itl_s: float = 0.025
    fail_every: int = 0
    usage: bool = True
    tokens_per_chunk: int = 1
    seen: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    requests: list = field(default_factory=list)


def _prompt_len(body: dict) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return len(prompt)
    if prompt is None:
        return sum(len(m["content"].split()) for m in body.get("messages", []))
    return len(str(prompt).split())


def make_scripted_server(script: Script) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            "# HELP vllm:prompt_tokens_total p\n# TYPE vllm:prompt_tokens_total counter\n"
            f'vllm:prompt_tokens_total{{model_name="scripted"}} {script.prompt_tokens}.0\n'
            "# HELP vllm:generation_tokens_total g\n# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{model_name="scripted"}} {script.output_tokens}.0\n')

    async def respond(request: Request, chat: bool):
        body = await request.json()
        script.seen += 1
        script.requests.append(body)
        if script.fail_every and script.seen % script.fail_every == 0:
            return JSONResponse({"error": {"message": "scripted failure", "type": "server_error", "param": None,
                                           "code": 500}}, status_code=500)
        n, p = int(body.get("max_tokens") or 16), _prompt_len(body)
        script.prompt_tokens += p
        script.output_tokens += n
        usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

        def chunk(k: int) -> str:
            text = " tok" * k
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            return "data: " + json.dumps({"id": "s", "choices": [choice]}) + "\n\n"

        if not body.get("stream"):
            await asyncio.sleep(script.ttft_s + script.itl_s * (n - 1))
            choice = {"index": 0, "message": {"content": " tok" * n}} if chat else {"index": 0, "text": " tok" * n}
            return {"id": "s", "choices": [choice], **({"usage": usage} if script.usage else {})}

        async def events():
            await asyncio.sleep(script.ttft_s)
            yield chunk(1)
            left = n - 1
            while left > 0:
                k = min(script.tokens_per_chunk, left)
                await asyncio.sleep(script.itl_s * k)
                yield chunk(k)
                left -= k
            if script.usage and (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({"id": "s", "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await respond(request, chat=True)

    return app
