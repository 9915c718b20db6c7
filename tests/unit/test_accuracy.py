"""Evaluation arithmetic on hand-computed cases, task files, and the whole client against an endpoint
with scripted log-probabilities (the real-vLLM checks are in tests/integration/test_accuracy.py)."""

from __future__ import annotations

import json
import math

import pytest

from accuracy import scoring
from accuracy.tasks import TaskError, load_generic, load_task
from core.client import EndpointError
from tests.fake_backend import running_app
from tests.fake_scorer import logprob, make_fake_scorer


class CharTokenizer:
    """One token per character (its code point); BOS 1, EOS 2."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def scorer_url():
    with running_app(make_fake_scorer()) as url:
        yield url


# --- windows and normalisations -------------------------------------------------------------------------

def test_rolling_windows_score_every_token_once():
    windows = scoring.rolling_windows([10, 11, 12, 13, 14, 15, 16], seq_len=4, prefix_token=0)
    assert [(w.ids, w.scored) for w in windows] == [((0, 10, 11, 12), 3), ((12, 13, 14, 15), 3), ((15, 16), 1)]
    assert scoring.rolling_windows([5], 4, 0)[0].ids == (0, 5)
    with pytest.raises(ValueError, match="at least 2"):
        scoring.rolling_windows([1, 2], 1, 0)


def test_perplexity_figures_by_hand():
    figures = scoring.perplexity_figures([-1.0, -2.0, -3.0], "ab cé")  # 6 nats, 3 tokens, 2 words, 6 bytes
    assert (figures.tokens, figures.words, figures.bytes) == (3, 2, 6)
    assert figures.token_perplexity == pytest.approx(math.e ** 2)
    assert figures.word_perplexity == pytest.approx(math.e ** 3)
    assert figures.byte_perplexity == pytest.approx(math.e)
    assert figures.bits_per_byte == pytest.approx(1 / math.log(2))


def test_words_are_counted_like_lm_evaluation_harness():
    assert scoring.count_words("a b\n\nc") == 3
    assert scoring.count_words(" a b ") == 4  # re.split keeps the empty ends, as the harness does


def test_choice_metrics_normalise_by_characters():
    assert scoring.choice_metrics([-5.0, -4.0], ["a", "longer"], 1) == {"acc": 1.0, "acc_norm": 1.0}
    # raw log-likelihood prefers the short choice; per character the long one wins
    assert scoring.choice_metrics([-2.0, -3.0], ["ab", "abcdefghij"], 1) == {"acc": 0.0, "acc_norm": 1.0}


def test_agreement_with_itself_is_exact_and_kl_matches_a_hand_case():
    dist = {"a": math.log(0.6), "b": math.log(0.3)}
    assert scoring.token_agreement(dist, dict(dist)) == (True, 0.0)
    other = {"a": math.log(0.3), "b": math.log(0.6)}
    agree, kl = scoring.token_agreement(dist, other)
    expected = 0.6 * math.log(0.6 / 0.3) + 0.3 * math.log(0.3 / 0.6) + 0.1 * math.log(0.1 / 0.1)
    assert not agree and kl == pytest.approx(expected)


@pytest.mark.parametrize("text, number", [("so #### 1,234", "1234"), ("$18.", "18"), ("it is -3.5 kg", "-3.5"),
                                          ("18.0", "18"), ("no number", None)])
def test_final_number_extraction(text, number):
    assert scoring.extract_number(text) == number


# --- task files -----------------------------------------------------------------------------------------

def test_generic_tasks_load_and_malformed_lines_name_their_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "2+2=", "choices": ["4", "5"], "answer": 0}) + "\n\n")
    task = load_generic(good)
    assert task.kind == "choice" and task.items[0].choices == (" 4", " 5")
    for line, message in [("{not json", "not valid JSON"), ('{"question": "q", "choices": ["a"], "answer": 0}',
                                                              "two or more"),
                          ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "index of the right choice"),
                          ('{"choices": ["a", "b"], "answer": 0}', "'question' is missing")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good.read_text() + line + "\n")
        with pytest.raises(TaskError, match=rf"bad.jsonl:3: .*{message}"):
            load_generic(bad)


def test_builtin_tasks_read_the_shared_data():
    arc = load_task("arc_easy", limit=3)
    assert arc.items[0].context.startswith("Question: Which statement") and arc.items[0].answer == 0
    assert len(load_task("piqa", limit=5).items) == 5 and load_task("boolq", limit=1).items[0].choices == (" no", " yes")
    lambada = load_task("lambada", limit=1).items[0]
    assert lambada.choices == (" signs",) and not lambada.context.endswith(" ")
    assert load_task("gsm8k", limit=1).items[0].reference.endswith("#### 18")
    with pytest.raises(TaskError, match="unknown task 'mmlu'"):
        load_task("mmlu")


def test_encode_pair_moves_trailing_space_to_the_continuation():
    from accuracy.task_runner import encode_pair

    context, continuation = encode_pair(CharTokenizer(), "Answer: ", "yes")
    assert CharTokenizer().decode(context) == "Answer:" and CharTokenizer().decode(continuation) == " yes"


# --- the client against scripted log-probabilities -------------------------------------------------------

def test_endpoint_perplexity_equals_the_scripted_figures(scorer_url, tmp_path, monkeypatch):
    from accuracy import perplexity

    monkeypatch.setattr(perplexity, "load_tokenizer", lambda source: CharTokenizer())
    text = tmp_path / "t.txt"
    text.write_text("hello world, hello ü")
    result = perplexity.endpoint_perplexity(scorer_url, text, "chars", "scorer", seq_len=8, concurrency=3,
                                            progress=False)
    ids = [ord(c) for c in text.read_text()]
    nll = -sum(logprob(t) for t in ids)
    assert result["tokens"] == len(ids) and result["windows"] == math.ceil(len(ids) / 7)
    assert result["nll"] == pytest.approx(nll)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / 4))
    assert result["bits_per_byte"] == pytest.approx(nll / (len(text.read_text().encode()) * math.log(2)))
    capped = perplexity.endpoint_perplexity(scorer_url, text, "chars", "scorer", seq_len=8, max_windows=1,
                                            progress=False)
    assert capped["tokens"] == 7 and capped["words"] == 2 and capped["bytes"] == 7  # "hello w"


def test_an_endpoint_without_prompt_logprobs_says_what_is_needed(scorer_url, tmp_path, monkeypatch):
    from accuracy import perplexity

    monkeypatch.setattr(perplexity, "load_tokenizer", lambda source: CharTokenizer())
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(EndpointError, match="no prompt log-probabilities.*echo: true.*logprobs"):
        perplexity.endpoint_perplexity(scorer_url, tmp_path / "t.txt", "c", "nologprobs", progress=False)


def test_too_many_logprobs_names_the_server_option(scorer_url, tmp_path, monkeypatch):
    from accuracy import agreement, perplexity

    monkeypatch.setattr(perplexity, "load_tokenizer", lambda source: CharTokenizer())
    monkeypatch.setattr(agreement, "load_tokenizer", lambda source: CharTokenizer())
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(EndpointError, match="--max-logprobs"):
        agreement.endpoint_agreement(scorer_url, scorer_url, tmp_path / "t.txt", "c", "scorer", "scorer", top_k=50,
                                     progress=False)


def test_agreement_of_an_endpoint_with_itself_and_with_a_shifted_one(scorer_url, tmp_path, monkeypatch):
    from accuracy import agreement

    monkeypatch.setattr(agreement, "load_tokenizer", lambda source: CharTokenizer())
    (tmp_path / "t.txt").write_text("agreement is measured per position")
    same = agreement.endpoint_agreement(scorer_url, scorer_url, tmp_path / "t.txt", "c", "scorer", "scorer",
                                        seq_len=8, progress=False)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == 0.0 and same["positions"] == 34
    shifted = agreement.endpoint_agreement(scorer_url, scorer_url, tmp_path / "t.txt", "c", "shifted", "scorer",
                                           seq_len=8, progress=False)
    assert shifted["mean_logprob_delta"] == pytest.approx(-0.5) and shifted["mean_kl"] > 0


def test_tasks_through_the_scripted_endpoint(scorer_url, tmp_path):
    from accuracy.task_runner import run_task

    tasks = tmp_path / "mc.jsonl"
    # " b" scores -0.25 - 0.85 = -1.10 against -0.25 - 0.95 = -1.20 for " c": the first choice wins
    tasks.write_text(json.dumps({"question": "Q:", "choices": ["b", "c"], "answer": 0}) + "\n" +
                     json.dumps({"question": "Q:", "choices": ["b", "c"], "answer": 1}) + "\n")
    result = run_task(scorer_url, "scorer", CharTokenizer(), load_generic(tasks), progress=False)
    assert result["metrics"]["acc"] == 0.5 and result["metrics"]["acc_stderr"] == pytest.approx(0.5)
    gsm = run_task(scorer_url, "scorer", CharTokenizer(), load_task("gsm8k", limit=2), progress=False)
    assert gsm["metrics"]["exact_match"] == 0.5  # the first reference is 18, the second is not


def test_markdown_report_shows_baseline_and_deltas():
    from accuracy.runner import deltas, markdown

    results = {"wikitext": {"token_perplexity": 21.0, "word_perplexity": 60.0, "bits_per_byte": 0.9}}
    base = {"wikitext": {"token_perplexity": 20.0, "word_perplexity": 58.0, "bits_per_byte": 0.88}}
    report = {"results": results, "baseline_results": base, "deltas": deltas(results, base)}
    assert "| wikitext | token_perplexity | 21.0000 | 20.0000 | +1.0000 |" in markdown(report)


def test_lm_eval_bridge_builds_a_local_completions_command_and_says_when_it_is_missing(monkeypatch):
    import importlib.util

    from accuracy.harness import lm_eval_command, run_lm_eval

    cmd = lm_eval_command("http://h:8000/v1", "m", "/ckpt", "arc_easy", limit=10)
    assert cmd[cmd.index("--model") + 1] == "local-completions" and "--limit" in cmd
    assert "base_url=http://h:8000/v1/completions" in cmd[cmd.index("--model_args") + 1]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EndpointError, match="pip install 'lm-eval"):
        run_lm_eval("http://h:8000", "m", "/ckpt", "arc_easy")


def test_hub_tasks_give_the_local_items_and_say_what_they_need(monkeypatch):
    import sys

    from accuracy.hub_tasks import HUB, load_hub_task

    from core.data import data_file

    local = load_task("arc_easy", limit=1).items[0]
    record = json.loads(data_file("arc_easy_test.jsonl").read_text().splitlines()[0])
    hub_record = {"question": record["question"]["stem"], "answerKey": record["answerKey"],
                  "choices": {"text": [c["text"] for c in record["question"]["choices"]],
                              "label": [c["label"] for c in record["question"]["choices"]]}}
    assert HUB["arc_easy"][3](hub_record) == local
    hellaswag = HUB["hellaswag"][3]({"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
                                     "endings": ["bakes [title] bread.", "sleeps."], "label": "0"})
    assert hellaswag.context == "Baking: A man mixes flour. He" and hellaswag.answer == 0
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TaskError, match="needs the 'datasets' package"):
        load_hub_task("hub:piqa")
    with pytest.raises(TaskError, match="unknown hub task 'mmlu'"):
        load_task("hub:mmlu")
