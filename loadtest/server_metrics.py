"""The server's own token counts (vLLM's ``/metrics``, and the gateway's) to set beside the client's."""

from __future__ import annotations

from typing import Any, Optional

import aiohttp

# sample name -> report key; vLLM's counters and the qserve gateway's
COUNTERS = {
    "vllm:prompt_tokens_total": "engine_prompt_tokens",
    "vllm:generation_tokens_total": "engine_output_tokens",
    "vllm:request_success_total": "engine_requests_finished",
    "qserve_prompt_tokens_total": "gateway_prompt_tokens",
    "qserve_completion_tokens_total": "gateway_output_tokens",
}


def parse_counters(text: str, model: str) -> dict[str, float]:
    """Sums the counters of ``COUNTERS`` over their labels, keeping only ``model``'s samples where
    a sample names its model (``model_name`` for vLLM, ``model`` for the gateway)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = COUNTERS.get(sample.name)
            named = sample.labels.get("model_name", sample.labels.get("model"))
            if key and named in (None, model):
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


async def scrape(session: aiohttp.ClientSession, base_url: str, model: str) -> Optional[dict[str, float]]:
    """The counters now, or None where the server has no Prometheus ``/metrics`` with any of them."""
    try:
        async with session.get(f"{base_url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                return None
            counters = parse_counters(await resp.text(), model)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return counters or None


def server_figures(before: Optional[dict[str, float]], after: Optional[dict[str, float]],
                   client_prompt: int, client_output: int) -> Optional[dict[str, Any]]:
    """What the server counted during the run beside what the client counted (every request of the run)."""
    if not before or not after:
        return None
    deltas = {key: after[key] - before.get(key, 0.0) for key in after}
    return {**deltas, "client_prompt_tokens": client_prompt, "client_output_tokens": client_output}
