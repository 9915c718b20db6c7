"""Readiness comes from the pool's state: "serving ... at URL" once, when every engine is first up, never
again when one restarts (whose log line also says "ready after")."""

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import uvicorn

import serving.server
from serving.backends import Backend, BackendPool
from serving.config import validate_config
from serving.server import free_port, serve


class FakeEngine:
    """Stands in for ``VLLMEngine``: ready after ``delay_s``; dies when ``running`` is cleared."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s, self.running, self.starts, self.process = delay_s, False, 0, None
        self.config = SimpleNamespace(log_path=Path("/dev/null"), model_dir=Path("/nonexistent"))

    def start(self) -> None:
        self.starts += 1
        self.running = True

    def alive(self) -> bool:
        return self.running

    async def wait_ready(self) -> float:
        await asyncio.sleep(self.delay_s)
        return self.delay_s

    def stop(self) -> None:
        self.running = False


async def _until(condition, timeout_s: float = 8.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def test_on_ready_fires_once_all_engines_are_up_and_not_on_a_restart():
    fast, slow = FakeEngine(), FakeEngine(delay_s=0.5)
    backends = [Backend(model="m", url="http://127.0.0.1:9", name="m-0", engine=fast),
                Backend(model="m", url="http://127.0.0.1:9", name="m-1", engine=slow)]
    pool, log, ready_calls = BackendPool(backends), [], []

    async def scenario() -> None:
        on_ready = lambda: ready_calls.append([b.state for b in backends])  # noqa: E731
        task = asyncio.create_task(pool.start(lambda m: None, log.append, on_ready=on_ready))
        await asyncio.sleep(0.2)
        assert ready_calls == []  # the fast engine alone is not "all ready"
        await _until(lambda: ready_calls)
        fast.running = False  # dies; the watcher restarts it
        await _until(lambda: any("restarted, ready after" in m for m in log))
        await asyncio.sleep(0.2)
        task.cancel()
        pool.stop()

    asyncio.run(scenario())
    assert ready_calls == [["ready", "ready"]], (ready_calls, log)
    assert fast.starts == 2


def test_on_ready_is_not_called_when_an_engine_fails_to_start():
    class Broken(FakeEngine):
        async def wait_ready(self) -> float:
            raise RuntimeError("vLLM exited (code 1)")

    backends = [Backend(model="a", url="http://127.0.0.1:9", engine=FakeEngine()),
                Backend(model="b", url="http://127.0.0.1:9", engine=Broken())]
    pool, fatal, ready_calls = BackendPool(backends), [], []

    async def scenario() -> None:
        task = asyncio.create_task(pool.start(fatal.append, lambda m: None, on_ready=lambda: ready_calls.append(1)))
        await _until(lambda: fatal)
        await asyncio.sleep(0.1)
        task.cancel()
        pool.stop()

    asyncio.run(scenario())
    assert ready_calls == [] and fatal == ["vLLM exited (code 1)"]


def _serve(monkeypatch, tmp_path, backends: list[Backend], spec: dict, scenario) -> tuple[list[str], int]:
    """Runs ``serve`` in a thread with ``backends`` in place of what the config would launch, runs
    ``scenario(log)`` and stops the gateway; returns the log and the port."""
    monkeypatch.setattr(serving.server, "build_backends", lambda *args: backends)
    servers: list[uvicorn.Server] = []

    class Recorded(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recorded)
    port = free_port()
    config = validate_config({"port": port, "log_dir": str(tmp_path), "models": [spec]})
    log: list[str] = []
    thread = threading.Thread(target=serve, args=(config, log.append), daemon=True)
    thread.start()
    try:
        scenario(log)
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(timeout=15)
    assert not thread.is_alive()
    return log, port


def _wait_for(log: list[str], text: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in m for m in log) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_serve_announces_the_url_once_across_a_restart(monkeypatch, tmp_path):
    """``serve`` itself, with a fake engine in place of vLLM: the announcement is tied to the pool's state."""
    engine = FakeEngine()

    def scenario(log: list[str]) -> None:
        _wait_for(log, "serving smol at")
        engine.running = False
        _wait_for(log, "restarted, ready after")
        time.sleep(0.2)

    backends = [Backend(model="smol", url="http://127.0.0.1:9", engine=engine)]
    log, port = _serve(monkeypatch, tmp_path, backends, {"name": "smol", "checkpoint": "x"}, scenario)
    announced = [m for m in log if m.startswith("serving")]
    assert announced == [f"serving smol at http://127.0.0.1:{port}/v1 (Ctrl-C to stop)"], log
    assert any("restarted, ready after" in m for m in log), log
    assert log.index(announced[0]) > next(i for i, m in enumerate(log) if "'smol' ready after" in m)


def test_serve_announces_a_gateway_of_urls_only(monkeypatch, tmp_path):
    """No engine to wait for: the gateway serves at once (log parsing never announced this case)."""
    backends = [Backend.external("hosted", "http://127.0.0.1:9")]
    spec = {"name": "hosted", "urls": ["http://127.0.0.1:9"]}
    log, port = _serve(monkeypatch, tmp_path, backends, spec, lambda log: _wait_for(log, "serving hosted at"))
    announced = [m for m in log if m.startswith("serving")]
    assert announced == [f"serving hosted at http://127.0.0.1:{port}/v1 (Ctrl-C to stop)"], log
