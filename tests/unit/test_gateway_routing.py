"""Replicas, retries, the body limit, the context check and the gateway config, on in-process fake engines."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from serving.config import ConfigError, build_backends, load_config, validate_config
from tests.fake_backend import make_fake_engine, running_app

DEAD = "http://127.0.0.1:9"


@contextlib.contextmanager
def counting_engine():
    """A fake engine that counts the generation requests it receives; yields (url, counts)."""
    app, counts = make_fake_engine(), {"posts": 0}

    @app.middleware("http")
    async def count(request, call_next):
        counts["posts"] += request.method == "POST"
        return await call_next(request)

    with running_app(app) as url:
        yield url, counts


def _gateway(backends: list[Backend], **settings) -> TestClient:
    return TestClient(build_app(GatewaySettings(backends=backends, log=lambda m: None, **settings)))


def test_concurrent_requests_spread_over_replicas_by_outstanding_count():
    with counting_engine() as (url_a, a), counting_engine() as (url_b, b):
        app = build_app(GatewaySettings(backends=[Backend.external("m", url_a, name="m-0"),
                                                  Backend.external("m", url_b, name="m-1")], log=lambda m: None))
        with running_app(app) as gateway:
            async def streams() -> list[int]:
                async with httpx.AsyncClient(timeout=30) as client:
                    async def one() -> int:
                        body = {"model": "m", "prompt": "DRIP", "max_tokens": 10, "stream": True}
                        async with client.stream("POST", f"{gateway}/v1/completions", json=body) as resp:
                            await resp.aread()
                            return resp.status_code
                    return list(await asyncio.gather(*(one() for _ in range(6))))

            assert asyncio.run(streams()) == [200] * 6
    assert a["posts"] == b["posts"] == 3


def test_a_refused_connection_is_retried_on_another_replica():
    with counting_engine() as (url, counts):
        # no health probes: the dead replica stays in routing, as it does between two probes
        with _gateway([Backend.external("m", DEAD, name="m-0"), Backend.external("m", url, name="m-1")],
                      probe_interval_s=0) as client:
            for stream in (False, True, False):
                resp = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2,
                                                            "stream": stream})
                assert resp.status_code == 200
            metrics = client.get("/metrics").text
    assert counts["posts"] == 3
    assert 'qserve_upstream_errors_total{backend="m-0",kind="connection"} 3.0' in metrics
    assert 'qserve_requests_total{endpoint="/v1/completions",key="-",model="m",status="200"} 3.0' in metrics


def test_no_replica_answering_is_a_502_in_the_envelope():
    with _gateway([Backend.external("m", DEAD, name="m-0"), Backend.external("m", DEAD.replace(":9", ":7"),
                                                                              name="m-1")],
                  probe_interval_s=0) as client:
        resp = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True})
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_unreachable"
    assert "m" in resp.json()["error"]["message"]


def test_external_replicas_are_probed_and_routed_around_while_down():
    with counting_engine() as (url, counts):
        port = int(url.rsplit(":", 1)[1])
        dead = Backend.external("m", DEAD, name="m-0")
        with _gateway([dead, Backend.external("m", url, name="m-1")], probe_interval_s=0.05) as client:
            _wait_for(lambda: dead.state == "unreachable")
            ready = client.get("/ready")
            for _ in range(3):
                assert client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}).status_code == 200
            metrics = client.get("/metrics").text
            dead.url = f"http://127.0.0.1:{port}"  # the replica comes back (here: at the live engine's address)
            _wait_for(lambda: dead.state == "ready")
        with _gateway([Backend.external("m", DEAD)], probe_interval_s=0.05) as client:
            _wait_for(lambda: client.app.state.proxy.pool.backends[0].state == "unreachable")
            alone = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert ready.status_code == 503 and "unreachable" in ready.json()["error"]["message"]
    assert counts["posts"] == 3 and 'kind="connection"' not in metrics  # never tried: no retry needed
    assert alone.status_code == 503 and alone.headers["retry-after"] == "5"
    assert alone.json()["error"]["code"] == "backend_unreachable" and "ConnectorError" in alone.json()["error"]["message"]


def test_external_servers_get_their_own_model_name_and_key(monkeypatch):
    seen: list[tuple[str, str | None]] = []
    app = make_fake_engine()

    @app.middleware("http")
    async def capture(request, call_next):
        if request.method == "POST":
            seen.append(((await request.json())["model"], request.headers.get("authorization")))
        return await call_next(request)

    monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream")
    config = validate_config({"models": [{"name": "smol", "urls": ["http://x"], "served_model_name": "org/Smol-135M",
                                          "api_key_env": "UPSTREAM_KEY"}]})
    with running_app(app) as url:
        backends = build_backends(config, Path, lambda: 0, Path("."))
        backends[0].url = url
        with _gateway(backends) as client:
            plain = client.post("/v1/completions", json={"model": "smol", "prompt": "hi", "max_tokens": 2})
            streamed = client.post("/v1/completions", json={"model": "smol", "prompt": "hi", "max_tokens": 2,
                                                            "stream": True})
    assert seen == [("org/Smol-135M", "Bearer sk-upstream")] * 2
    assert plain.status_code == 200 and plain.json()["model"] == "smol"
    assert streamed.text.count('"model": "smol"') == 2 and "org/Smol" not in streamed.text
    monkeypatch.delenv("UPSTREAM_KEY")
    with pytest.raises(ConfigError, match="UPSTREAM_KEY is not set"):
        validate_config({"models": [{"name": "smol", "urls": ["http://x"], "api_key_env": "UPSTREAM_KEY"}]})
    with pytest.raises(ConfigError, match="apply to 'urls'"):
        validate_config({"models": [{"name": "smol", "checkpoint": "c", "served_model_name": "s"}]})


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_bodies_over_the_limit_get_413_whether_declared_or_chunked():
    with counting_engine() as (url, counts), _gateway([Backend.external("m", url)], max_body_bytes=2048) as client:
        big = {"model": "m", "prompt": "x" * 4000}
        declared = client.post("/v1/completions", json=big)
        chunked = client.post("/v1/completions", content=iter([b'{"model": "m", "prompt": "', b"x" * 4000, b'"}']),
                              headers={"content-type": "application/json"})
        small = client.post("/v1/completions", json={"model": "m", "prompt": "x" * 100, "max_tokens": 1})
        metrics = client.get("/metrics").text
    for resp in (declared, chunked):
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "body_too_large" and "2,048 bytes" in resp.json()["error"]["message"]
    assert small.status_code == 200 and counts["posts"] == 1
    assert 'status="413"} 2.0' in metrics


def test_what_cannot_fit_the_context_is_refused_before_the_engine():
    with counting_engine() as (url, counts), _gateway([Backend.external("m", url, max_model_len=64)]) as client:
        too_many = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 64})
        long_ids = client.post("/v1/completions", json={"model": "m", "prompt": list(range(60)), "max_tokens": 10})
        chat = client.post("/v1/chat/completions", json={"model": "m", "max_completion_tokens": 100,
                                                         "messages": [{"role": "user", "content": "hi"}]})
        fits = client.post("/v1/completions", json={"model": "m", "prompt": list(range(60)), "max_tokens": 4})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_tokens"
    assert long_ids.status_code == 400 and "60 tokens" in long_ids.json()["error"]["message"]
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"
    assert fits.status_code == 200 and counts["posts"] == 1


def test_config_file_describes_models_replicas_and_urls(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "gw.yaml").write_text(
        "port: 9001\nlimits: {max_in_flight: 8, max_queue: 4}\n"
        "keys: [{id: ci, key: secret, rpm: 10}]\n"
        "models:\n"
        "  - {name: a, checkpoint: ckpt, replicas: 2, max_model_len: 1024, engine_args: [--dtype, bfloat16],"
        " env: {CUDA_VISIBLE_DEVICES: '0'}}\n"
        "  - {name: b, urls: ['http://h1:8000/', 'http://h2:8000']}\n")
    config = load_config(tmp_path / "gw.yaml", {"port": 9002})
    assert config.port == 9002 and config.admission.max_in_flight == 8 and config.admission.max_queue == 4
    ports = iter(range(5000, 5100))
    backends = build_backends(config, Path, lambda: next(ports), tmp_path / "logs")
    assert [(b.model, b.name) for b in backends] == [("a", "a-0"), ("a", "a-1"), ("b", "b-0"), ("b", "b-1")]
    first = backends[0].engine.config
    assert first.model_dir == tmp_path / "ckpt" and first.port == 5000 and backends[1].engine.config.port == 5001
    assert first.command()[-2:] == ["--dtype", "bfloat16"] and dict(first.env) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert first.max_model_len == 1024 and backends[2].url == "http://h1:8000" and backends[2].engine is None


@pytest.mark.parametrize("models, expected", [
    ([{"name": "a", "checkpoint": "x", "urls": ["http://h:1"]}], "either 'checkpoint'"),
    ([{"name": "a"}], "either 'checkpoint'"),
    ([{"name": "a", "urls": ["http://h:1"], "replicas": 2}], "each URL is a replica"),
    ([{"name": "a", "urls": ["h:1"]}], "http://"),
    ([{"name": "a", "checkpoint": "x", "replica": 2}], "models.0.replica"),
    ([{"name": "a", "checkpoint": "x"}, {"name": "a", "checkpoint": "y"}], "repeated: a"),
    ([], "models"),
])
def test_bad_configs_name_the_field_and_the_fix(models, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        validate_config({"models": models}, "gw.yaml")


def test_serve_command_line_errors_are_one_line(tmp_path):
    bad = tmp_path / "gw.yaml"
    bad.write_text("models: [{name: a, checkpoint: x, urls: ['http://h:1']}]\n")

    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qserve", "serve", *args], capture_output=True, text=True,
                              timeout=60, cwd=Path(__file__).resolve().parents[2])

    result = serve("--config", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and "either 'checkpoint'" in result.stderr
    missing = serve()
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        "error: give a checkpoint to serve (e.g. `qserve serve smollm2-135m`, the demo model) or --config FILE"]
    both = serve("demo", "--config", str(bad))
    assert both.returncode == 1 and len(both.stderr.strip().splitlines()) == 1 and "go in the config's models" in both.stderr


def test_the_shipped_example_config_is_valid():
    config = load_config(Path(__file__).resolve().parents[2] / "deploy" / "gateway.example.yaml")
    assert [m.name for m in config.models] == ["smollm2"] and config.models[0].replicas == 2
    text = (Path(__file__).resolve().parents[2] / "deploy" / "gateway.example.yaml").read_text()
    assert "#   urls:" in text  # the external-URL example stays in the file, commented out


def test_options_on_the_command_line_override_the_config(tmp_path):
    from serving.server import free_port

    (tmp_path / "gw.yaml").write_text("port: 1\nmodels: [{name: remote, urls: ['http://127.0.0.1:9']}]\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "qserve", "serve", "--config", str(tmp_path / "gw.yaml"),
                                "--port", str(port)], cwd=Path(__file__).resolve().parents[2],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None, process.stdout.read()
                time.sleep(0.3)
        assert [m["id"] for m in models["data"]] == ["remote"]
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_the_openapi_document_describes_the_request_bodies():
    with _gateway([Backend.external("m", DEAD)]) as client:
        doc = client.get("/openapi.json").json()
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    assert "prompt" in doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "StreamOptions" in doc["components"]["schemas"] and "ChatMessage" in doc["components"]["schemas"]


def test_generation_routes_dispatched_ahead_of_fastapi_keep_its_errors_and_documents(monkeypatch):
    """The hot routes bypass FastAPI's stack (``serving.app.Gateway``): failures still get the envelope and
    are counted, other methods still get the router's 405, and the OpenAPI document still lists them."""
    from serving.service import OpenAIProxy

    async def broken(*_args, **_kwargs):
        raise RuntimeError("bug")

    with counting_engine() as (url, _counts), _gateway([Backend.external("m", url)]) as client:
        invalid = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": -1})
        not_json = client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
        wrong_method = client.get("/v1/completions")
        monkeypatch.setattr(OpenAIProxy, "complete", broken)
        internal = client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        paths = client.get("/openapi.json").json()["paths"]
        metrics = client.get("/metrics").text
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "max_tokens"
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_value"
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert internal.status_code == 500 and internal.json()["error"]["message"] == "internal error: RuntimeError"
    assert "/v1/completions" in paths and "/v1/chat/completions" in paths
    assert 'endpoint="/v1/completions",key="-",model="unknown",status="500"} 1.0' in metrics
