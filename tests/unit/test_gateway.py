"""The gateway against an in-process fake engine: envelope, streaming relay, failures, metrics."""

import json

import pytest
from fastapi.testclient import TestClient

from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from tests.fake_backend import running_fake_engine


@pytest.fixture(scope="module")
def engine_url():
    with running_fake_engine() as url:
        yield url


@pytest.fixture
def gateway(engine_url):
    settings = GatewaySettings(backends=[Backend.external("fake", engine_url), Backend.external("dead", "http://127.0.0.1:9")],
                               request_timeout_s=2.0, log=lambda m: None,
                               probe_interval_s=0)  # "dead" stays routed: its refused connection is the 502 case
    with TestClient(build_app(settings)) as client:
        yield client


def _events(resp):
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def _assert_envelope(body, status_type=None):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if status_type:
        assert body["error"]["type"] == status_type


def test_models_and_health(gateway):
    assert gateway.get("/health").json() == {"status": "ok"}
    assert [m["id"] for m in gateway.get("/v1/models").json()["data"]] == ["fake", "dead"]


def test_completion_passes_through(gateway):
    body = gateway.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 3}).json()
    assert body["choices"][0]["text"] == " tok tok tok" and body["usage"]["completion_tokens"] == 3


def test_unknown_model_is_404_in_the_envelope(gateway):
    resp = gateway.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert resp.status_code == 404
    _assert_envelope(resp.json(), "not_found_error")
    assert resp.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("payload, param", [({"prompt": "hi"}, "model"),
                                            ({"model": "fake", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
                                            ({"model": "fake"}, "prompt")])
def test_invalid_requests_are_400_with_the_param(gateway, payload, param):
    resp = gateway.post("/v1/completions", json=payload)
    assert resp.status_code == 400
    _assert_envelope(resp.json(), "invalid_request_error")
    assert resp.json()["error"]["param"] == param


def test_unknown_route_is_enveloped(gateway):
    resp = gateway.get("/v1/nothing")
    assert resp.status_code == 404
    _assert_envelope(resp.json())


def test_engine_error_keeps_its_status_and_message(gateway):
    resp = gateway.post("/v1/completions", json={"model": "fake", "prompt": "ERROR400"})
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "prompt too long"
    _assert_envelope(resp.json())


def test_unreachable_engine_is_502(gateway):
    resp = gateway.post("/v1/completions", json={"model": "dead", "prompt": "hi"})
    assert resp.status_code == 502
    _assert_envelope(resp.json(), "upstream_error")


def test_engine_timeout_is_504(gateway):
    resp = gateway.post("/v1/completions", json={"model": "fake", "prompt": "SLOW"})
    assert resp.status_code == 504
    _assert_envelope(resp.json(), "timeout_error")


def test_stream_ends_with_done_and_hides_usage_not_asked_for(gateway):
    with gateway.stream("POST", "/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 4, "stream": True}) as resp:
        events = _events(resp)
    assert events[-1] == "[DONE]" and len(events) == 5
    assert all(json.loads(e).get("usage") is None for e in events[:-1])


def test_stream_keeps_usage_when_asked(gateway):
    payload = {"model": "fake", "prompt": "hi", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    with gateway.stream("POST", "/v1/completions", json=payload) as resp:
        events = _events(resp)
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 2 and events[-1] == "[DONE]"


def test_stream_cut_by_the_engine_ends_with_an_error_event_then_done(gateway):
    payload = {"model": "fake", "prompt": "CRASH", "max_tokens": 6, "stream": True}
    with gateway.stream("POST", "/v1/completions", json=payload) as resp:
        events = _events(resp)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    _assert_envelope(error, "upstream_error")
    assert "interrupted" in error["error"]["message"]


def test_crlf_streams_pass_and_garbled_events_end_in_an_error_event(gateway):
    payload = {"model": "fake", "prompt": "CRLF", "max_tokens": 3, "stream": True}
    with gateway.stream("POST", "/v1/completions", json=payload) as resp:
        events = _events(resp)
    assert events[-1] == "[DONE]" and [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [" tok"] * 3
    with gateway.stream("POST", "/v1/completions", json={**payload, "prompt": "GARBLED"}) as resp:
        events = _events(resp)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "upstream_malformed"


def test_metrics_count_requests_and_merge_engine_metrics(gateway):
    gateway.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 3})
    gateway.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    gateway.post("/v1/completions", json={"model": "fake"})
    text = gateway.get("/metrics").text
    # made-up model names are not label values; a body that does not validate is counted too
    assert 'qserve_requests_total{endpoint="/v1/completions",key="-",model="unknown",status="404"} 1.0' in text
    assert 'qserve_requests_total{endpoint="/v1/completions",key="-",model="unknown",status="400"} 1.0' in text
    assert 'qserve_requests_total{endpoint="/v1/completions",key="-",model="fake",status="200"} 1.0' in text
    assert 'qserve_completion_tokens_total{model="fake"} 3.0' in text
    assert 'vllm:prompt_tokens_total{backend="fake",model_name="fake"} 42.0' in text
    assert "qserve_upstream_errors_total" in text


def test_ready_reflects_backend_state(gateway):
    assert gateway.get("/ready").status_code == 200


def test_loadtest_through_the_gateway_counts_tokens_from_usage(engine_url):
    """The load generator against the real gateway (uvicorn) in front of the fake engine."""
    import threading
    import time

    import uvicorn

    from loadtest.profiles import Concurrency
    from loadtest.runner import LoadSettings, run_loadtest
    from loadtest.workloads import LengthDist
    from serving.server import free_port

    port = free_port()
    app = build_app(GatewaySettings(backends=[Backend.external("fake", engine_url)], log=lambda m: None))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        settings = LoadSettings(profiles=(Concurrency(2),), input_len=LengthDist("fixed", 16),
                                output_len=LengthDist("fixed", 4), num_requests=4, prefill_requests=2)
        report = run_loadtest(f"http://127.0.0.1:{port}/v1", "fake", settings, log=lambda m: None, progress=False)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    load = report["runs"][0]
    assert load["errors"]["count"] == 0 and load["requests"]["issued"] == 4
    assert load["output_tok_s"] > 0 and load["decode_tok_s"] > 0
    assert report["prefill"]["prompt_tokens"]["mean"] == 3  # the fake engine's usage, not a guess
    assert all(v is not None for v in load["itl_s"].values())
    assert load["server"]["gateway_output_tokens"] == load["server"]["client_output_tokens"] == 16


def test_zero_max_tokens_is_accepted_only_to_score_the_prompt(gateway):
    resp = gateway.post("/v1/completions", json={"model": "fake", "prompt": [1, 2, 3], "max_tokens": 0, "echo": True})
    assert resp.status_code == 200, resp.text
    resp = gateway.post("/v1/chat/completions", json={"model": "fake", "max_tokens": 0,
                                                      "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("body, param", [
    ({"model": "fake", "prompt": [False]}, "prompt"),  # read as token id 0 before: found by the fuzz test
    ({"model": "fake", "prompt": [-1]}, "prompt"),
    ({"model": "fake", "prompt": "x", "stream": "true"}, "stream"),
    ({"model": "fake", "prompt": "x", "max_tokens": "16"}, "max_tokens"),
    ({"model": "fake", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": "2"}, "max_tokens"),
    ({"model": "fake", "prompt": "x", "n": 10**9}, "n"),  # OpenAI's bound is 128: found by benchmarks/reliability.py
])
def test_fields_take_only_their_json_type(gateway, body, param):
    endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    resp = gateway.post(endpoint, json=body)
    assert resp.status_code == 400, resp.text
    _assert_envelope(resp.json(), "invalid_request_error")
    assert resp.json()["error"]["param"].startswith(param)


def test_an_integral_float_is_an_integer_as_json_schema_has_it(gateway):
    resp = gateway.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 3.0})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3


def test_the_openapi_document_says_what_the_gateway_does(gateway):
    spec = gateway.get("/openapi.json").json()
    completion = spec["components"]["schemas"]["CompletionRequest"]
    assert completion["properties"]["model"]["enum"] == ["dead", "fake"]  # the served names: fuzzers reach engines
    assert {"properties": {"echo": {"const": True}}, "required": ["echo"]} in completion["anyOf"]  # max_tokens 0
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]) == {
        "application/json", "text/event-stream"}
