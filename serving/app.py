"""``build_app(settings)``: the gateway as a FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

import aiohttp
from fastapi import FastAPI

from serving.admission import AdmissionLimits
from serving.backends import Backend, BackendPool
from serving.errors import BodyLimit, install_error_handlers
from serving.keys import KeyRing
from serving.metrics import GatewayMetrics
from serving.routes import router
from serving.service import OpenAIProxy


@dataclass
class GatewaySettings:
    """What the gateway serves. ``on_fatal`` is told when a launched engine cannot start."""

    backends: list[Backend]
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    keys: KeyRing = field(default_factory=lambda: KeyRing([]))
    admission: AdmissionLimits = AdmissionLimits()
    max_body_bytes: int = 8 * 2**20
    probe_interval_s: float = 5.0  # health checks of external (URL) replicas; 0: never
    on_fatal: Callable[[str], None] = field(default=lambda message: None)
    log: Callable[[str], None] = print


def build_app(settings: GatewaySettings) -> FastAPI:
    """The gateway: OpenAI routes, ``/health``, ``/ready``, ``/metrics``; engines start with the app."""
    pool = BackendPool(settings.backends, settings.admission)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # sock_read bounds each wait for the engine's next bytes (a stream may last longer than that)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s,
                                        sock_read=settings.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
            metrics = GatewayMetrics()
            app.state.proxy = OpenAIProxy(pool, metrics, client, settings.keys)
            starter: Optional[asyncio.Task] = asyncio.create_task(
                pool.start(settings.on_fatal, settings.log, lambda model: metrics.restarts.labels(model).inc(),
                           client, settings.probe_interval_s))
            try:
                yield
            finally:
                starter.cancel()
                await asyncio.to_thread(pool.stop)

    app = FastAPI(title="qserve gateway", lifespan=lifespan)
    _document_request_bodies(app)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.include_router(router)
    return app


def _document_request_bodies(app: FastAPI) -> None:
    """Adds the generation request models to the OpenAPI components (their routes parse bodies themselves)."""
    from serving.protocol import ChatCompletionRequest, CompletionRequest

    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionRequest, ChatCompletionRequest):
                spec = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(spec.pop("$defs", {}))
                components[model.__name__] = spec
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
