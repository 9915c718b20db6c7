"""``serve``: one command from a checkpoint to a running gateway with its vLLM engine behind it."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable, Optional

from exporters.models import cache_root
from serving.admission import AdmissionLimits
from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from serving.engine import EngineConfig
from serving.keys import KeyRing


class ServeError(RuntimeError):
    """The gateway could not start or its engine failed; the message says why and what to do."""


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds the gateway's port up front so that a port in use fails in a second, not after vLLM's start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}); "
                         f"stop what uses it or pass another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(model_dir: Path, host: str = "127.0.0.1", port: int = 8000, served_name: Optional[str] = None,
          max_model_len: int = 4096, engine_args: tuple[str, ...] = (), enforce_eager: Optional[bool] = None,
          log_dir: Optional[Path] = None, log: Callable[[str], None] = print, keys: Optional[KeyRing] = None,
          admission: AdmissionLimits = AdmissionLimits()) -> None:
    """Runs the gateway on ``host:port`` with one vLLM engine for ``model_dir`` until SIGINT/SIGTERM."""
    import uvicorn

    sock = bind_socket(host, port)
    name = served_name or model_dir.name
    log_dir = log_dir or cache_root() / "logs"
    engine = EngineConfig(model_dir=model_dir, served_name=name, port=free_port(), max_model_len=max_model_len,
                          enforce_eager=enforce_eager, extra_args=tuple(engine_args),
                          log_path=log_dir / f"vllm-{name}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    fatal: list[str] = []
    server: Optional[uvicorn.Server] = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    def on_log(message: str) -> None:
        log(message)
        if message.startswith("vLLM for") and "ready" in message:
            log(f"serving {name!r} at http://{host}:{port}/v1 (Ctrl-C to stop)")

    settings = GatewaySettings(backends=[Backend.launched(engine)], on_fatal=on_fatal, log=on_log,
                               keys=keys or KeyRing([]), admission=admission)
    config = uvicorn.Config(build_app(settings), log_level="warning", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    log(f"gateway listening on http://{host}:{port} (ready once vLLM is up: GET /ready)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if fatal:
        raise ServeError(fatal[0])
