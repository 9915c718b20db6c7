"""The gateway's /metrics: a replica without engine metrics is not an upstream error, a failing one is."""

import re

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.testclient import TestClient

from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from serving.scrape import is_exposition
from tests.fake_backend import make_fake_engine, running_app, running_fake_engine


def _hosted_endpoint(metrics_page: str | None) -> FastAPI:
    """An OpenAI-compatible server with no Prometheus metrics: no /metrics route (404), or an HTML page."""
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {}

    if metrics_page is not None:
        @app.get("/metrics")
        async def metrics():
            return HTMLResponse(metrics_page)

    return app


def _flaky_engine() -> tuple[FastAPI, dict]:
    """The fake engine, whose /metrics answers 500 once ``state["broken"]`` is set."""
    app, state = make_fake_engine(), {"broken": False}

    @app.middleware("http")
    async def breaker(request, call_next):
        if state["broken"] and request.url.path == "/metrics":
            return PlainTextResponse("engine overloaded", status_code=500)
        return await call_next(request)

    return app, state


def _errors(text: str, backend: str) -> float:
    found = re.search(rf'qserve_upstream_errors_total{{backend="{backend}",kind="metrics"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("page", [None, "<html><body>Not here</body></html>"], ids=["404", "html"])
def test_a_replica_without_metrics_is_said_once_and_never_counted(page):
    log: list[str] = []
    with running_fake_engine() as engine, running_app(_hosted_endpoint(page)) as hosted:
        backends = [Backend.external("local", engine), Backend.external("hosted", hosted)]
        settings = GatewaySettings(backends=backends, log=log.append, probe_interval_s=0)
        with TestClient(build_app(settings)) as client:
            scrapes = [client.get("/metrics").text for _ in range(5)]
    assert all(_errors(text, "hosted") == 0 for text in scrapes)
    said = [line for line in log if "'hosted'" in line and "no engine metrics" in line]
    assert len(said) == 1, log
    assert "HTTP 404" in said[0] if page is None else "Prometheus text" in said[0]
    # the replica that has metrics is still merged, labelled by its backend
    assert all('vllm:prompt_tokens_total{backend="local",model_name="fake"} 42.0' in t for t in scrapes)
    assert not any("backend=\"hosted\"" in t and "vllm:" in t for t in scrapes)


def test_a_replica_whose_metrics_fail_is_counted_each_scrape():
    app, state = _flaky_engine()
    log: list[str] = []
    with running_app(app) as engine:
        backends = [Backend.external("m", engine), Backend.external("down", "http://127.0.0.1:9")]
        settings = GatewaySettings(backends=backends, log=log.append, probe_interval_s=0)
        with TestClient(build_app(settings)) as client:
            first = client.get("/metrics").text
            state["broken"] = True
            client.get("/metrics")
            last = client.get("/metrics").text
    assert _errors(first, "m") == 0 and "vllm:prompt_tokens_total{backend=\"m\"" in first
    assert _errors(last, "m") == 2  # a 500 from an engine that served metrics is a failure, each time
    assert _errors(last, "down") == 3  # a refused connection is a failure, not "has no metrics"
    assert not any("no engine metrics" in line for line in log)


@pytest.mark.parametrize("content_type, text, expected", [
    ("text/plain; version=0.0.4; charset=utf-8", "# HELP x y\n# TYPE x counter\nx 1\n", True),
    ("application/openmetrics-text; version=1.0.0", "x_total{a=\"b\"} 1\n# EOF\n", True),
    ("text/plain", "", True),  # an exposition with no samples yet
    ("text/html; charset=utf-8", "<html></html>", False),
    ("application/json", '{"detail": "Not Found"}', False),
    ("text/plain", "404 page not found", False),
    ("text/plain", "Not Found", False),  # Go's default handler: plain text, not an exposition
])
def test_exposition_detection(content_type, text, expected):
    assert is_exposition(content_type, text) is expected
