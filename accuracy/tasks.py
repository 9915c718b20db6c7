"""Evaluation tasks read from local files: a registry of named loaders (the shared data's ARC-Easy,
PIQA, BoolQ, LAMBADA and GSM8K, with lm-evaluation-harness's prompts) and file formats read by path (a
generic JSONL, AI2's ARC JSONL, WinoGrande's JSONL), told apart by their first record.

A task is a list of items of one kind: ``choice`` items (context, choices, answer index) scored by
log-likelihood; ``partial`` items (alternative contexts, one shared continuation: WinoGrande's partial
scoring) scored by the continuation's log-likelihood after each context; ``last_word`` items (context,
continuation) scored by whether greedy decoding would produce the continuation; ``generation`` items
(question, reference answer) scored by exact match of the final number through the chat endpoint. A
malformed line is rejected with its file and line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

Kind = Literal["choice", "partial", "last_word", "generation"]


class TaskError(ValueError):
    """A task name or file that cannot be used; the message names the file, line and fix."""


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...] = ()  # continuations (choice); contexts (partial); the one continuation (last_word)
    answer: int = 0  # index of the right choice
    reference: str = ""  # generation items: the reference answer
    continuation: str = ""  # partial items: the continuation every context is scored on


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


def _answer(path: Path, number: int, answer: Any, count: int) -> int:
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < count:
        raise TaskError(f"{path}:{number}: 'answer' must be the index of the right choice, 0..{count - 1}")
    return answer


def _strings(path: Path, number: int, values: list, key: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) and v for v in values) or len(values) < 2:
        raise TaskError(f"{path}:{number}: {key!r} must be two or more non-empty strings")
    return tuple(values)


def load_generic(path: Path) -> Task:
    """Multiple choice, one item per line, of either form (all lines alike):

    - ``{"question": str, "choices": [str, ...], "answer": int}``: the question is the context as written and
      the choices its continuations;
    - ``{"contexts": [str, ...], "continuation": str, "answer": int}``: partial scoring, as WinoGrande's: the
      one continuation scored after each context (joined with one space, as lm-evaluation-harness joins them).
    """
    items, kinds = [], set()
    for number, r in _lines(path):
        if "contexts" in r:
            contexts = _strings(path, number, _field(path, number, r, "contexts", list), "contexts")
            continuation = _field(path, number, r, "continuation", str)
            items.append(Item("", contexts, _answer(path, number, r.get("answer"), len(contexts)),
                              continuation=" " + continuation.lstrip()))
            kinds.add("partial")
        else:
            question = _field(path, number, r, "question", str)
            choices = _strings(path, number, _field(path, number, r, "choices", list), "choices")
            items.append(Item(question, tuple(_spaced(question, c) for c in choices),
                              _answer(path, number, r.get("answer"), len(choices))))
            kinds.add("choice")
        if len(kinds) > 1:
            raise TaskError(f"{path}:{number}: mixes question/choices lines with contexts/continuation lines; "
                            f"put each kind in its own file")
    return Task(path.stem, kinds.pop() if kinds else "choice", tuple(items))


def _winogrande(path: Path) -> Task:
    """WinoGrande's JSONL (``sentence`` with one ``_``, ``option1``, ``option2``, ``answer`` "1"/"2"), split as
    lm-evaluation-harness splits it: each option fills the blank in the context, the rest of the sentence after
    the blank is the continuation scored."""
    items = []
    for number, r in _lines(path):
        sentence = _field(path, number, r, "sentence", str)
        if sentence.count("_") != 1:
            raise TaskError(f"{path}:{number}: 'sentence' must hold exactly one '_' (the blank the options fill)")
        if str(r.get("answer")) not in ("1", "2"):
            raise TaskError(f"{path}:{number}: 'answer' must be 1 or 2, not {r.get('answer')!r}")
        blank = sentence.index("_")
        options = (_field(path, number, r, "option1", str), _field(path, number, r, "option2", str))
        items.append(Item("", tuple(sentence[:blank] + o for o in options), int(str(r["answer"])) - 1,
                          continuation=" " + sentence[blank + 1:].strip()))
    return Task(path.stem, "partial", tuple(items))


def _arc(path: Path, name: str = "arc_easy") -> Task:
    """AI2's ARC JSONL (ARC-Easy or ARC-Challenge): ``question.stem``, ``question.choices`` with labels,
    ``answerKey``."""
    items = []
    for number, r in _lines(path):
        q = _field(path, number, r, "question", dict)
        if not isinstance(q.get("stem"), str) or not isinstance(q.get("choices"), list) or \
                not all(isinstance(c, dict) and "label" in c and "text" in c for c in q["choices"]):
            raise TaskError(f"{path}:{number}: an ARC question needs 'stem' and 'choices' of {{'label', 'text'}}")
        labels = [c["label"] for c in q["choices"]]
        if r.get("answerKey") not in labels:
            raise TaskError(f"{path}:{number}: answerKey {r.get('answerKey')!r} is not one of the labels {labels}")
        context = f"Question: {q['stem']}\nAnswer:"
        items.append(Item(context, tuple(" " + c["text"] for c in q["choices"]), labels.index(r["answerKey"])))
    return Task(name, "choice", tuple(items))


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


# file formats read by path, told apart by the first record: (name, test on the record, loader)
FILE_FORMATS: list[tuple[str, Callable[[dict], bool], Callable[[Path], Task]]] = [
    ("arc", lambda r: isinstance(r.get("question"), dict) and "answerKey" in r, lambda p: _arc(p, p.stem)),
    ("winogrande", lambda r: {"sentence", "option1", "option2"} <= set(r), _winogrande),
    ("generic", lambda r: True, load_generic),
]


def load_file(path: Path) -> Task:
    """A task file by path, in whichever of FILE_FORMATS its first record has."""
    first = next(_lines(path), (0, {}))[1]
    return next(loader for _, matches, loader in FILE_FORMATS if matches(first))(path)


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
        task = load_file(Path(spec))
    else:
        raise TaskError(f"unknown task {spec!r}; choose one of {', '.join(BUILTIN)}, wikitext, hub:NAME (arc_easy, "
                        f"piqa, boolq, hellaswag through datasets), or a .jsonl file: "
                        f"{{\"question\", \"choices\", \"answer\"}} or {{\"contexts\", \"continuation\", "
                        f"\"answer\"}} lines, AI2's ARC or WinoGrande's format")
    if not task.items:
        raise TaskError(f"task {spec!r} has no items")
    return Task(task.name, task.kind, task.items[:limit] if limit else task.items)
