"""The gateway's keys, backpressure, disconnects and relay against the real vLLM-CPU engine.

A second, in-process gateway (keys, one slot) is put in front of the w8a8 session engine, so no
further engine has to start; its answers are compared with the engine's own.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from serving.admission import AdmissionLimits
from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from serving.keys import APIKey, KeyRing, key_hash
from tests.fake_backend import running_app

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def engine_url(gateway) -> str:
    """The URL of the vLLM engine a ``qserve serve`` process launched, from its log."""
    match = re.search(r"starting vLLM for '[^']+' on (http://\S+)", gateway.log_path.read_text())
    assert match, gateway.log_path.read_text()[-2000:]
    return match.group(1)


@pytest.fixture(scope="module")
def engine(w8a8_gateway) -> str:
    return engine_url(w8a8_gateway)


@pytest.fixture(scope="module")
def keyed_gateway(engine):
    keys = KeyRing([APIKey("ci", key_hash("k-ci")), APIKey("tight", key_hash("k-tight"), rpm=2)])
    settings = GatewaySettings(backends=[Backend.external("w8a8", engine)], keys=keys, log=lambda m: None,
                               admission=AdmissionLimits(max_in_flight=1, max_queue=0))
    with running_app(build_app(settings)) as url:
        yield url


def _post(url: str, key: str | None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    payload = {"model": "w8a8", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, **body}
    return httpx.post(f"{url}/v1/completions", json=payload, headers=headers, timeout=120)


def _streamed_text(url: str, key: str | None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    payload = {"model": "w8a8", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
               "stream": True}
    import json

    text = []
    with httpx.stream("POST", f"{url}/v1/completions", json=payload, headers=headers, timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                text.extend(c.get("text", "") for c in json.loads(line[6:]).get("choices", []))
    return "".join(text)


def test_greedy_answers_through_the_gateway_equal_the_engine(keyed_gateway, engine):
    direct = _post(engine, None).json()["choices"][0]["text"]
    assert direct and _post(keyed_gateway, "k-ci").json()["choices"][0]["text"] == direct
    assert _streamed_text(keyed_gateway, "k-ci") == _streamed_text(engine, None) == direct


def test_keys_and_rate_limits_on_the_real_engine(keyed_gateway):
    assert _post(keyed_gateway, None).status_code == 401
    assert _post(keyed_gateway, "wrong").status_code == 401
    statuses = [_post(keyed_gateway, "k-tight", max_tokens=1).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


async def _three_streams(url: str) -> list[int]:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(delay: float, tokens: int) -> int:
            await asyncio.sleep(delay)
            payload = {"model": "w8a8", "prompt": "Once upon a time", "max_tokens": tokens, "ignore_eos": True,
                       "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=payload,
                                     headers={"Authorization": "Bearer k-ci"}) as resp:
                await resp.aread()
                return resp.status_code

        # the first holds the one slot for ~200 tokens (several seconds here); the others arrive meanwhile
        return list(await asyncio.gather(one(0.0, 200), one(0.5, 1), one(1.0, 1)))


def test_a_full_engine_gets_429_not_a_longer_queue(keyed_gateway):
    assert sorted(asyncio.run(_three_streams(keyed_gateway))) == [200, 429, 429]


def _running(engine: str) -> float:
    text = httpx.get(f"{engine}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)$", text, re.M))


def test_a_client_that_disconnects_aborts_its_request_at_the_engine(keyed_gateway, engine):
    payload = {"model": "w8a8", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True,
               "stream": True}
    with httpx.stream("POST", f"{keyed_gateway}/v1/completions", json=payload, timeout=120,
                      headers={"Authorization": "Bearer k-ci"}) as resp:
        lines = resp.iter_lines()
        for _ in range(4):
            next(lines)
        assert _running(engine) == 1
    deadline = time.monotonic() + 20
    while _running(engine) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running(engine) == 0  # 2,000 tokens would take over a minute here: the engine aborted it
    assert _post(keyed_gateway, "k-ci", max_tokens=1).status_code == 200  # and the slot came back


@pytest.fixture(scope="module")
def supervised_gateway(w8a8_model, tmp_path_factory):
    """A gateway of its own, from a config with two replicas of one model (one of them gets killed)."""
    from serving.launcher import GatewayProcess
    from serving.server import free_port

    folder = tmp_path_factory.mktemp("replicas")
    config = folder / "gateway.yaml"
    config.write_text(f"models:\n  - name: victim\n    checkpoint: {w8a8_model}\n    replicas: 2\n"
                      f"    max_model_len: 2048\n")
    gateway = GatewayProcess(None, free_port(), "victim", folder / "gateway.log", config=config)
    gateway.wait_ready(timeout_s=900)
    yield gateway
    gateway.stop()


def _replica_successes(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(r'^vllm:request_success_total\{backend="(victim-\d)"[^}]*\} ([0-9.]+)$', text, re.M)
    totals: dict[str, float] = {}
    for backend, value in found:
        totals[backend] = totals.get(backend, 0.0) + float(value)
    return totals


async def _concurrent_streams(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=120) as client:
        async def one() -> int:
            payload = {"model": "victim", "prompt": "Hello", "max_tokens": 16, "ignore_eos": True, "stream": True}
            async with client.stream("POST", f"{url}/v1/completions", json=payload) as resp:
                await resp.aread()
                return resp.status_code
        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_replicas_share_the_load(supervised_gateway):
    assert httpx.get(f"{supervised_gateway.url}/ready", timeout=10).json()["backends"] == \
        {"victim-0": "ready", "victim-1": "ready"}
    assert asyncio.run(_concurrent_streams(supervised_gateway.url, 4)) == [200] * 4
    successes = _replica_successes(supervised_gateway.url)
    assert successes.get("victim-0", 0) >= 1 and successes.get("victim-1", 0) >= 1, successes


def test_a_replica_killed_mid_stream_is_restarted_while_the_other_serves(supervised_gateway):
    import json
    import os
    import signal

    from tests.conftest import processes

    port = engine_url(supervised_gateway).rsplit(":", 1)[1]  # the first replica's engine
    server = next(pid for pid, _, cmd in processes()  # vLLM's API server itself, not the reaper around it
                  if "vllm.entrypoints.openai.api_server" in cmd and f"--port {port}" in cmd
                  and "serving.reaper" not in cmd)
    payload = {"model": "victim", "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"{supervised_gateway.url}/v1/completions", json=payload, timeout=120) as resp:
        for line in resp.iter_lines():  # the first replica gets it: both are idle and it comes first
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    os.kill(server, signal.SIGKILL)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "upstream_error"
    # at once, before the watcher has noticed: a connection refused at the dead replica is retried on the other
    statuses = [_post(supervised_gateway.url, None, model="victim", max_tokens=2).status_code for _ in range(4)]
    assert statuses == [200] * 4
    deadline = time.monotonic() + 600

    def restarted() -> bool:  # the watcher has noticed (within ~1 s), restarted the replica, and it is ready
        metrics = httpx.get(f"{supervised_gateway.url}/metrics", timeout=10).text
        return ('qserve_backend_restarts_total{backend="victim-0"} 1.0' in metrics
                and httpx.get(f"{supervised_gateway.url}/ready", timeout=10).status_code == 200)

    while not restarted():
        assert time.monotonic() < deadline, "the killed replica was not restarted"
        assert _post(supervised_gateway.url, None, model="victim", max_tokens=2).status_code == 200
        time.sleep(2)
    metrics = httpx.get(f"{supervised_gateway.url}/metrics", timeout=10).text
    assert re.search(r'qserve_upstream_errors_total\{backend="victim-0",kind="connection"\} [1-9]', metrics), metrics
