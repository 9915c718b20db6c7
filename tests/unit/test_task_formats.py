"""Task files read by path: WinoGrande-style partial scoring (alternative contexts, one continuation) and AI2's
ARC JSONL, checked request by request and score by score against lm-evaluation-harness's own task code run on
the same records."""

from __future__ import annotations

import json
import random

import pytest

from accuracy.task_runner import _choice_summary, scored_pairs
from accuracy.tasks import TaskError, load_task
from core.data import data_file

WINOGRANDE = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
     "option1": "Sarah", "option2": "Maria", "answer": "1"},
    {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
     "option1": "trophy", "option2": "suitcase", "answer": "1"},
    {"sentence": "I poured water from the bottle into the cup until _ was full.", "option1": "the bottle",
     "option2": "the cup", "answer": "2"},
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _harness_task(tmp_path, path, **config):
    """lm-evaluation-harness's ConfigurableTask over a local JSONL file (datasets' cache kept in tmp_path)."""
    task_module = pytest.importorskip("lm_eval.api.task", reason="lm-evaluation-harness is not installed "
                                                                 "(scripts/setup.sh installs it with the dev extra)")
    task = task_module.ConfigurableTask(config={
        "task": path.stem, "dataset_path": "json", "validation_split": "validation", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"validation": str(path)}, "cache_dir": str(tmp_path / "hf")}, **config})
    task.build_all_requests(rank=0, world_size=1)
    return task


def _compare(task, harness, metrics):
    """Same (context, continuation) requests in the same order, and the same per-item metrics for random scores."""
    requests = sorted(harness.instances, key=lambda i: (i.doc_id, i.idx))
    assert scored_pairs(task) == [i.arguments for i in requests]
    rng = random.Random(0)
    docs = list(harness.eval_docs)
    for _ in range(20):
        lls = [rng.uniform(-20, 0) for _ in requests]
        ours = _choice_summary(task, [(ll, False) for ll in lls])
        theirs, at = {m: [] for m in metrics}, 0
        for doc, item in zip(docs, task.items):
            result = harness.process_results(doc, [(ll, False) for ll in lls[at:at + len(item.choices)]])
            at += len(item.choices)
            for m in metrics:
                theirs[m].append(result[m])
        assert set(ours) == {*metrics, *(f"{m}_stderr" for m in metrics)}
        for m in metrics:
            assert ours[m] == pytest.approx(sum(theirs[m]) / len(theirs[m]))


def test_winogrande_files_score_as_the_harness_scores_them(tmp_path):
    path = _jsonl(tmp_path / "winogrande_dev.jsonl", WINOGRANDE)
    task = load_task(str(path))
    assert task.kind == "partial" and task.name == "winogrande_dev" and [i.answer for i in task.items] == [0, 0, 1]
    from lm_eval.tasks.winogrande import preprocess_winogrande as wg

    harness = _harness_task(tmp_path, path, doc_to_text=wg.doc_to_text, doc_to_target=wg.doc_to_target,
                            doc_to_choice=wg.doc_to_choice, metric_list=[{"metric": "acc"}])
    _compare(task, harness, ["acc"])


def test_the_generic_partial_form_is_the_same_task_as_winogrande(tmp_path):
    records = []
    for r in WINOGRANDE:
        blank = r["sentence"].index("_")
        records.append({"contexts": [r["sentence"][:blank] + r["option1"], r["sentence"][:blank] + r["option2"]],
                        "continuation": r["sentence"][blank + 1:].strip(), "answer": int(r["answer"]) - 1})
    generic = load_task(str(_jsonl(tmp_path / "g.jsonl", records)))
    native = load_task(str(_jsonl(tmp_path / "w.jsonl", WINOGRANDE)))
    assert generic.kind == "partial" and generic.items == native.items


def test_arc_files_load_by_path_and_score_as_the_harness_scores_them(tmp_path):
    lines = data_file("arc_easy_test.jsonl").read_text().splitlines()[:12]
    path = tmp_path / "ARC-Challenge-Test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    task = load_task(str(path))
    assert task.name == "ARC-Challenge-Test" and task.items == load_task("arc_easy", limit=12).items
    # the harness's ARC task reads the Hugging Face layout of the same records, with its arc_easy.yaml prompts
    hf = tmp_path / "arc_hf.jsonl"
    _jsonl(hf, [{"question": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}}
                for r in map(json.loads, lines)])
    harness = _harness_task(tmp_path, hf, doc_to_text="Question: {{question}}\nAnswer:",
                            doc_to_target="{{choices.label.index(answerKey)}}", doc_to_choice="{{choices.text}}",
                            metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    _compare(task, harness, ["acc", "acc_norm"])


@pytest.mark.parametrize("records, message", [
    ([{"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}], "exactly one '_'"),
    ([{"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"}], "'answer' must be 1 or 2"),
    ([{"contexts": ["a", "b"], "continuation": "c", "answer": 0}, {"question": "q", "choices": ["a", "b"], "answer": 0}],
     r"g.jsonl:2: mixes question/choices lines with contexts/continuation lines"),
    ([{"contexts": ["only one"], "continuation": "c", "answer": 0}], "'contexts' must be two or more"),
    ([{"question": {"stem": "q"}, "answerKey": "A"}], "an ARC question needs 'stem' and 'choices'"),
])
def test_malformed_task_files_name_the_line_and_the_fix(tmp_path, records, message):
    with pytest.raises(TaskError, match=message):
        load_task(str(_jsonl(tmp_path / "g.jsonl", records)))
