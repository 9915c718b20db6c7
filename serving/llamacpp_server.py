"""qserve's thin OpenAI server over llama.cpp: ``llama-server`` generates, the llama.cpp library scores.

llama.cpp's own server refuses ``echo`` (no prompt log-probabilities), and llama-cpp-python's server
returns wrong ones. This process starts ``llama-server`` (continuous batching, streaming, chat
templates, ``/metrics``) on a private port and relays every request to it, except completions that
ask for the prompt's log-probabilities (``echo`` with ``logprobs``): those are computed here from the
engine's own logits, through the llama.cpp library on the same (memory-mapped) GGUF file, so they
equal what the engine computes. Run as ``python -m serving.llamacpp_server --model FILE --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from aiohttp import ClientSession, ClientTimeout, web

from serving.engine import free_port

RELAYED_HEADERS = ("Content-Type", "Cache-Control")


def llama_server_binary() -> Path:
    """The ``llama-server`` that scripts/setup.sh built beside the llama.cpp library that llama-cpp-python loads."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llama.cpp is not installed; run scripts/setup.sh (it builds llama.cpp)")
    binary = Path(spec.origin).parent / "lib" / "llama-server"
    if not binary.is_file():
        raise FileNotFoundError(f"{binary} is missing; run scripts/setup.sh (it builds llama-server)")
    return binary


class Scorer:
    """Prompt log-probabilities from the llama.cpp library's logits, one request at a time."""

    def __init__(self, model: Path, n_ctx: int, threads: int) -> None:
        self.model, self.n_ctx, self.threads = model, n_ctx, threads
        self._llama = None
        self._lock = threading.Lock()

    def _load(self):
        if self._llama is None:
            from llama_cpp import Llama

            self._llama = Llama(model_path=str(self.model), n_ctx=self.n_ctx, n_threads=self.threads,
                                n_batch=min(self.n_ctx, 512), logits_all=True, verbose=False)
        return self._llama

    def tokenize(self, text: str) -> list[int]:
        with self._lock:
            return self._load().tokenize(text.encode(), add_bos=True, special=True)

    def pieces(self, tokens: set[int]) -> dict[int, str]:
        """Each token's text, as the engine's vocabulary spells it."""
        with self._lock:
            llama = self._load()
            return {t: llama.detokenize([t]).decode(errors="replace") for t in tokens}

    def score(self, ids: list[int], top_n: int, generate: int) -> tuple[list[int], list[Optional[float]], list]:
        """(ids with up to ``generate`` greedy tokens appended, log-probability of each token given the ones
        before it (None for the first), the ``top_n`` most likely ``(token, logprob)`` at each position)."""
        if len(ids) + generate > self.n_ctx:
            raise ValueError(f"the prompt has {len(ids)} tokens and {generate} more were asked for, beyond the "
                             f"engine's context of {self.n_ctx}; send a shorter prompt or start it with a larger --ctx")
        with self._lock:
            llama = self._load()
            llama.reset()
            llama.eval(ids)
            ids = list(ids)
            for _ in range(generate):
                next_id = int(np.argmax(llama.scores[len(ids) - 1]))
                ids.append(next_id)
                llama.eval([next_id])
            logits = np.asarray(llama.scores[: len(ids) - 1], dtype=np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        chosen = [None] + [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        tops: list = [None]
        for row in logprobs:
            best = np.argpartition(-row, top_n - 1)[:top_n] if top_n else []
            tops.append([(int(t), float(row[t])) for t in sorted(best, key=lambda t: -row[t])])
        return ids, chosen, tops


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class Relay:
    """The HTTP face of the engine: relays to llama-server, scores echo requests itself."""

    def __init__(self, upstream: str, served_name: str, scorer: Scorer) -> None:
        self.upstream, self.served_name, self.scorer = upstream, served_name, scorer
        self.session: Optional[ClientSession] = None

    async def start(self, app: web.Application) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10))

    async def close(self, app: web.Application) -> None:
        if self.session:
            await self.session.close()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served_name, "object": "model", "created": int(time.time()), "owned_by": "qserve",
             "max_model_len": self.scorer.n_ctx}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        if body.get("echo") and body.get("logprobs") is not None:
            return await self._score(body)
        return await self.relay(request)

    async def _score(self, body: dict[str, Any]) -> web.Response:
        if body.get("stream"):
            return _error(400, "echo with logprobs is answered whole here; send stream: false")
        generate = int(body.get("max_tokens") if body.get("max_tokens") is not None else 16)
        if generate and float(body.get("temperature", 1.0) or 0.0) > 0:
            return _error(400, "echo with logprobs generates greedily on this engine; send temperature: 0 or "
                               "max_tokens: 0")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        loop = asyncio.get_running_loop()
        try:
            ids = prompt if isinstance(prompt, list) else await loop.run_in_executor(None, self.scorer.tokenize, str(prompt))
            if not ids or not all(isinstance(i, int) for i in ids):
                return _error(400, "prompt must be a string or a list of token ids")
            ids, chosen, tops = await loop.run_in_executor(None, self.scorer.score, ids, int(body["logprobs"]), generate)
        except ValueError as exc:
            return _error(400, str(exc))
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        wanted = set(ids) if as_ids else set(ids) | {i for top in tops if top for i, _ in top}
        text_of = await loop.run_in_executor(None, self.scorer.pieces, wanted)
        name = (lambda t: f"token_id:{t}") if as_ids else text_of.__getitem__
        tokens = [name(t) for t in ids]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        logprobs = {"tokens": tokens, "token_logprobs": chosen, "text_offset": offsets,
                    "top_logprobs": [None if t is None else {name(i): lp for i, lp in t} for t in tops]}
        text = "".join(text_of[t] for t in ids)
        n_prompt = len(ids) - generate
        return web.json_response({
            "id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
            "model": self.served_name,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": generate, "total_tokens": len(ids)}})

    async def relay(self, request: web.Request) -> web.StreamResponse:
        """Passes the request to llama-server and its answer back, streamed as it comes."""
        data = await request.read()  # the bytes as sent (aiohttp keeps them after request.json())
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with self.session.request(request.method, f"{self.upstream}{request.path_qs}", data=data or None,
                                        headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: upstream.headers[k] for k in RELAYED_HEADERS if k in upstream.headers})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        return await self.relay(request)

    async def health(self, request: web.Request) -> web.Response:
        try:
            async with self.session.get(f"{self.upstream}/health") as upstream:
                return web.json_response({"status": "ok" if upstream.status == 200 else "loading"},
                                         status=200 if upstream.status == 200 else 503)
        except OSError:
            return web.json_response({"status": "starting"}, status=503)


def build_app(upstream: str, served_name: str, scorer: Scorer) -> web.Application:
    relay = Relay(upstream, served_name, scorer)
    app = web.Application(client_max_size=64 * 2**20)
    app.on_startup.append(relay.start)
    app.on_cleanup.append(relay.close)
    app.router.add_get("/health", relay.health)
    app.router.add_get("/v1/models", relay.models)
    app.router.add_post("/v1/completions", relay.completions)
    app.router.add_post("/v1/chat/completions", relay.chat)
    app.router.add_route("*", "/{tail:.*}", relay.relay)
    return app


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ctx", type=int, default=4096, help="context length, per sequence")
    parser.add_argument("--parallel", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args, engine_args = parser.parse_known_args(argv)
    port = free_port()
    # llama-server's context is shared by its parallel slots: give each slot the whole --ctx
    cmd = [str(llama_server_binary()), "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port),
           "-c", str(args.ctx * args.parallel), "-np", str(args.parallel), "-t", str(args.threads), "--metrics",
           "--no-webui", "-a", args.served_model_name, *engine_args]
    print(f"qserve llama.cpp server: {' '.join(cmd)}", flush=True)
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0 if child.poll() is None else 1))

    def exit_with_engine() -> None:  # llama-server gone: this process goes too, so the gateway restarts both
        child.wait()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=exit_with_engine, daemon=True).start()
    try:
        scorer = Scorer(args.model, args.ctx, args.threads)
        web.run_app(build_app(f"http://127.0.0.1:{port}", args.served_model_name, scorer), host=args.host,
                    port=args.port, print=None, access_log=None, handle_signals=False)
    finally:
        child.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)
        if child.poll() is None:
            child.kill()


if __name__ == "__main__":
    main()
