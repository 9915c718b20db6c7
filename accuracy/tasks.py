"""Evaluation tasks read from local files: a registry of named loaders (the shared data's ARC-Easy,
PIQA, BoolQ, LAMBADA and GSM8K, with lm-evaluation-harness's prompts) and a generic JSONL format.

A task is a list of items of one kind: ``choice`` items (context, choices, answer index) scored by
log-likelihood; ``last_word`` items (context, continuation) scored by whether greedy decoding would
produce the continuation; ``generation`` items (question, reference answer) scored by exact match of
the final number through the chat endpoint. A malformed line is rejected with its file and line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

Kind = Literal["choice", "last_word", "generation"]


class TaskError(ValueError):
    """A task name or file that cannot be used; the message names the file, line and fix."""


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...] = ()  # continuations (choice items); the one continuation (last_word)
    answer: int = 0  # index of the right choice
    reference: str = ""  # generation items: the reference answer


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    items: tuple[Item, ...]


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.exists():
        raise TaskError(f"task file {path} does not exist")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}:{number}: expected a JSON object per line")
            yield number, record


def _field(path: Path, number: int, record: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or (isinstance(value, (str, list)) and not value):
        raise TaskError(f"{path}:{number}: field {key!r} is missing, empty or of the wrong type "
                        f"(expected {getattr(kind, '__name__', kind)})")
    return value


def _spaced(context: str, choice: str) -> str:
    """A continuation that joins its context with one space, unless the context ends with whitespace."""
    return choice if context[-1:].isspace() or choice[:1].isspace() else " " + choice


def load_generic(path: Path) -> Task:
    """``{"question": str, "choices": [str, ...], "answer": int}`` per line: a multiple-choice task whose
    context is the question as written and whose continuations are the choices."""
    items = []
    for number, r in _lines(path):
        question = _field(path, number, r, "question", str)
        choices = _field(path, number, r, "choices", list)
        answer = r.get("answer")
        if not all(isinstance(c, str) and c for c in choices) or len(choices) < 2:
            raise TaskError(f"{path}:{number}: 'choices' must be two or more non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise TaskError(f"{path}:{number}: 'answer' must be the index of the right choice, 0..{len(choices) - 1}")
        items.append(Item(question, tuple(_spaced(question, c) for c in choices), answer))
    return Task(path.stem, "choice", tuple(items))


def _arc(path: Path) -> Task:
    items = []
    for number, r in _lines(path):
        q = _field(path, number, r, "question", dict)
        labels = [c["label"] for c in q["choices"]]
        if r.get("answerKey") not in labels:
            raise TaskError(f"{path}:{number}: answerKey {r.get('answerKey')!r} is not one of the labels {labels}")
        context = f"Question: {q['stem']}\nAnswer:"
        items.append(Item(context, tuple(" " + c["text"] for c in q["choices"]), labels.index(r["answerKey"])))
    return Task("arc_easy", "choice", tuple(items))


def _piqa(path: Path) -> Task:
    labels_path = path.with_name(path.stem + "_labels.lst")
    if not labels_path.exists():
        raise TaskError(f"PIQA needs its labels beside the questions: {labels_path} does not exist")
    labels = labels_path.read_text().split()
    items = []
    for (number, r), label in zip(_lines(path), labels):
        context = f"Question: {_field(path, number, r, 'goal', str)}\nAnswer:"
        items.append(Item(context, (" " + r["sol1"], " " + r["sol2"]), int(label)))
    return Task("piqa", "choice", tuple(items))


def _boolq(path: Path) -> Task:
    items = []
    for number, r in _lines(path):
        context = f"{_field(path, number, r, 'passage', str)}\nQuestion: {_field(path, number, r, 'question', str)}?\nAnswer:"
        label = str(r.get("label")).lower()
        if label not in ("true", "false"):
            raise TaskError(f"{path}:{number}: 'label' must be true or false, not {r.get('label')!r}")
        items.append(Item(context, (" no", " yes"), int(label == "true")))
    return Task("boolq", "choice", tuple(items))


def _lambada(path: Path) -> Task:
    items = []
    for number, r in _lines(path):
        text = _field(path, number, r, "text", str)
        context, _, word = text.rpartition(" ")
        if not context:
            raise TaskError(f"{path}:{number}: 'text' needs at least two words")
        items.append(Item(context, (" " + word,)))
    return Task("lambada", "last_word", tuple(items))


def _gsm8k(path: Path) -> Task:
    items = []
    for number, r in _lines(path):
        answer = _field(path, number, r, "answer", str)
        if "####" not in answer:
            raise TaskError(f"{path}:{number}: 'answer' must end with '#### <number>'")
        items.append(Item(_field(path, number, r, "question", str), reference=answer))
    return Task("gsm8k", "generation", tuple(items))


# name -> (file under the data directory, loader)
BUILTIN: dict[str, tuple[str, Callable[[Path], Task]]] = {
    "arc_easy": ("arc_easy_test.jsonl", _arc),
    "piqa": ("piqa_dev.jsonl", _piqa),
    "boolq": ("boolq_dev.jsonl", _boolq),
    "lambada": ("lambada_openai_test.jsonl", _lambada),
    "gsm8k": ("gsm8k_test.jsonl", _gsm8k),
}


def load_task(spec: str, limit: Optional[int] = None) -> Task:
    """A built-in task by name (read from the shared data directory) or a generic JSONL file by path."""
    from core.data import data_file

    if spec.startswith("hub:"):
        from accuracy.hub_tasks import load_hub_task

        task = load_hub_task(spec)
    elif spec in BUILTIN:
        filename, loader = BUILTIN[spec]
        task = loader(data_file(filename))
    elif spec.endswith(".jsonl") or Path(spec).exists():
        task = load_generic(Path(spec))
    else:
        raise TaskError(f"unknown task {spec!r}; choose one of {', '.join(BUILTIN)}, wikitext, hub:NAME (arc_easy, "
                        f"piqa, boolq, hellaswag through datasets), or a .jsonl file of "
                        f"{{\"question\", \"choices\", \"answer\"}} lines")
    if not task.items:
        raise TaskError(f"task {spec!r} has no items")
    return Task(task.name, task.kind, task.items[:limit] if limit else task.items)
