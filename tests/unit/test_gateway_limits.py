"""Keys, per-key limits and backpressure of the gateway, against the in-process fake engine."""

import asyncio
import hashlib
import time

import httpx
import pytest

from serving.admission import AdmissionLimits
from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from serving.keys import KeyFileError, KeyRing
from tests.fake_backend import running_app, running_fake_engine

KEYS = """
keys:
  - id: team-a
    key: secret-a
    rpm: 3
  - id: team-b
    sha256: {b_hash}
    tpm: 10
    models: [fake]
  - id: other
    key: secret-c
    models: [elsewhere]
"""


@pytest.fixture(scope="module")
def engine_url():
    with running_fake_engine() as url:
        yield url


def gateway(engine_url, **settings):
    backends = [Backend.external("fake", engine_url)]
    return running_app(build_app(GatewaySettings(backends=backends, log=lambda m: None, **settings)))


def keyring(tmp_path) -> KeyRing:
    path = tmp_path / "keys.yaml"
    path.write_text(KEYS.format(b_hash=hashlib.sha256(b"secret-b").hexdigest()))
    return KeyRing.load(path, env={})


def post(url, key=None, **body):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/completions", headers=headers, timeout=30,
                      json={"model": "fake", "prompt": "hi", "max_tokens": 2, **body})


def test_keys_authenticate_and_limit(engine_url, tmp_path):
    with gateway(engine_url, keys=keyring(tmp_path)) as url:
        missing, wrong = post(url), post(url, "nope")
        assert missing.status_code == wrong.status_code == 401
        assert missing.json()["error"]["code"] == "missing_api_key" and "Authorization: Bearer" in missing.json()["error"]["message"]
        assert wrong.json()["error"]["type"] == "authentication_error"
        denied = post(url, "secret-c")
        assert denied.status_code == 403 and denied.json()["error"]["param"] == "model"
        assert [post(url, "secret-a").status_code for _ in range(4)] == [200, 200, 200, 429]  # rpm 3
        limited = post(url, "secret-a")
        assert limited.json()["error"]["code"] == "rate_limit_requests" and int(limited.headers["Retry-After"]) >= 1
        # team-b: 10 tokens a minute; the fake engine counts 3 prompt + 4 completion tokens a request
        assert [post(url, "secret-b", max_tokens=4).status_code for _ in range(3)] == [200, 200, 429]
        assert post(url, "secret-b").json()["error"]["code"] == "rate_limit_tokens"
        metrics = httpx.get(f"{url}/metrics").text
    assert 'key="team-a",model="fake",status="429"} 2.0' in metrics
    assert 'key="-",model="fake",status="401"} 2.0' in metrics and 'key="other",model="fake",status="403"} 1.0' in metrics


def test_env_key_and_open_gateway(tmp_path):
    assert KeyRing.load(None, env={}).open
    ring = KeyRing.load(None, env={"QSERVE_API_KEY": "k"})
    assert ring.identify("Bearer k").id == "env"


@pytest.mark.parametrize("text, message", [("keys: {}", "top-level 'keys:' list"),
                                           ("keys: [{id: a}]", "give 'sha256'"),
                                           ("keys: [{id: a, key: k, rpm: -1}]", "'rpm' must be a positive integer"),
                                           ("keys: [{id: a, key: k}, {id: a, key: j}]", "unique")])
def test_bad_key_files_say_what_to_fix(tmp_path, text, message):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(KeyFileError, match=message):
        KeyRing.load(path, env={})


async def _slow_and_fast(url: str) -> tuple[httpx.Response, list[httpx.Response]]:
    async with httpx.AsyncClient(timeout=30) as client:
        body = {"model": "fake", "prompt": "SLOW", "max_tokens": 1}
        slow = asyncio.create_task(client.post(f"{url}/v1/completions", json=body))
        await asyncio.sleep(0.5)  # the slow request holds the only slot
        fast = await asyncio.gather(*(client.post(f"{url}/v1/completions", json={**body, "prompt": "hi"})
                                      for _ in range(2)))
        return await slow, list(fast)


def test_a_full_backend_answers_429_with_retry_after(engine_url):
    with gateway(engine_url, admission=AdmissionLimits(max_in_flight=1, max_queue=0), request_timeout_s=10) as url:
        slow, fast = asyncio.run(_slow_and_fast(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert slow.status_code == 200 and [r.status_code for r in fast] == [429, 429]
    assert fast[0].json()["error"]["code"] == "overloaded" and fast[0].headers["Retry-After"] == "1"
    assert 'qserve_requests_queued{model="fake"} 0.0' in metrics


def test_queued_requests_wait_then_time_out(engine_url):
    limits = AdmissionLimits(max_in_flight=1, max_queue=1, queue_timeout_s=1.0)
    with gateway(engine_url, admission=limits, request_timeout_s=10) as url:
        slow, fast = asyncio.run(_slow_and_fast(url))
    statuses = sorted(r.status_code for r in fast)
    assert slow.status_code == 200 and statuses == [429, 429]  # one refused at once, one after its wait
    assert {r.json()["error"]["message"].split("(")[1].split(")")[0].startswith(("waited", "1 requests"))
            for r in fast} == {True}


def test_slots_come_back_after_streams_and_disconnects(engine_url):
    with gateway(engine_url, admission=AdmissionLimits(max_in_flight=1)) as url:
        for _ in range(3):  # each stream frees its slot, or the next would be refused
            with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                              json={"model": "fake", "prompt": "hi", "max_tokens": 3, "stream": True}) as resp:
                assert resp.status_code == 200
                next(resp.iter_lines())  # leave after the first event: the client disconnects
        assert post(url).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    assert 'qserve_requests_in_flight{model="fake"} 0.0' in metrics


async def _storm(url: str, clients: int, seed: int) -> list[int]:
    """``clients`` streams at once, each leaving after a random number of events (at least the first)."""
    import random

    import aiohttp

    rng = random.Random(seed)

    async def one(leave_after: int) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/completions", json={
                    "model": "fake", "prompt": "DRIP", "max_tokens": 40, "stream": True}) as resp:
                seen = 0
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        seen += 1
                        if seen >= leave_after:
                            break  # leaving the block closes the connection mid-stream
                return resp.status

    return await asyncio.gather(*(one(rng.randint(0, 39)) for _ in range(clients)))


def test_a_disconnect_storm_gives_every_slot_back(engine_url):
    """100 clients leave their streams at random points: the gateway's in-flight count and the engine's open
    streams return to 0, and every admission slot serves again."""
    with gateway(engine_url, admission=AdmissionLimits(max_in_flight=100, max_queue=0), request_timeout_s=30) as url:
        statuses = asyncio.run(_storm(url, 100, seed=0))
        assert statuses == [200] * 100
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (
                'qserve_requests_in_flight{model="fake"} 0.0' not in httpx.get(f"{url}/metrics").text
                or httpx.get(f"{engine_url}/debug/open_streams").json()["open"]):
            time.sleep(0.2)
        assert 'qserve_requests_in_flight{model="fake"} 0.0' in httpx.get(f"{url}/metrics").text
        assert httpx.get(f"{engine_url}/debug/open_streams").json()["open"] == 0
        full = asyncio.run(_storm(url, 100, seed=1))  # all 100 slots again, none refused
        assert full == [200] * 100
