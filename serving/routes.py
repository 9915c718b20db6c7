"""The thin HTTP layer: parse, hand to the service, wrap its answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError

from serving.errors import APIError
from serving.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelList
from serving.relay import RelayResponse
from serving.scrape import EngineScraper
from serving.service import OpenAIProxy

router = APIRouter()
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 502, 503, 504)}
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
# a generation answers JSON, or server-sent events when the request asks to stream
_GENERATED = {**_ERRORS, 200: {"description": "The completion; with stream: true, server-sent events ending in "
                                              "data: [DONE] (an error after the first event is one last event)",
                               "content": {"application/json": {"schema": {"type": "object"}},
                                           "text/event-stream": {}}}}


def _proxy(request: Request) -> OpenAIProxy:
    return request.app.state.proxy


def _body_doc(model: type[BaseModel]) -> dict:
    """The request body in the OpenAPI document (the routes read it themselves, see ``_generate``)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{model.__name__}"}}}}}


async def _generate(request: Request, endpoint: str,
                    model: type[CompletionRequest | ChatCompletionRequest]) -> Response:
    # validated by pydantic-core straight from the bytes: FastAPI's body parameter (json.loads, then its own
    # field walk) took about a tenth of the gateway's per-request samples in a py-spy profile
    try:
        body = model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    proxy, authorization = _proxy(request), request.headers.get("authorization")
    if body.stream:
        stream = await proxy.open_stream(endpoint, body, authorization)
        return RelayResponse(stream)
    return JSONResponse(await proxy.complete(endpoint, body, authorization))


@router.post("/v1/completions", responses=_GENERATED, openapi_extra=_body_doc(CompletionRequest))
async def completions(request: Request) -> Response:
    return await _generate(request, "/v1/completions", CompletionRequest)


@router.post("/v1/chat/completions", responses=_GENERATED, openapi_extra=_body_doc(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    return await _generate(request, "/v1/chat/completions", ChatCompletionRequest)


# dispatched by the gateway ahead of FastAPI's middleware and routing (``serving.app``); declared on the router
# above too, for the OpenAPI document
GENERATION_ROUTES = {"/v1/completions": completions, "/v1/chat/completions": chat_completions}


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return _proxy(request).models()


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the gateway answers. Whether the engines are up is ``/ready``'s question."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(request: Request) -> dict[str, object]:
    pool = _proxy(request).pool
    states = {b.name: b.state for b in pool.backends}
    if not pool.ready:
        raise APIError(503, f"not ready: {states}", code="not_ready", headers={"Retry-After": "5"})
    return {"status": "ready", "backends": states}


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": f"Prometheus text exposition format ({PROMETHEUS})"}})
async def metrics(request: Request) -> Response:
    """The gateway's ``qserve_`` metrics followed by every ready engine's own, labelled by backend."""
    proxy = _proxy(request)
    for model, replicas in proxy.pool.replicas.items():
        proxy.metrics.queued.labels(model).set(sum(b.admission.queued for b in replicas))
    scraper: EngineScraper = request.app.state.scraper
    engines = await scraper.exposition(proxy.pool.backends)  # before rendering: a failed scrape is counted
    return Response(proxy.metrics.render().decode() + engines, media_type=PROMETHEUS)
