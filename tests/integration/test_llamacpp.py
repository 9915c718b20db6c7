"""The demo model as a qserve GGUF on the real llama.cpp engine, behind the gateway, through the OpenAI SDK."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.launcher import GatewayProcess
from serving.server import free_port
from tests.conftest import processes
from tests.integration.conftest import quantize_demo, run_qserve, start_gateway

pytestmark = [pytest.mark.slow, pytest.mark.integration]
SAMPLE_IDS = [19556, 905, 28, 451, 314, 253, 1028, 30, 378, 3938, 282, 4649, 314]  # "Hello world, this is a test..."


@pytest.fixture(scope="module")
def q4_checkpoint(demo_model, tmp_path_factory) -> Path:
    return quantize_demo(demo_model, tmp_path_factory.mktemp("gguf") / "smollm2-q4_0", "--scheme", "gguf-q4_0",
                         "--method", "rtn")


@pytest.fixture(scope="module")
def q4_gguf(q4_checkpoint) -> Path:
    out = q4_checkpoint.parent / "smollm2-q4_0.gguf"
    result = run_qserve("export", str(q4_checkpoint), "--layout", "gguf", "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def llamacpp_gateway(q4_gguf, tmp_path_factory):
    gateway = start_gateway(q4_gguf, "q4", tmp_path_factory)
    yield gateway
    assert gateway.stop() in (0, -signal.SIGTERM)


def _engine_logprobs(gguf: Path, ids: list[int]) -> list[float]:
    """Each token's log-probability from the llama.cpp library, one prefix at a time (only the last position's
    logits each time: no bookkeeping over positions to get wrong)."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, n_threads=2, verbose=False)
    out = []
    for i in range(1, len(ids)):
        llama.reset()
        llama.eval(ids[:i])
        last = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
        logits = np.ctypeslib.as_array(last, shape=(llama.n_vocab(),)).astype(np.float64)
        logits -= logits.max()
        out.append(float(logits[ids[i]] - np.log(np.exp(logits).sum())))
    return out


def test_prompt_logprobs_through_the_gateway_are_the_engines_own(llamacpp_gateway, q4_gguf):
    payload = {"model": "q4", "prompt": SAMPLE_IDS, "max_tokens": 0, "echo": True, "logprobs": 3, "temperature": 0,
               "return_tokens_as_token_ids": True}
    resp = httpx.post(f"{llamacpp_gateway.url}/v1/completions", json=payload, timeout=120)
    assert resp.status_code == 200, resp.text
    logprobs = resp.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [f"token_id:{t}" for t in SAMPLE_IDS] and logprobs["token_logprobs"][0] is None
    served = logprobs["token_logprobs"][1:]
    expected = _engine_logprobs(q4_gguf, SAMPLE_IDS)
    assert np.allclose(served, expected, atol=2e-3), (served, expected)
    for lp, top, token in zip(served, logprobs["top_logprobs"][1:], SAMPLE_IDS[1:]):
        assert len(top) == 3 and max(top.values()) >= lp - 1e-9
        assert top.get(f"token_id:{token}", lp) == pytest.approx(lp)


def test_greedy_completion_and_streaming_chat_through_the_openai_sdk(llamacpp_gateway):
    from openai import OpenAI

    client = OpenAI(base_url=f"{llamacpp_gateway.url}/v1", api_key="unused")
    # transformers on this 4-bit model continues " five, six, seven, eight," (a fact prompt is too brittle: its
    # greedy answer to "The capital of France is" changes with the observer, in transformers as on the engine)
    first = client.completions.create(model="q4", prompt="One, two, three, four,", max_tokens=8, temperature=0)
    again = client.completions.create(model="q4", prompt="One, two, three, four,", max_tokens=8, temperature=0)
    assert first.choices[0].text.startswith(" five, six") and first.choices[0].text == again.choices[0].text
    assert first.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model="q4", messages=[{"role": "user", "content": "Say hello."}],
                                                 max_tokens=16, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3 and text.strip()
    assert client.models.list().data[0].id == "q4"
    metrics = httpx.get(f"{llamacpp_gateway.url}/metrics", timeout=30).text
    assert "llamacpp:prompt_tokens_total" in metrics and 'qserve_requests_total' in metrics


def test_perplexity_matches_the_same_weights_on_vllm(llamacpp_gateway, q4_checkpoint, tmp_path_factory, tmp_path):
    """The same quantized weights: compressed-tensors on vLLM, GGUF on llama.cpp, within 2 % perplexity."""
    vllm = start_gateway(q4_checkpoint, "q4-vllm", tmp_path_factory)
    try:
        result = run_qserve("eval", llamacpp_gateway.url, "--tokenizer", str(q4_checkpoint), "--served-model-name",
                            "q4", "--baseline", vllm.url, "--baseline-served-model-name", "q4-vllm", "--seq-len",
                            "512", "--max-windows", "4", "--top-k", "5", "--json", str(tmp_path / "eval.json"),
                            timeout=900)
    finally:
        vllm.stop()
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    served, reference = (report[k]["wikitext"]["token_perplexity"] for k in ("results", "baseline_results"))
    assert abs(served / reference - 1) < 0.02, (served, reference)
    assert report["agreement"]["top1_agreement"] > 0.9, report["agreement"]


def test_engine_killed_mid_stream_is_restarted_and_nothing_outlives_the_gateway(q4_gguf, tmp_path):
    model = tmp_path / "private.gguf"  # a private path identifies this gateway's engine processes
    os.link(q4_gguf, model)
    gateway = GatewayProcess(model, free_port(), "q4", tmp_path / "gateway.log")
    try:
        gateway.wait_ready(timeout_s=300)
        engine = next(pid for pid, _, cmd in processes() if "llama-server" in cmd and str(model) in cmd)
        payload = {"model": "q4", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{gateway.url}/v1/completions", json=payload, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        os.kill(engine, signal.SIGKILL)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "upstream_error"
        deadline = time.monotonic() + 180
        while True:  # the watcher restarts it; then requests succeed again
            metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
            if ('qserve_backend_restarts_total{backend="q4"} 1.0' in metrics
                    and httpx.get(f"{gateway.url}/ready", timeout=10).status_code == 200):
                break
            assert time.monotonic() < deadline, "the killed engine was not restarted"
            time.sleep(1)
        ok = httpx.post(f"{gateway.url}/v1/completions", json={"model": "q4", "prompt": "Hi", "max_tokens": 2},
                        timeout=60)
        assert ok.status_code == 200, ok.text
        groups = {pgid for _, pgid, cmd in processes()  # the engine's own group (the reaper's child session)
                  if str(model) in cmd and "serving.llamacpp_server" in cmd and "serving.reaper" not in cmd}
        assert groups
        assert gateway.stop() in (0, -signal.SIGTERM)
        deadline = time.monotonic() + 30
        while [p for p, g, _ in processes() if g in groups] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [cmd for _, g, cmd in processes() if g in groups]
    finally:
        gateway.stop(sig=signal.SIGKILL)


def test_bad_input_fails_in_one_line(q4_checkpoint, demo_model, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    result = run_qserve("serve", str(broken), "--port", str(free_port()), "--log-dir", str(tmp_path / "logs"))
    assert result.returncode == 1 and result.stderr.startswith("error: llama.cpp exited"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr.split("Last lines of its log")[0]
    w4 = quantize_demo(demo_model, tmp_path / "w4", "--scheme", "w4a16")
    result = run_qserve("export", str(w4), "--layout", "gguf", "-o", str(tmp_path / "w4.gguf"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "gguf-q4_0" in result.stderr
    assert not (tmp_path / "w4.gguf").exists()
