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


def _with_backend(line: str, backend: str) -> str:
    """One sample line with ``backend="NAME"`` as its first label."""
    name_end = len(line.split(" ", 1)[0].split("{", 1)[0])
    label = f'backend="{backend}"'
    if line[name_end:name_end + 1] == "{":
        return f"{line[:name_end + 1]}{label},{line[name_end + 1:]}"
    return f"{line[:name_end]}{{{label}}}{line[name_end:]}"


def merge_expositions(scrapes: list[tuple[str, str]]) -> str:
    """Merges engines' Prometheus text expositions ``(backend, text)`` into one, labelling every sample
    with its backend. Each metric family keeps one HELP/TYPE header with all backends' samples right
    after it: the text format wants a family's samples together, and strict parsers (OpenMetrics,
    prometheus_client) reject a family that reappears after another."""
    families: dict[str, tuple[list[str], list[str]]] = {}  # family -> (header lines, samples), in order
    for backend, text in scrapes:
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                words = line.split(" ", 3)
                if len(words) >= 3 and words[1] in ("HELP", "TYPE"):
                    family = words[2]
                    header = families.setdefault(family, ([], []))[0]
                    if not any(h.split(" ", 3)[1] == words[1] for h in header):
                        header.append(line)
                continue
            name = line.split(" ", 1)[0].split("{", 1)[0]
            if name != family and not name.startswith(f"{family}_"):  # a sample with no header: its own family
                family = name
            families.setdefault(family, ([], []))[1].append(_with_backend(line, backend))
    return "".join("\n".join(header + samples) + "\n" for header, samples in families.values())
