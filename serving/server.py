"""``serve``: one command from a checkpoint to a running gateway with its vLLM engine behind it."""

from __future__ import annotations

import socket
from typing import Callable, Optional

from core.models import cache_root, resolve_model
from serving.app import GatewaySettings, build_app
from serving.config import GatewayConfig, build_backends
from serving.engine import free_port
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


def serve(config: GatewayConfig, log: Callable[[str], None] = print) -> None:
    """Runs the gateway on the config's host and port, with its engines, until SIGINT/SIGTERM."""
    import uvicorn

    from serving.client_timeouts import timed_protocol  # uvicorn's protocol: loaded when a gateway starts

    keys = KeyRing.load(config.api_keys, inline=config.keys)  # a bad key file fails before vLLM starts
    backends = build_backends(config, resolve_model, free_port, config.log_dir or cache_root() / "logs")
    sock = bind_socket(config.host, config.port)
    fatal: list[str] = []
    server: Optional[uvicorn.Server] = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    def on_ready() -> None:  # the pool calls it once, when its launched engines are first all ready
        log(f"serving {', '.join(m.name for m in config.models)} at "
            f"http://{config.host}:{config.port}/v1 (Ctrl-C to stop)")

    settings = GatewaySettings(backends=backends, on_fatal=on_fatal, on_ready=on_ready, log=log, keys=keys,
                               admission=config.admission, max_body_bytes=config.max_body_bytes,
                               request_timeout_s=config.limits.engine_timeout_s)
    timeout = config.limits.client_timeout_s
    server = uvicorn.Server(uvicorn.Config(build_app(settings), log_level="warning", timeout_graceful_shutdown=10,
                                           http=timed_protocol(read_s=timeout, write_s=timeout)))
    log(f"gateway listening on http://{config.host}:{config.port} (ready once every engine is up: GET /ready)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if fatal:
        raise ServeError(fatal[0])
