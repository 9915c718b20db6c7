"""What the reliability campaign's parts share: the fake engine as a process, a gateway from a config, and the
readings taken of a running gateway (RSS, open file descriptors, ``/metrics`` totals)."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from serving.launcher import GatewayProcess  # noqa: E402
from serving.server import free_port  # noqa: E402
from tests.fake_backend import fake_engine_process  # noqa: E402

KEY = "sk-reliability"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextmanager
def fake_engine() -> Iterator[str]:
    with fake_engine_process() as (url, _):
        yield url


@contextmanager
def gateway_of(folder: Path, models: list[dict[str, Any]], limits: Optional[dict[str, Any]] = None,
               rpm: Optional[int] = None, ready_s: float = 120) -> Iterator[GatewayProcess]:
    """``qserve serve --config`` with ``models`` and ``limits``, one key (``KEY``, ``rpm`` requests a minute)."""
    key = {"id": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), **({"rpm": rpm} if rpm else {})}
    (folder / "keys.yaml").write_text(json.dumps({"keys": [key]}))
    config = {"api_keys": str(folder / "keys.yaml"), "models": models, **({"limits": limits} if limits else {})}
    (folder / "gateway.yaml").write_text(json.dumps(config))
    gw = GatewayProcess(None, free_port(), models[0]["name"], folder / "logs" / "gateway.log",
                        config=folder / "gateway.yaml")
    try:
        gw.wait_ready(timeout_s=ready_s)
        yield gw
    finally:
        gw.stop()


@contextmanager
def gateway(engine_url: str, model: str, folder: Path, **kwargs: Any) -> Iterator[GatewayProcess]:
    """A gateway in front of the server at ``engine_url`` serving ``model``."""
    with gateway_of(folder, [{"name": model, "urls": [engine_url]}], **kwargs) as gw:
        yield gw


def rss_mib(gw: GatewayProcess) -> float:
    return psutil.Process(gw.process.pid).memory_info().rss / 2**20


def open_fds(gw: GatewayProcess) -> int:
    return psutil.Process(gw.process.pid).num_fds()


def metric_total(url: str, name: str, labels: str = "") -> float:
    """The sum of ``name``'s samples in the gateway's ``/metrics`` whose labels contain ``labels``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for lab, v in re.findall(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", text, re.M) if labels in lab)


def enveloped(resp: httpx.Response) -> bool:
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and set(body) == {"error"} and {"message", "type"} <= set(body["error"])


def engine_pids(port: Optional[int] = None) -> dict[int, str]:
    """``pid -> name`` of running vLLM processes (API servers on ``port`` only, when given, and every
    ``VLLM::`` process) and reapers."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "vllm.entrypoints" in cmd and "serving.reaper" not in cmd:
            if port is None or f"--port {port}" in cmd:
                found[proc.pid] = "api_server"
        elif cmd.startswith("VLLM::") or "serving.reaper" in cmd:
            found[proc.pid] = cmd.split()[0] if cmd.startswith("VLLM::") else "reaper"
    return found
