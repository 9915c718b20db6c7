"""The pool restarts an engine that died, with backoff, and answers 503 + Retry-After meanwhile."""

import asyncio
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.backends import Backend, BackendPool
from serving.engine import EngineStartError
from serving.errors import APIError


class FakeEngine:
    """Stands in for ``VLLMEngine``: dies on demand; its next ``fail_starts`` starts fail."""

    def __init__(self, fail_starts: int = 0) -> None:
        self.running, self.starts, self.fail_starts = False, 0, fail_starts
        self.process = None
        self.config = SimpleNamespace(log_path=Path("/dev/null"), model_dir=Path("/nonexistent"))

    def start(self) -> None:
        self.starts += 1
        if self.starts > 1 and self.fail_starts:
            self.fail_starts -= 1
            raise EngineStartError("port in use\nlog tail")
        self.running = True

    def alive(self) -> bool:
        return self.running

    async def wait_ready(self) -> float:
        return 0.0

    def stop(self) -> None:
        self.running = False


async def _scenario(engine: FakeEngine) -> tuple[list[str], list[str]]:
    backend = Backend(model="m", url="http://127.0.0.1:9", engine=engine)
    pool, restarts, states = BackendPool([backend]), [], []
    task = asyncio.create_task(pool.start(lambda m: None, lambda m: None, restarts.append))
    await asyncio.sleep(0.2)
    states.append(backend.state)
    engine.running = False  # the engine dies
    await asyncio.sleep(1.3)
    states.append(backend.state)
    with pytest.raises(APIError) as refused:
        pool.get("m")
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "10"
    for _ in range(80):
        await asyncio.sleep(0.1)
        if backend.state == "ready":
            break
    states.append(backend.state)
    task.cancel()
    pool.stop()
    return states, restarts


def test_a_dead_engine_is_restarted():
    engine = FakeEngine()
    states, restarts = asyncio.run(_scenario(engine))
    assert states == ["ready", "restarting", "ready"] and restarts == ["m"] and engine.starts == 2


def test_failed_restarts_back_off_and_retry():
    engine = FakeEngine(fail_starts=1)  # first restart fails: retried after 2 s instead of 1 s
    states, _ = asyncio.run(_scenario(engine))
    assert states[-1] == "ready" and engine.starts == 3


def test_a_vllm_server_orphaned_by_a_killed_reaper_is_cleared_before_a_restart(tmp_path):
    """SIGKILL to the reaper leaves vLLM holding the port; the next start (or stop) kills its group."""
    import subprocess
    import sys

    from serving.engine import EngineConfig, VLLMEngine

    # a stand-in whose command line reads like vLLM's API server on port 18765, in a session of its own
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                               "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", "18765"],
                              start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                  "vllm.entrypoints.openai.api_server", "--port", "187650"], start_new_session=True)
    try:
        engine = VLLMEngine(EngineConfig(model_dir=tmp_path, served_name="m", port=18765, log_path=tmp_path / "log"))
        assert engine.kill_orphans() == [orphan.pid]
        assert orphan.wait(timeout=10) == -9 and bystander.poll() is None
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait()


def _engine_running_a_writer(tmp_path, monkeypatch, port: int):
    """A ``VLLMEngine`` whose command, instead of vLLM, touches ``vllm_dist_x`` in its temp dir and reports
    that dir and its pid; returns the started engine, the temp dir and the pid."""
    import sys
    import time

    from serving.engine import EngineConfig, VLLMEngine

    where = tmp_path / "tmpdir"
    writer = ("import os, tempfile, time; open(os.path.join(tempfile.gettempdir(), 'vllm_dist_x'), 'w').close(); "
              f"open({str(where)!r}, 'w').write(tempfile.gettempdir() + ' ' + str(os.getpid())); time.sleep(60)")
    monkeypatch.setattr(EngineConfig, "command", lambda self: [sys.executable, "-c", writer])
    engine = VLLMEngine(EngineConfig(model_dir=tmp_path, served_name="m", port=port, log_path=tmp_path / "log"))
    engine.start()
    for _ in range(100):
        if where.exists() and where.read_text():
            break
        time.sleep(0.1)
    private, pid = where.read_text().split()
    return engine, Path(private), int(pid)


def test_an_engine_writes_temp_files_in_its_own_folder_removed_at_stop(tmp_path, monkeypatch):
    """vLLM leaves vllm_dist_* folders in TMPDIR; each engine gets a private TMPDIR that goes when it stops."""
    import tempfile

    engine, private, _ = _engine_running_a_writer(tmp_path, monkeypatch, 18766)
    try:
        assert (private / "vllm_dist_x").exists() and private.parent == Path(tempfile.gettempdir())
    finally:
        engine.stop()
    assert not private.exists()


def test_a_reaper_killed_outright_leaves_no_temp_dir_after_stop(tmp_path, monkeypatch):
    """SIGKILL gives the reaper no chance to remove its private TMPDIR: the engine's stop removes it."""
    import os
    import signal

    engine, private, pid = _engine_running_a_writer(tmp_path, monkeypatch, 18767)
    try:
        engine.process.kill()
        engine.process.wait()
        assert private.exists()
        engine.stop()
        assert not private.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
