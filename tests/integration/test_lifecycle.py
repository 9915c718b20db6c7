"""No vLLM process outlives its gateway, however the gateway ends; a broken checkpoint fails clearly."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest

from serving.launcher import GatewayProcess
from serving.server import free_port
from tests.conftest import processes
from tests.integration.conftest import run_qserve

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _process_groups_of(marker: str) -> set[int]:
    """Process groups of vLLM servers whose command line mentions ``marker`` (a unique model path)."""
    return {pgid for _, pgid, cmd in processes()
            if "vllm.entrypoints" in cmd and marker in cmd and "serving.reaper" not in cmd}


def _alive_in(groups: set[int]) -> list[str]:
    """Every process (vLLM's engine core and workers included) still in one of ``groups``."""
    return [f"{pid} {cmd}" for pid, pgid, cmd in processes() if pgid in groups]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["sigterm", "ctrl-c", "sigkill"])
def test_no_vllm_process_outlives_the_gateway(sig, w8a8_model, tmp_path):
    model = tmp_path / f"model-{sig.name}"  # a private copy: its path identifies this gateway's engine
    shutil.copytree(w8a8_model, model)
    gateway = GatewayProcess(model, free_port(), "w8a8", tmp_path / "gateway.log")
    try:
        gateway.wait_ready()
        groups = _process_groups_of(str(model))
        assert groups and _alive_in(groups), "engine not found before the stop"
        code = gateway.stop(sig=sig, timeout_s=60)
        # uvicorn re-raises SIGTERM after its graceful shutdown; Ctrl-C ends with our exit code 130
        assert code in {signal.SIGTERM: (0, -15), signal.SIGINT: (130,), signal.SIGKILL: (-9,)}[sig], code
        deadline = time.monotonic() + 40
        while _alive_in(groups) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive_in(groups), _alive_in(groups)
    finally:
        gateway.stop(sig=signal.SIGKILL)
        for pgid in _process_groups_of(str(model)):  # never leave a stray engine behind a failed test
            subprocess.run(["kill", "-9", f"-{pgid}"], capture_output=True)


def test_engine_that_cannot_start_reports_its_log(demo_model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model / name, broken / name)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    start = time.monotonic()
    result = run_qserve("serve", str(broken), "--port", str(free_port()), "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr.split("Last lines of its log")[0]
    assert result.stderr.startswith("error: vLLM exited")
    assert "full log:" in result.stderr and str(tmp_path / "logs") in result.stderr
    assert time.monotonic() - start < 300
    assert not _process_groups_of(str(broken))
