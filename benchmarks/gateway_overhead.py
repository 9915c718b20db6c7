"""The gateway's own cost: the same streaming load against a paced fake engine directly and through the
gateway, at 1, 64 and 256 concurrent streams, plus the gateway's CPU per request and per chunk and its
memory over many requests.

    .venv/bin/python benchmarks/gateway_overhead.py [--streams 1,64,256] [--tokens 32] [--memory-requests 100000]

The fake engine paces its tokens like an engine (``--ttft-ms`` 50 to the first token, then ``--itl-ms`` 20
per token), so the gateway's cost shows as added latency and lost tokens per second, not as CPU taken from
an engine that does no work. Engine, gateway and load tester each run in their own process (uvloop).
Targets (issue 7, 2-core machine): < 2 ms added median TTFT at 64 streams; < 3 % lost token throughput at
64 and < 10 % at 256; flat memory over 100,000 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving.server import free_port  # noqa: E402

_MODELS = b'{"object":"list","data":[{"id":"paced","object":"model"}]}'


class _Paced(asyncio.Protocol):
    """Keep-alive HTTP/1.1 engine stand-in: chunked SSE, first token after ttft, then one per itl."""

    ttft_s, itl_s = 0.05, 0.02

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.buffer, self.busy = transport, b"", False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end].lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self.buffer) < head_end + 4 + length:
            return
        body, self.buffer = self.buffer[head_end + 4:head_end + 4 + length], self.buffer[head_end + 4 + length:]
        if head.startswith(b"post "):
            self.busy = True
            asyncio.ensure_future(self._stream(json.loads(body)))
        else:
            payload = _MODELS if head.startswith(b"get /v1/models") else b"{}"
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(payload), payload))
            self._next()

    def _chunk(self, data: bytes) -> None:
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def _stream(self, request: dict) -> None:
        n = int(request.get("max_tokens") or 16)
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(self.ttft_s)
        for i in range(n):
            if i:
                await asyncio.sleep(self.itl_s)
            if self.transport.is_closing():
                return
            self._chunk(b'data: {"id":"p","object":"text_completion","choices":[{"index":0,"text":" x"}]}\n\n')
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        self._chunk(b"data: " + json.dumps({"id": "p", "choices": [], "usage": usage}).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self.transport.write(b"0\r\n\r\n")
        self.busy = False
        self._next()


def _serve_engine(port: int, ttft_s: float, itl_s: float) -> None:
    import uvloop

    _Paced.ttft_s, _Paced.itl_s = ttft_s, itl_s
    loop = uvloop.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_Paced, "127.0.0.1", port, backlog=2048))
    loop.run_until_complete(server.serve_forever())


def _serve_gateway(port: int, engine_url: str) -> None:
    import uvicorn

    from serving.app import GatewaySettings, build_app
    from serving.backends import Backend

    app = build_app(GatewaySettings(backends=[Backend.external("paced", engine_url)], log=lambda m: None))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", loop="uvloop", http="httptools",
                backlog=2048)


def _proc_stats(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and RSS MiB of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return cpu, rss


def _load(url: str, streams: int, requests: int, tokens: int) -> dict:
    from loadtest.profiles import Concurrency
    from loadtest.runner import LoadSettings, run_loadtest
    from loadtest.workloads import LengthDist

    settings = LoadSettings(profiles=(Concurrency(streams),), input_len=LengthDist("fixed", 16),
                            output_len=LengthDist("fixed", tokens), num_requests=requests, prefill_requests=0,
                            warmup_requests=min(streams, 64), cache_salt=None)
    run = run_loadtest(url, "paced", settings, log=lambda m: None, progress=False)["runs"][0]
    return {"ttft_p50_ms": run["ttft_s"]["p50"] * 1000, "ttft_p99_ms": run["ttft_s"]["p99"] * 1000,
            "output_tok_s": run["output_tok_s"], "errors": run["errors"]["count"], "issued": run["requests"]["issued"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="requests per stream at each concurrency")
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    parser.add_argument("--memory-requests", type=int, default=0, help="then this many requests for RSS growth")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    engine_port, gateway_port = free_port(), free_port()
    engine = multiprocessing.Process(target=_serve_engine, args=(engine_port, args.ttft_ms / 1000, args.itl_ms / 1000),
                                     daemon=True)
    engine.start()
    gateway = multiprocessing.Process(target=_serve_gateway, args=(gateway_port, f"http://127.0.0.1:{engine_port}"),
                                      daemon=True)
    gateway.start()
    time.sleep(4.0)
    direct_url, gateway_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
    rows = []
    try:
        for streams in (int(s) for s in args.streams.split(",")):
            n = max(streams * args.rounds, 50)
            direct = _load(direct_url, streams, n, args.tokens)
            cpu0, rss0 = _proc_stats(gateway.pid)
            through = _load(gateway_url, streams, n, args.tokens)
            cpu1, rss1 = _proc_stats(gateway.pid)
            served = through["issued"] + min(streams, 64)  # the warm-up requests went through it too
            rows.append({"streams": streams, "requests": n, "direct": direct, "gateway": through,
                         "added_ttft_p50_ms": through["ttft_p50_ms"] - direct["ttft_p50_ms"],
                         "lost_throughput_pct": 100 * (1 - through["output_tok_s"] / direct["output_tok_s"]),
                         "gateway_cpu_ms_per_request": 1000 * (cpu1 - cpu0) / served,
                         "gateway_cpu_us_per_chunk": 1e6 * (cpu1 - cpu0) / (served * (args.tokens + 2)),
                         "gateway_rss_mib": rss1})
            r = rows[-1]
            print(f"{streams:>4} streams, {n} requests: TTFT p50 {direct['ttft_p50_ms']:.1f} -> {through['ttft_p50_ms']:.1f} ms "
                  f"(+{r['added_ttft_p50_ms']:.2f}), output {direct['output_tok_s']:,.0f} -> {through['output_tok_s']:,.0f} "
                  f"tok/s ({r['lost_throughput_pct']:+.1f} % lost), gateway CPU {r['gateway_cpu_ms_per_request']:.2f} ms/request "
                  f"{r['gateway_cpu_us_per_chunk']:.0f} us/chunk, errors {direct['errors']}/{through['errors']}", flush=True)
        if args.memory_requests:
            rss = [_proc_stats(gateway.pid)[1]]
            done = 0
            while done < args.memory_requests:
                batch = min(10000, args.memory_requests - done)
                _load(gateway_url, 256, batch, 1)
                done += batch
                rss.append(_proc_stats(gateway.pid)[1])
                print(f"after {done:,} more requests: gateway RSS {rss[-1]:.1f} MiB", flush=True)
            rows.append({"memory_requests": args.memory_requests, "rss_mib": rss})
    finally:
        gateway.terminate()
        engine.terminate()
    print(f"machine: {os.cpu_count()} cores; fake engine {args.ttft_ms:g} ms TTFT + {args.itl_ms:g} ms/token, "
          f"{args.tokens} tokens per request")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
