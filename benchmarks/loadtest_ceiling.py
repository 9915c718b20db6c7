"""The load tester's own ceiling: how many requests and streamed chunks per second it can time, and its
CPU cost per request and per chunk, against a trivial local server that answers at once.

    .venv/bin/python benchmarks/loadtest_ceiling.py [--requests 20000] [--concurrency 64] [--json OUT]

The server is a bare asyncio HTTP/1.1 responder (no framework) in its own process, so on a 2-core
machine the tester has one core to itself. Non-streaming: one JSON answer with usage per request.
Streaming: ``--tokens`` SSE chunks per request, written in one go, so the client's parsing is the limit.
Targets (issue 4): >= 2,000 non-streaming requests/s and >= 20,000 streamed chunks/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_MODELS = b'{"object":"list","data":[{"id":"trivial","object":"model"}]}'


def _answer(body: bytes) -> bytes:
    request = json.loads(body or b"{}")
    n = int(request.get("max_tokens") or 1)
    usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
    if not request.get("stream"):
        payload = json.dumps({"id": "t", "choices": [{"index": 0, "text": " x" * n}], "usage": usage}).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    events = [b'data: {"id":"t","choices":[{"index":0,"text":" x"}]}\n\n'] * n
    events.append(b"data: " + json.dumps({"id": "t", "choices": [], "usage": usage}).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks + b"0\r\n\r\n")


class _Trivial(asyncio.Protocol):
    """Keep-alive HTTP/1.1: GET /v1/models, POST completions; anything else is a 404."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
            if len(self.buffer) < head_end + 4 + length:
                return
            body, self.buffer = self.buffer[head_end + 4:head_end + 4 + length], self.buffer[head_end + 4 + length:]
            if head.startswith(b"get /v1/models"):
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                     % (len(_MODELS), _MODELS))
            elif head.startswith(b"post /v1/completions"):
                self.transport.write(_answer(body))
            else:
                self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


def _serve(port: int) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_Trivial, "127.0.0.1", port, backlog=1024))
    loop.run_until_complete(server.serve_forever())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(url: str, stream: bool, requests: int, concurrency: int, tokens: int) -> dict:
    from loadtest.profiles import Concurrency
    from loadtest.runner import LoadSettings, run_loadtest
    from loadtest.workloads import LengthDist

    settings = LoadSettings(profiles=(Concurrency(concurrency),), input_len=LengthDist("fixed", 8),
                            output_len=LengthDist("fixed", tokens if stream else 1), num_requests=requests,
                            prefill_requests=0, warmup=0.0, cooldown=0.0, stream=stream)
    cpu, wall = time.process_time(), time.perf_counter()
    report = run_loadtest(url, "trivial", settings, log=lambda m: None, progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    run = report["runs"][0]
    chunks = run["requests"]["ok"] * (tokens if stream else 1)
    return {"stream": stream, "requests": requests, "concurrency": concurrency, "errors": run["errors"]["count"],
            "wall_s": run["wall_s"], "requests_per_s": run["requests"]["ok"] / run["wall_s"],
            "chunks_per_s": chunks / run["wall_s"], "client_cpu_s": cpu,
            "client_cpu_us_per_request": cpu / requests * 1e6, "client_cpu_us_per_chunk": cpu / max(chunks, 1) * 1e6,
            "total_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="non-streaming requests")
    parser.add_argument("--stream-requests", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=64, help="streamed chunks per request")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    port = _free_port()
    server = multiprocessing.Process(target=_serve, args=(port,), daemon=True)
    server.start()
    time.sleep(1.0)
    url = f"http://127.0.0.1:{port}"
    try:
        measure(url, False, 500, args.concurrency, 1)  # warm the tester's imports and connections
        rows = [measure(url, False, args.requests, args.concurrency, 1),
                measure(url, True, args.stream_requests, args.concurrency, args.tokens)]
    finally:
        server.terminate()
    print(f"machine: {platform.machine()}, {multiprocessing.cpu_count()} cores, Python {platform.python_version()}")
    for row in rows:
        kind = f"streaming ({args.tokens} chunks each)" if row["stream"] else "non-streaming"
        print(f"{kind:28s} {row['requests']:>6} requests at {row['concurrency']} concurrent: "
              f"{row['requests_per_s']:,.0f} req/s, {row['chunks_per_s']:,.0f} chunks/s, errors {row['errors']}, "
              f"tester CPU {row['client_cpu_us_per_request']:,.0f} us/request, {row['client_cpu_us_per_chunk']:.1f} us/chunk")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
