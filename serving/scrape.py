"""Scraping each engine's own ``/metrics`` for the gateway's ``/metrics``.

A replica that has no metrics (a hosted OpenAI-compatible endpoint, an engine started without them) answers
404 or some page that is not Prometheus text. That is a fact about the replica, not a failure: it is
remembered per backend, said once in the log, and the replica is not scraped again. Only a replica that
may have metrics and does not answer (timeout, refused connection, 5xx) counts as an upstream error.
"""

from __future__ import annotations

import asyncio
import re
from typing import Callable, Optional

import aiohttp

from serving.backends import Backend
from serving.metrics import GatewayMetrics, merge_expositions

_PROMETHEUS_TYPES = ("text/plain", "application/openmetrics-text")
# the first line of a text exposition: a comment (``# HELP``, ``# TYPE``, ``# EOF``) or a sample with its value
_EXPOSITION_START = re.compile(r"#|[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})?\s+[-+]?(\d|\.\d|Inf|NaN)", re.IGNORECASE)


def is_exposition(content_type: str, text: str) -> bool:
    """Whether a 200 answer is Prometheus/OpenMetrics text (an empty one counts: no samples yet)."""
    if not content_type.lower().startswith(_PROMETHEUS_TYPES):
        return False
    first = next((line for line in text.splitlines() if line.strip()), None)
    return first is None or _EXPOSITION_START.match(first) is not None


class EngineScraper:
    """Scrapes the ready replicas at once (a slow one delays only itself) and merges their metrics."""

    def __init__(self, metrics: GatewayMetrics, client: aiohttp.ClientSession,
                 log: Callable[[str], None] = print, timeout_s: float = 5.0) -> None:
        self.metrics = metrics
        self.client = client
        self.log = log
        self.timeout_s = timeout_s
        self.without_metrics: dict[str, str] = {}  # backend name -> why it has none

    async def exposition(self, backends: list[Backend]) -> str:
        """Every ready replica's own metrics, labelled by backend, as one text exposition."""
        wanted = [b for b in backends if b.state == "ready" and b.name not in self.without_metrics]
        scrapes = await asyncio.gather(*(self.scrape(b) for b in wanted))
        return merge_expositions([(b.name, text) for b, text in zip(wanted, scrapes) if text is not None])

    async def scrape(self, backend: Backend) -> Optional[str]:
        """One replica's metrics text; None when it has none (remembered) or did not answer (counted)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.client.get(f"{backend.url}/metrics", headers=backend.headers, timeout=timeout) as resp:
                if 400 <= resp.status < 500:  # 404 and the like: a definite answer, not a passing failure
                    return self._has_none(backend, f"/metrics answered HTTP {resp.status}")
                if resp.status == 200:
                    text = await resp.text()
                    if is_exposition(resp.headers.get("Content-Type", ""), text):
                        return text
                    return self._has_none(backend, "/metrics does not answer with Prometheus text")
        except Exception:  # noqa: BLE001 - a missing engine scrape must not break the gateway's own
            pass
        self.metrics.upstream_errors.labels(backend.name, "metrics").inc()
        return None

    def _has_none(self, backend: Backend, why: str) -> None:
        self.without_metrics[backend.name] = why
        self.log(f"{backend.name!r} at {backend.url} has no engine metrics ({why}); "
                 f"the gateway's /metrics leaves them out and does not count this as an error")
        return None
