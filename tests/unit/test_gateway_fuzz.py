"""Property-based fuzzing of the gateway from its own OpenAPI document (Schemathesis' strategies, driven by
Hypothesis), against the in-process fake engine over real HTTP: generated valid and invalid requests for every
endpoint, seeded and bounded. No response is a 5xx of the gateway's making, every status and content type is one
the document declares, every request the document calls valid is accepted, and every error comes in the OpenAI
envelope."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from tests.fake_backend import running_app, running_fake_engine

EXAMPLES = 120  # per operation and generation mode: seconds here; benchmarks/reliability.py runs more


@pytest.fixture(scope="module")
def gateway_schema():
    with running_fake_engine() as engine:
        app = build_app(GatewaySettings(backends=[Backend.external("fake", engine)], request_timeout_s=10.0,
                                        probe_interval_s=0, log=lambda m: None))
        with running_app(app) as url:
            yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def _check(case, mode: GenerationMode) -> None:
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    response = case.call(timeout=30)
    # the gateway's own acceptance is checked below: a valid request may still exceed the model's limits, which
    # only the engine knows (the document says so), and the engine's 400 is relayed as it is
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"message", "type"} <= set(body["error"]), body
    if mode is GenerationMode.POSITIVE and response.status_code >= 400:
        assert response.status_code == 400 and "too large" in body["error"]["message"], (case.body, body)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_generated_requests_get_declared_answers(gateway_schema, mode):
    operations = _operations(gateway_schema)
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions", "GET /metrics"}
    if mode is GenerationMode.NEGATIVE:  # an operation without a body or parameters has no invalid input
        operations = [op for op in operations if op.body]
        assert len(operations) == 2
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def holds(case) -> None:
            _check(case, mode)

        holds()
