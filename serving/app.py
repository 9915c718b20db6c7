"""``build_app(settings)``: the gateway as a FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from serving.admission import AdmissionLimits
from serving.backends import Backend, BackendPool
from serving.errors import BodyLimit, install_error_handlers
from serving.keys import KeyRing
from serving.metrics import GatewayMetrics
from serving.routes import GENERATION_ROUTES, router
from serving.scrape import EngineScraper
from serving.service import OpenAIProxy


@dataclass
class GatewaySettings:
    """What the gateway serves. ``on_fatal`` is told when a launched engine cannot start; ``on_ready`` once,
    when every launched engine is first ready (never on a restart)."""

    backends: list[Backend]
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    keys: KeyRing = field(default_factory=lambda: KeyRing([]))
    admission: AdmissionLimits = AdmissionLimits()
    max_body_bytes: int = 8 * 2**20
    probe_interval_s: float = 5.0  # health checks of external (URL) replicas; 0: never
    on_fatal: Callable[[str], None] = field(default=lambda message: None)
    on_ready: Callable[[], None] = field(default=lambda: None)
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
            app.state.scraper = EngineScraper(metrics, client, settings.log)
            starter: Optional[asyncio.Task] = asyncio.create_task(
                pool.start(settings.on_fatal, settings.log, lambda model: metrics.restarts.labels(model).inc(),
                           client, settings.probe_interval_s, on_ready=settings.on_ready))
            try:
                yield
            finally:
                starter.cancel()
                settings.log("gateway stopping: stopping its engines")
                await asyncio.to_thread(pool.stop)
                settings.log("gateway stopped")

    app = Gateway(GENERATION_ROUTES, settings.max_body_bytes, title="qserve gateway", lifespan=lifespan)
    _document_request_bodies(app, sorted({b.model for b in settings.backends}))
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.include_router(router)
    return app


class Gateway(FastAPI):
    """FastAPI, with the generation routes (``POST``) dispatched before its middleware stack and router.

    Those layers (error middlewares, exit stacks, route matching, dependency solving) were about a fifth of
    the gateway's CPU per request in a py-spy profile; the hot routes need only the body limit and the
    exception handlers, which they get here from the same objects the rest of the app uses.
    """

    def __init__(self, hot_routes: dict[str, Callable[[Request], Awaitable[Response]]], max_body_bytes: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hot_routes = hot_routes
        self._hot = BodyLimit(self._serve_hot, max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.hot_routes:
            scope["app"] = self
            await self._hot(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _serve_hot(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.hot_routes[scope["path"]](request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the envelope, as on the other routes
            handler = next(self.exception_handlers[t] for t in type(exc).__mro__ if t in self.exception_handlers)
            if handler is self.exception_handlers.get(Exception):
                logging.getLogger("uvicorn.error").exception("internal error on %s", scope["path"])
            response = await handler(request, exc)
        await response(scope, receive, send)


def _document_request_bodies(app: FastAPI, models: list[str]) -> None:
    """Adds the generation request models to the OpenAPI components (their routes parse bodies themselves),
    with ``model`` listing the names this gateway serves (any other is a 404)."""
    from serving.protocol import ChatCompletionRequest, CompletionRequest

    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (CompletionRequest, ChatCompletionRequest):
                spec = model.model_json_schema(ref_template="#/components/schemas/{model}")
                spec["properties"]["model"]["enum"] = models
                components.update(spec.pop("$defs", {}))
                components[model.__name__] = spec
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
