"""The shipped Grafana dashboard and Prometheus config refer to metrics the gateway really exports."""

import json
import re
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from serving.app import GatewaySettings, build_app
from serving.backends import Backend
from tests.fake_backend import running_fake_engine

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b(qserve_[a-z_]+|vllm:[a-z_]+)", e)}
    with running_fake_engine() as url:
        settings = GatewaySettings(backends=[Backend.external("fake", url)], log=lambda m: None)
        with TestClient(build_app(settings)) as client:
            client.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2, "stream": True})
            client.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2})
            exported = client.get("/metrics").text
    families = set(re.findall(r"^# TYPE (\S+) ", exported, re.M))  # labelled series appear once used; types always
    missing = sorted(n for n in names if n.startswith("qserve_") and n not in families
                     and re.sub(r"_(total|bucket)$", "", n) not in families)
    assert not missing, f"dashboard queries metrics the gateway does not export: {missing}"
    # the vllm:* series come from the engine (absent from the fake one); their names are vLLM's documented ones
    assert {n for n in names if n.startswith("vllm:")} <= {"vllm:num_requests_running", "vllm:num_requests_waiting",
                                                           "vllm:kv_cache_usage_perc"}


def test_prometheus_config_scrapes_the_gateway():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
