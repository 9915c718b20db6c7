"""The thin llama.cpp server's scoring path, on a tiny GGUF with the real llama.cpp library."""

import asyncio

import numpy as np
import pytest

from exporters.gguf_file import export_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is built by scripts/setup.sh")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export_gguf(tiny_with_tokenizer, out, float_type="f32", log=lambda *_: None)
    return out


def _last_position_logprob(gguf, ids, i):
    llama = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, n_threads=1, verbose=False)
    llama.eval(ids[:i])
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, -1), shape=(llama.n_vocab(),))
    logits = logits.astype(np.float64) - logits.max()
    chosen = float(logits[ids[i]] - np.log(np.exp(logits).sum())) if i < len(ids) else None
    return chosen, int(np.argmax(logits))


def test_scores_are_each_prefix_last_logits_and_generation_is_greedy(tiny_gguf):
    from serving.llamacpp_server import Scorer

    ids = [5, 17, 42, 99, 7, 250, 3]
    full, chosen, tops = Scorer(tiny_gguf, n_ctx=64, threads=1).score(ids, top_n=4, generate=2)
    assert chosen[0] is None and tops[0] is None and len(chosen) == len(full) == len(ids) + 2
    for i in (1, 4, 6):
        lp, _ = _last_position_logprob(tiny_gguf, ids, i)
        assert chosen[i] == pytest.approx(lp, abs=1e-4)
        assert len(tops[i]) == 4 and tops[i][0][1] >= tops[i][-1][1] and tops[i][0][1] >= chosen[i] - 1e-9
    _, greedy = _last_position_logprob(tiny_gguf, ids, len(ids))
    assert full[:len(ids)] == ids and full[len(ids)] == greedy


def test_scoring_requests_it_cannot_answer_get_a_400(tiny_gguf):
    from aiohttp.test_utils import TestClient, TestServer

    from serving.llamacpp_server import Scorer, build_app

    async def run():
        app = build_app("http://127.0.0.1:9", "tiny", Scorer(tiny_gguf, n_ctx=16, threads=1))
        async with TestClient(TestServer(app)) as client:
            base = {"model": "tiny", "echo": True, "logprobs": 1}
            answers = {}
            for name, extra in {"stream": {"prompt": [1, 2], "stream": True},
                                "sampled": {"prompt": [1, 2], "max_tokens": 3, "temperature": 0.7},
                                "too long": {"prompt": list(range(1, 20)), "max_tokens": 0},
                                "ok": {"prompt": [1, 2, 3], "max_tokens": 0}}.items():
                resp = await client.post("/v1/completions", json={**base, **extra})
                answers[name] = (resp.status, await resp.json())
            return answers

    answers = asyncio.run(run())
    for name in ("stream", "sampled", "too long"):
        status, body = answers[name]
        assert status == 400 and body["error"]["message"], (name, body)
    assert "context" in answers["too long"][1]["error"]["message"]
    status, body = answers["ok"]
    assert status == 200 and body["usage"]["prompt_tokens"] == 3 and len(body["choices"][0]["logprobs"]["tokens"]) == 3
