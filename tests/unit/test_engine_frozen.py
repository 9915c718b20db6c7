"""An engine frozen with SIGSTOP (a process that holds its socket and never answers): requests end with 504
within the configured timeout, the health probe takes the replica out of routing, traffic goes to the replica
still answering, and after SIGCONT the frozen one serves again. The engine is the fake one, in a process of its
own so that it can be stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from typing import Iterator

import httpx

from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from tests.fake_backend import fake_engine_process, running_app, running_fake_engine


@contextlib.contextmanager
def _gateway(first_url: str, first_name: str) -> Iterator[str]:
    """A gateway with two replicas of ``fake``: ``first_url`` (listed first: the one chosen when both are idle)
    and a healthy fake engine; a 2 s engine timeout, health probed every 0.5 s."""
    with running_fake_engine() as healthy:
        backends = [Backend.external("fake", first_url, name=first_name),
                    Backend.external("fake", healthy, name="healthy")]
        app = build_app(GatewaySettings(backends=backends, request_timeout_s=2.0, probe_interval_s=0.5,
                                        log=lambda m: None))
        with running_app(app) as url:
            yield url


def _ask(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=30,
                      json={"model": "fake", "prompt": "hi", "max_tokens": 2})


def test_a_frozen_engine_times_out_is_routed_around_and_comes_back():
    with fake_engine_process() as (frozen_url, frozen):
        try:
            with _gateway(frozen_url, "frozen") as url:
                assert all(_ask(url).status_code == 200 for _ in range(4))
                os.kill(frozen.pid, signal.SIGSTOP)
                timed = []
                for _ in range(2):  # before the probe notices, the frozen one (the least busy, listed first) is chosen
                    start = time.monotonic()
                    timed.append((_ask(url), time.monotonic() - start))
                assert 504 in {r.status_code for r, _ in timed} <= {200, 504}, timed
                for response, seconds in timed:
                    if response.status_code == 504:  # within the 2 s timeout (and the time to answer)
                        assert response.json()["error"]["type"] == "timeout_error" and 1.9 < seconds < 4
                time.sleep(3)  # the probe (2 s timeout, every 0.5 s) has taken it out of routing
                ready = httpx.get(f"{url}/ready")  # /ready means every replica ready: it names the one that is not
                assert ready.status_code == 503 and "'frozen': 'unreachable', 'healthy': 'ready'" in ready.text
                start = time.monotonic()
                assert [_ask(url).status_code for _ in range(6)] == [200] * 6  # all to the healthy one, at once
                assert time.monotonic() - start < 3
                os.kill(frozen.pid, signal.SIGCONT)
                deadline = time.monotonic() + 10
                while httpx.get(f"{url}/ready").status_code != 200 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert httpx.get(f"{url}/ready").json()["backends"] == {"frozen": "ready", "healthy": "ready"}
        finally:
            os.kill(frozen.pid, signal.SIGCONT)


def test_a_replica_that_accepts_and_never_answers_times_out_and_is_routed_around():
    hole = socket.socket()  # a host that stopped answering: the kernel completes handshakes, nobody replies
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    try:
        with _gateway(f"http://127.0.0.1:{hole.getsockname()[1]}", "hole") as url:
            start = time.monotonic()
            first = _ask(url)  # both idle: the hole, listed first, is chosen
            assert first.status_code == 504 and 1.9 < time.monotonic() - start < 4, first.text
            time.sleep(3)
            assert "'hole': 'unreachable', 'healthy': 'ready'" in httpx.get(f"{url}/ready").text
            assert [_ask(url).status_code for _ in range(6)] == [200] * 6
    finally:
        hole.close()
