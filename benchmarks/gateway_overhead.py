"""The gateway's own cost: the same streaming load against an engine directly and through the gateway, at
1, 64 and 256 concurrent streams, plus the gateway's CPU per request and per chunk and its memory over many
requests; optionally the same pairing against real vLLM (``--vllm CHECKPOINT``).

    .venv/bin/python benchmarks/gateway_overhead.py [--streams 1,64,256] [--memory-requests 100000]
        [--vllm build/demo/smollm2-135m-instruct --vllm-streams 1,4,16]

The fake engine paces its tokens like an engine (``--ttft-ms`` 50 to the first token, then ``--itl-ms`` 20
per token), so the gateway's cost shows as added latency and lost tokens per second, not as CPU taken from
an engine that does no work. Engine, gateway and load tester each run in their own process (uvloop).
Two workloads: ``varied`` (output lengths uniform 16-48 tokens, so the closed-loop streams drift apart as
they do against a real engine) and ``lockstep`` (every request 32 tokens: against a perfectly regular fake
engine all streams finish together and re-arrive as one burst each round, so the gateway's per-request
cost queues up inside the burst). Targets (issue 7, 2-core machine): < 2 ms added median TTFT at 64
streams; < 3 % lost token throughput at 64 and < 10 % at 256; flat memory over 100,000 requests.
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


def _serve_gateway(port: int, engine_url: str, model: str) -> None:
    import uvicorn

    from serving.app import GatewaySettings, build_app
    from serving.backends import Backend

    app = build_app(GatewaySettings(backends=[Backend.external(model, engine_url)], log=lambda m: None))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", loop="uvloop", http="httptools",
                backlog=2048)


def _proc_stats(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) and RSS MiB of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return cpu, rss


def _load(url: str, model: str, streams: int, requests: int, output_len: str, input_len: int = 16) -> dict:
    from loadtest.profiles import Concurrency
    from loadtest.runner import LoadSettings, run_loadtest
    from loadtest.workloads import LengthDist

    warmup = min(streams, 64)
    settings = LoadSettings(profiles=(Concurrency(streams),), input_len=LengthDist("fixed", input_len),
                            output_len=LengthDist.parse(output_len), num_requests=requests, prefill_requests=0,
                            warmup_requests=warmup, cache_salt="auto")
    run = run_loadtest(url, model, settings, log=lambda m: None, progress=False)["runs"][0]
    return {"ttft_p50_ms": run["ttft_s"]["p50"] * 1000, "ttft_p99_ms": run["ttft_s"]["p99"] * 1000,
            "e2e_p50_ms": run["e2e_s"]["p50"] * 1000, "output_tok_s": run["output_tok_s"],
            "errors": run["errors"]["count"], "served": run["requests"]["issued"] + warmup}


def _pair(direct_url: str, gateway_url: str, gateway_pid: int, model: str, streams: int, requests: int,
          output_len: str, input_len: int = 16) -> dict:
    """The same load directly, then through the gateway; the gateway's CPU and RSS over its run."""
    direct = _load(direct_url, model, streams, requests, output_len, input_len)
    cpu0, _ = _proc_stats(gateway_pid)
    through = _load(gateway_url, model, streams, requests, output_len, input_len)
    cpu1, rss = _proc_stats(gateway_pid)
    return {"streams": streams, "requests": requests, "output_len": output_len, "direct": direct, "gateway": through,
            "added_ttft_p50_ms": through["ttft_p50_ms"] - direct["ttft_p50_ms"],
            "lost_throughput_pct": 100 * (1 - through["output_tok_s"] / direct["output_tok_s"]),
            "gateway_cpu_ms_per_request": 1000 * (cpu1 - cpu0) / through["served"], "gateway_rss_mib": rss}


def _print_pair(label: str, r: dict) -> None:
    d, g = r["direct"], r["gateway"]
    print(f"{label:>9} {r['streams']:>4} streams, {r['requests']} requests: TTFT p50 {d['ttft_p50_ms']:.1f} -> "
          f"{g['ttft_p50_ms']:.1f} ms ({r['added_ttft_p50_ms']:+.2f}), output {d['output_tok_s']:,.0f} -> "
          f"{g['output_tok_s']:,.0f} tok/s ({r['lost_throughput_pct']:+.1f} % lost), gateway CPU "
          f"{r['gateway_cpu_ms_per_request']:.2f} ms/request, errors {d['errors']}/{g['errors']}", flush=True)


def _start(target, *args) -> multiprocessing.Process:
    process = multiprocessing.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _fake_engine_pairs(args: argparse.Namespace) -> list[dict]:
    engine_port, gateway_port = free_port(), free_port()
    engine = _start(_serve_engine, engine_port, args.ttft_ms / 1000, args.itl_ms / 1000)
    direct_url, gateway_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gateway_port}"
    gateway = _start(_serve_gateway, gateway_port, direct_url, "paced")
    time.sleep(4.0)
    rows = []
    try:
        for label, output_len in (("varied", "uniform:16:48"), ("lockstep", "32")):
            for streams in (int(s) for s in args.streams.split(",")):
                rows.append({"workload": label, **_pair(direct_url, gateway_url, gateway.pid, "paced", streams,
                                                        max(streams * args.rounds, 50), output_len)})
                _print_pair(label, rows[-1])
        rows.append(_cpu_split(gateway_url, gateway.pid))
        if args.memory_requests:
            rows.append(_memory(gateway_url, gateway.pid, args.memory_requests))
    finally:
        gateway.terminate()
        engine.terminate()
    print(f"machine: {os.cpu_count()} cores; fake engine {args.ttft_ms:g} ms TTFT + {args.itl_ms:g} ms/token")
    return rows


def _cpu_split(gateway_url: str, gateway_pid: int, streams: int = 64, requests: int = 1024) -> dict:
    """The gateway's CPU per request (1-token streams) and per further streamed chunk (32-token streams)."""
    per_request = {}
    for tokens in (1, 32):
        cpu0, _ = _proc_stats(gateway_pid)
        served = _load(gateway_url, "paced", streams, requests, str(tokens))["served"]
        per_request[tokens] = (_proc_stats(gateway_pid)[0] - cpu0) / served
    per_chunk_us = 1e6 * (per_request[32] - per_request[1]) / 31
    print(f"gateway CPU at {streams} streams: {1000 * per_request[1]:.2f} ms per request (1-token stream), "
          f"{per_chunk_us:.0f} us per further streamed chunk", flush=True)
    return {"cpu_ms_per_request": 1000 * per_request[1], "cpu_us_per_chunk": per_chunk_us, "streams": streams}


def _memory(gateway_url: str, gateway_pid: int, total: int) -> dict:
    rss, done = [_proc_stats(gateway_pid)[1]], 0
    while done < total:
        batch = min(10000, total - done)
        _load(gateway_url, "paced", 256, batch, "1")
        done += batch
        rss.append(_proc_stats(gateway_pid)[1])
        print(f"after {done:,} more requests: gateway RSS {rss[-1]:.1f} MiB", flush=True)
    return {"memory_requests": total, "rss_mib": rss}


def _vllm_pairs(args: argparse.Namespace) -> list[dict]:
    """The same pairing against a real vLLM engine (started here) on the given checkpoint."""
    import asyncio

    from serving.engine import EngineConfig, VLLMEngine

    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"qserve-bench-vllm-{os.getpid()}.log"
    engine = VLLMEngine(EngineConfig(model_dir=args.vllm, served_name="bench", port=free_port(), log_path=log_path))
    engine.start()
    gateway = None
    try:
        print(f"vLLM ready in {asyncio.run(engine.wait_ready()):.0f} s", flush=True)
        gateway_port = free_port()
        gateway = _start(_serve_gateway, gateway_port, engine.url, "bench")
        time.sleep(4.0)
        rows = []
        for streams in (int(s) for s in args.vllm_streams.split(",")):
            rows.append({"workload": "vllm", **_pair(engine.url, f"http://127.0.0.1:{gateway_port}", gateway.pid,
                                                     "bench", streams, max(streams * 4, 16), "32", input_len=128)})
            _print_pair("vLLM", rows[-1])
        return rows
    finally:
        if gateway is not None:
            gateway.terminate()
        engine.stop()
        log_path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--rounds", type=int, default=6, help="requests per stream at each concurrency")
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--itl-ms", type=float, default=20.0)
    parser.add_argument("--memory-requests", type=int, default=0, help="then this many requests for RSS growth")
    parser.add_argument("--vllm", type=Path, help="also pair against real vLLM serving this checkpoint")
    parser.add_argument("--vllm-streams", default="1,4,16")
    parser.add_argument("--skip-fake", action="store_true", help="only the real-vLLM pairing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [] if args.skip_fake else _fake_engine_pairs(args)
    if args.vllm:
        rows += _vllm_pairs(args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
