"""Session fixtures for the real chain: the demo model, its quantized exports and served gateways.

Each slow artefact is built once per session; every gateway is stopped by its fixture.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from serving.launcher import GatewayProcess
from serving.server import free_port

ROOT = Path(__file__).resolve().parents[2]


def run_qserve(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qserve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    result = run_qserve("models", "prepare", "smollm2-135m")
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def quantize_demo(demo_model: Path, out: Path, *options: str) -> Path:
    """``out``: the demo model quantized by ``qserve quantize`` with ``options``."""
    result = run_qserve("quantize", str(demo_model), *options, "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def w8a8_model(demo_model, tmp_path_factory) -> Path:
    return quantize_demo(demo_model, tmp_path_factory.mktemp("ckpt") / "smollm2-w8a8", "--scheme", "w8a8",
                         "--method", "rtn")


def start_gateway(model_dir: Path, name: str, tmp_path_factory) -> GatewayProcess:
    log = tmp_path_factory.mktemp(f"logs-{name}") / "gateway.log"
    gateway = GatewayProcess(model_dir, free_port(), name, log)
    gateway.wait_ready(timeout_s=900)
    return gateway


@pytest.fixture(scope="session")
def bf16_gateway(demo_model, tmp_path_factory):
    gateway = start_gateway(demo_model, "bf16", tmp_path_factory)
    yield gateway
    assert gateway.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean shutdown


@pytest.fixture(scope="session")
def w8a8_gateway(w8a8_model, tmp_path_factory):
    gateway = start_gateway(w8a8_model, "w8a8", tmp_path_factory)
    yield gateway
    assert gateway.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean shutdown
