"""The load tester's figures on scripted records (exact), its profiles and workloads."""

import random
import statistics

import pytest

from loadtest.figures import SLO, counted_records, prefill_figures, run_figures
from loadtest.profiles import Concurrency, ConstantRate, Poisson, Synchronous, auto_concurrency, parse_profiles
from loadtest.stats import RequestRecord
from loadtest.workloads import LengthDist, WorkloadError, prompt_file, sharegpt, synthetic


def scripted(index: int, start: float, ttft: float = 0.1, itl: float = 0.02, tokens: int = 5,
             prompt: int = 100) -> RequestRecord:
    """A request that got its first token at ``ttft`` and one token every ``itl`` after it."""
    times = [ttft + i * itl for i in range(tokens)]
    return RequestRecord(ok=True, index=index, start=start, prompt_tokens=prompt, output_tokens=tokens,
                         ttft=ttft, e2e=times[-1], chunk_times=times)


def test_latency_figures_are_exact_on_scripted_timings():
    records = [scripted(i, start=i * 0.18) for i in range(10)]  # back to back: each lasts 0.18 s
    figures = run_figures(records)
    assert figures["ttft_s"]["p50"] == pytest.approx(0.1) and figures["ttft_s"]["p99"] == pytest.approx(0.1)
    assert figures["tpot_s"]["mean"] == pytest.approx(0.02) and figures["itl_s"]["max"] == pytest.approx(0.02)
    assert figures["e2e_s"]["p90"] == pytest.approx(0.18)
    assert figures["decode_tok_s_per_stream"]["p50"] == pytest.approx(50.0)
    assert figures["window_s"] == pytest.approx(1.8)
    assert figures["request_throughput"] == pytest.approx(10 / 1.8)
    assert figures["output_tok_s"] == pytest.approx(50 / 1.8)
    assert figures["decode_tok_s"] == pytest.approx(40 / 1.8)
    assert figures["input_tok_s"] == pytest.approx(1000 / 1.8)


def test_warmup_and_cooldown_leave_latency_out_but_window_tokens_in():
    slow_first = [scripted(0, 0.0, ttft=1.0)] + [scripted(i, 0.5 + (i - 1) * 0.18) for i in range(1, 10)]
    figures = run_figures(slow_first, warmup=1, cooldown=0.1)
    assert [r.index for r in counted_records(slow_first, 1, 0.1)] == list(range(1, 9))
    assert figures["ttft_s"]["max"] == pytest.approx(0.1)  # the slow warm-up request is not a percentile
    lo, hi = 0.5, 0.5 + 7 * 0.18 + 0.18  # first counted start .. last counted end
    assert figures["window_s"] == pytest.approx(hi - lo)
    # request 0's tokens at 1.0..1.08 fall inside the window and count; request 9's all arrive after it
    assert figures["output_tok_s"] == pytest.approx((8 * 5 + 5) / (hi - lo))


def test_chunks_carrying_several_tokens_are_weighted():
    record = RequestRecord(ok=True, index=0, start=0.0, prompt_tokens=10, output_tokens=9, ttft=0.1, e2e=0.5,
                           chunk_times=[0.1, 0.3, 0.5])  # first token, then 4 tokens per chunk
    figures = run_figures([record])
    assert figures["decode_tok_s"] == pytest.approx(8 / 0.5) and figures["output_tok_s"] == pytest.approx(9 / 0.5)
    assert figures["tpot_s"]["p50"] == pytest.approx(0.4 / 8) and figures["itl_s"]["p50"] == pytest.approx(0.2)


def test_errors_and_cancellations_are_counted_not_crashed_on():
    records = [scripted(0, 0.0), RequestRecord(ok=False, index=1, start=0.1, status=500, error="500: boom"),
               RequestRecord(ok=False, index=2, start=0.2, error="ClientConnectorError: refused"),
               RequestRecord(ok=False, index=3, start=0.3, cancelled=True, error="cancelled")]
    figures = run_figures(records)
    assert figures["errors"]["count"] == 2 and figures["requests"]["cancelled"] == 1
    assert figures["errors"]["by_status"] == {"500": 1, "no response": 1}
    assert figures["requests"]["ok"] == 1 and figures["ttft_s"]["p50"] == pytest.approx(0.1)
    assert run_figures([records[1]])["output_tok_s"] is None  # nothing succeeded: no throughput, no crash


def test_goodput_counts_requests_within_every_slo():
    records = [scripted(i, i * 0.5, ttft=0.1 * (i + 1)) for i in range(4)]  # TTFT 0.1 .. 0.4
    good = run_figures(records, slos=[SLO.parse("ttft=250ms"), SLO.parse("tpot:30")])["goodput"]
    assert good["requests"] == 2 and good["fraction"] == 0.5
    assert good["slos"] == ["ttft<=250ms", "tpot<=30ms"]
    assert SLO.parse("e2e=2s").limit_s == 2.0
    with pytest.raises(WorkloadError, match="ttft, tpot or e2e"):
        SLO.parse("latency=3")


def test_prefill_rates():
    single = [scripted(i, i * 1.0, ttft=0.2, tokens=1, prompt=400) for i in range(3)]
    many = [scripted(i, 0.0, ttft=0.5, tokens=1, prompt=400) for i in range(4)]
    figures = prefill_figures(single, many, concurrency=4)
    assert figures["single_stream_tok_s"] == pytest.approx(2000.0)
    assert figures["aggregate_tok_s"] == pytest.approx(1600 / 0.5)


def test_profiles_parse_and_sweep():
    assert parse_profiles("sync") == [Synchronous()]
    assert parse_profiles("concurrency:1,4") == [Concurrency(1), Concurrency(4)]
    assert parse_profiles("poisson:2", burstiness=0.5, max_concurrency=8) == [Poisson(2.0, 0.5, 8)]
    assert parse_profiles("constant:3") == [ConstantRate(3.0)]
    assert parse_profiles("concurrency:auto", max_concurrency=8) == [Concurrency(c) for c in (1, 2, 4, 8)]
    assert auto_concurrency(256)[-1] == 256
    for bad, message in [("ramp:3", "unknown load profile"), ("concurrency:0", "positive integer"),
                         ("poisson", "needs a value"), ("poisson:auto", "only concurrency:auto")]:
        with pytest.raises(WorkloadError, match=message):
            parse_profiles(bad)


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_poisson_gaps_have_the_mean_of_the_rate_and_the_burstiness_spread(burstiness):
    gaps = Poisson(4.0, burstiness).gaps(random.Random(0))
    sample = [next(gaps) for _ in range(20000)]
    assert statistics.fmean(sample) == pytest.approx(0.25, rel=0.05)
    # gamma(shape k): coefficient of variation 1/sqrt(k); burstier traffic spreads more
    assert statistics.pstdev(sample) / statistics.fmean(sample) == pytest.approx(burstiness ** -0.5, rel=0.08)


def test_saturation():
    assert Concurrency(8).saturated({"output_tok_s": 102.0}, best_output_tok_s=100.0, min_gain=0.05)
    assert not Concurrency(8).saturated({"output_tok_s": 150.0}, best_output_tok_s=100.0, min_gain=0.05)
    assert Poisson(10.0).saturated({"request_throughput": 7.0}, 0.0, 0.05)
    assert not ConstantRate(10.0).saturated({"request_throughput": 9.8}, 0.0, 0.05)


def test_length_distributions():
    rng = random.Random(0)
    assert LengthDist.parse("64").sample(rng) == 64
    assert {LengthDist.parse("uniform:10:12").sample(rng) for _ in range(200)} == {10, 11, 12}
    assert min(LengthDist.parse("normal:5:50").sample(rng) for _ in range(200)) == 1
    for bad in ("x", "uniform:5", "uniform:9:3", "0", "gauss:1:2"):
        with pytest.raises(WorkloadError):
            LengthDist.parse(bad)


class WordTokenizer:
    """Each word is a token (its position in a growing vocabulary)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def decode(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return " ".join(inverse[i] for i in ids)


def test_synthetic_prompts_have_exact_lengths_and_a_shared_prefix(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(1000)))
    specs = synthetic(text, LengthDist.parse("40"), LengthDist.parse("7"), shared_prefix=0.5,
                      tokenizer=WordTokenizer(), seed=1)
    a, b = next(specs), next(specs)
    assert len(a.token_ids) == len(b.token_ids) == 40 and a.max_tokens == 7
    assert a.token_ids[:20] == b.token_ids[:20] and a.token_ids[20:] != b.token_ids[20:]
    words = next(synthetic(text, LengthDist.parse("40"), LengthDist.parse("7")))
    assert words.token_ids is None and len(words.text.split()) == 30  # no tokenizer: 0.75 words per token
    with pytest.raises(WorkloadError, match="fraction"):
        next(synthetic(text, LengthDist.parse("4"), LengthDist.parse("4"), shared_prefix=1.0))


def test_prompt_files_and_sharegpt(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "hello", "max_tokens": 3}\n{"prompt": "bye"}\n')
    specs = prompt_file(jsonl, LengthDist.parse("9"))
    assert [(s.text, s.max_tokens) for s in (next(specs), next(specs), next(specs))] == \
        [("hello", 3), ("bye", 9), ("hello", 3)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(WorkloadError, match="bad.jsonl:2"):
        next(prompt_file(bad, LengthDist.parse("9")))
    conv = tmp_path / "sg.json"
    conv.write_text('[{"conversations": [{"from": "human", "value": "why is the sky blue"},'
                    '{"from": "gpt", "value": "one two three four five six"}]}, {"conversations": []}]')
    spec = next(sharegpt(conv))
    assert spec.text == "why is the sky blue" and spec.max_tokens == 8  # 6 words / 0.75
    conv.write_text("[]")
    with pytest.raises(WorkloadError, match="no human/assistant"):
        next(sharegpt(conv))
