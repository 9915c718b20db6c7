"""The reliability campaign's load and abuse parts.

- ``load``: ``--streams`` clients streaming back to back for ``--duration`` seconds (the fake engine's paced
  tokens, or a real server with ``--engine-url``). Held: every request ended with a status; the gateway's RSS
  within 5 % of its reading after warm-up (the first sixth), its open file descriptors flat; the gateway's
  ``/metrics`` request total equal to the client's count.
- ``abuse``: a key sending 10x its ``rpm`` (429 with ``Retry-After``; the engine sees no more than the
  allowance); slowloris clients (headers a byte at a time), trickled bodies and clients that stop reading their
  streams (all cut off within ``limits.client_timeout_s``, every slot back); many idle keep-alive connections
  (closed; the file descriptors come back).
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from reliability_common import AUTH, gateway, metric_total, open_fds, rss_mib

Log = Callable[[str], None]


async def _clients(url: str, model: str, streams: int, duration_s: float, prompt: str, max_tokens: int,
                   on_sample: Callable[[], None]) -> dict[int, int]:
    """``streams`` clients streaming back to back until ``duration_s`` has passed: statuses counted."""
    import aiohttp

    statuses: dict[int, int] = {}
    end = time.monotonic() + duration_s
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            try:
                async with session.post(f"{url}/v1/completions", json=body) as resp:
                    async for _ in resp.content:
                        pass
                    status = resp.status
            except aiohttp.ClientError:
                status = 0  # no status: what must never happen
            statuses[status] = statuses.get(status, 0) + 1

    async def sampler() -> None:
        while time.monotonic() < end:
            await asyncio.to_thread(on_sample)
            await asyncio.sleep(10)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=AUTH, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(sampler(), *(client(session) for _ in range(streams)))
    return statuses


def part_load(engine_url: str, model: str, streams: int, duration_s: float, log: Log,
              prompt: str = "DRIP", max_tokens: int = 64) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp, gateway(engine_url, model, Path(tmp),
                                                       limits={"max_in_flight": streams}) as gw:
        samples: list[tuple[float, float, int]] = []
        start = time.monotonic()

        def sample() -> None:
            samples.append((time.monotonic() - start, rss_mib(gw), open_fds(gw)))
            log(f"load: {samples[-1][0]:.0f} s, gateway RSS {samples[-1][1]:.0f} MiB, {samples[-1][2]} fds")

        statuses = asyncio.run(_clients(gw.url, model, streams, duration_s, prompt, max_tokens, sample))
        time.sleep(1)
        counted = metric_total(gw.url, "qserve_requests_total", 'endpoint="/v1/completions"')
        in_flight = metric_total(gw.url, "qserve_requests_in_flight")
        sample()
    warm = next(s for s in samples if s[0] >= duration_s / 6)
    growth = samples[-1][1] / warm[1] - 1
    sent = sum(statuses.values())
    fds = [s[2] for s in samples if s[0] >= warm[0]]
    held = (0 not in statuses and growth < 0.05 and counted == sent and in_flight == 0)
    return [{"part": "load", "tried": f"{streams} streams back to back for {duration_s / 60:.0f} min "
                                      f"({max_tokens} tokens each, prompt {prompt!r})", "times": sent,
             "held": f"statuses {dict(sorted(statuses.items()))}; /metrics counted {counted:.0f} of {sent}; "
                     f"in flight after {in_flight:.0f}; RSS {warm[1]:.0f} -> {samples[-1][1]:.0f} MiB after warm-up "
                     f"({growth:+.1%}); fds {min(fds)}..{max(fds)}",
             "lost": "nothing" if held else "see held"}]


def _raw(url: str, data: bytes, rcvbuf: int = 0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    sock.sendall(data)
    return sock


def _closed_within(socks: list[socket.socket], seconds: float) -> int:
    """How many of ``socks`` the server has closed once ``seconds`` have passed (nothing is read before: a
    client that reads is no longer a client that does not)."""
    time.sleep(max(0.0, seconds))
    closed = 0
    for sock in socks:
        sock.settimeout(0.5)
        end = time.monotonic() + 1.0
        try:
            while time.monotonic() < end:
                if not sock.recv(65536):
                    closed += 1
                    break
        except ConnectionResetError:
            closed += 1  # aborted: the gateway's way with a client that stopped reading
        except socket.timeout:
            pass
        finally:
            sock.close()
    return closed


def _rate_limited(engine_url: str, model: str, rpm: int, log: Log) -> dict[str, Any]:
    """A key with ``rpm`` requests a minute sending ten times as many at once."""
    with tempfile.TemporaryDirectory() as tmp, gateway(engine_url, model, Path(tmp), rpm=rpm) as gw:
        engine_before = httpx.get(f"{engine_url}/debug/open_streams").json()["completions"]
        statuses, retry_after = [], set()
        with httpx.Client(headers=AUTH, timeout=30) as client:
            for _ in range(rpm * 10):
                resp = client.post(f"{gw.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
                statuses.append(resp.status_code)
                if resp.status_code == 429:
                    retry_after.add(resp.headers.get("Retry-After"))
        seen = httpx.get(f"{engine_url}/debug/open_streams").json()["completions"] - engine_before
        log(f"rate: {statuses.count(200)} ok, {statuses.count(429)} refused, engine saw {seen}")
    return {"part": "abuse", "tried": f"a key with rpm {rpm} sending {rpm * 10} requests at once",
            "times": len(statuses), "held": f"200: {statuses.count(200)}, 429: {statuses.count(429)} "
            f"(Retry-After {sorted(retry_after, key=str)}); the engine saw {seen}",
            "lost": "nothing" if seen <= rpm and statuses.count(200) == rpm and None not in retry_after
            else "over the allowance"}


def part_abuse(engine_url: str, model: str, log: Log, rpm: int = 30, client_timeout_s: float = 10,
               slow_clients: int = 200, idle: int = 500) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, gateway(engine_url, model, Path(tmp),
                                                       limits={"client_timeout_s": client_timeout_s}) as gw:
        fds_before = open_fds(gw)
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
        body = json.dumps({"model": model, "prompt": "BIG", "max_tokens": 4000, "stream": True}).encode()
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
                   b"Bearer " + AUTH["Authorization"][7:].encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
        kinds = {"slowloris headers": [_raw(gw.url, head + b"X-a: 1\r\n") for _ in range(slow_clients)],
                 "trickled bodies": [_raw(gw.url, request + body[:10]) for _ in range(slow_clients)],
                 "streams never read": [_raw(gw.url, request + body, rcvbuf=4096) for _ in range(16)]}
        time.sleep(1)
        streams_held = httpx.get(f"{engine_url}/debug/open_streams").json()["open"]
        served_meanwhile = httpx.post(f"{gw.url}/v1/completions", headers=AUTH, timeout=30, json={
            "model": model, "prompt": "hi", "max_tokens": 2}).status_code
        for kind, socks in kinds.items():
            closed = _closed_within(socks, client_timeout_s + 5 if kind == "slowloris headers" else 0)
            log(f"{kind}: {closed}/{len(socks)} closed by the gateway within {client_timeout_s + 5:.0f} s")
            rows.append({"part": "abuse", "tried": f"{kind} (client timeout {client_timeout_s:.0f} s)",
                         "times": len(socks), "held": f"closed by the gateway: {closed}/{len(socks)}; a request "
                         f"meanwhile: {served_meanwhile}", "lost": "nothing" if closed == len(socks) else "held open"})
        time.sleep(1)
        open_streams = httpx.get(f"{engine_url}/debug/open_streams").json()["open"]
        in_flight = metric_total(gw.url, "qserve_requests_in_flight")
        rows[-1]["held"] += (f"; engine streams open before the timeout: {streams_held}, after: {open_streams}; "
                             f"gateway in flight after: {in_flight:.0f}")
        idle_socks = [_raw(gw.url, b"") for _ in range(idle)]
        peak = open_fds(gw)
        closed = _closed_within(idle_socks, client_timeout_s + 5)
        time.sleep(1)
        after = open_fds(gw)
        log(f"idle: {closed}/{idle} closed; gateway fds {fds_before} -> {peak} -> {after}")
        rows.append({"part": "abuse", "tried": "idle connections (nothing sent)", "times": idle,
                     "held": f"closed by the gateway: {closed}/{idle}; fds {fds_before} -> {peak} -> {after}",
                     "lost": "nothing" if closed == idle and after <= fds_before + 5 else "fds kept"})
    return [_rate_limited(engine_url, model, rpm, log), *rows]
