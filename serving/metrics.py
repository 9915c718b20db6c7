"""Prometheus metrics of the gateway (``qserve_`` prefix) and the merge with each engine's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """The gateway's counters, in a registry of their own so several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qserve_requests", "Requests by model, endpoint, HTTP status and API key id",
                                ["model", "endpoint", "status", "key"], registry=r)
        self.latency = Histogram("qserve_request_latency_seconds", "End-to-end request latency",
                                 ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("qserve_time_to_first_token_seconds", "Time to the first streamed token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("qserve_requests_in_flight", "Requests being served", ["model"], registry=r)
        self.queued = Gauge("qserve_requests_queued", "Requests waiting for a backend slot", ["model"], registry=r)
        self.prompt_tokens = Counter("qserve_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.completion_tokens = Counter("qserve_completion_tokens", "Completion tokens", ["model"], registry=r)
        self.restarts = Counter("qserve_backend_restarts", "Engines restarted after they died", ["backend"],
                                registry=r)
        self.upstream_errors = Counter("qserve_upstream_errors", "Failures talking to an engine",
                                       ["backend", "kind"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def label_exposition(text: str, backend: str, seen_meta: set[str]) -> str:
    """Adds ``backend="NAME"`` to every sample of a Prometheus text exposition.

    HELP/TYPE lines already emitted (``seen_meta``) are dropped so that several engines' metrics
    merge into one valid exposition.
    """
    out = []
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            if line not in seen_meta:
                seen_meta.add(line)
                out.append(line)
            continue
        name_end = len(line.split(" ", 1)[0].split("{", 1)[0])
        label = f'backend="{backend}"'
        if line[name_end:name_end + 1] == "{":
            out.append(f"{line[:name_end + 1]}{label},{line[name_end + 1:]}")
        else:
            out.append(f"{line[:name_end]}{{{label}}}{line[name_end:]}")
    return "\n".join(out) + "\n"
