"""Tasks read from the Hugging Face hub through ``datasets``, where it is installed and a network exists:
``hub:arc_easy``, ``hub:piqa``, ``hub:boolq``, ``hub:hellaswag``, each turned into the same items (and
lm-evaluation-harness prompts) as the local files give."""

from __future__ import annotations

import re
from typing import Any, Callable

from accuracy.tasks import Item, Task, TaskError

HUB_PREFIX = "hub:"


def _arc(r: dict[str, Any]) -> Item:
    labels = list(r["choices"]["label"])
    return Item(f"Question: {r['question']}\nAnswer:", tuple(" " + t for t in r["choices"]["text"]),
                labels.index(r["answerKey"]))


def _piqa(r: dict[str, Any]) -> Item:
    return Item(f"Question: {r['goal']}\nAnswer:", (" " + r["sol1"], " " + r["sol2"]), int(r["label"]))


def _boolq(r: dict[str, Any]) -> Item:
    return Item(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", (" no", " yes"), int(bool(r["answer"])))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(r: dict[str, Any]) -> Item:
    context = _hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
    return Item(context, tuple(" " + _hellaswag_clean(e) for e in r["endings"]), int(r["label"]))


# name -> (dataset, config, split, record -> item)
HUB: dict[str, tuple[str, str | None, str, Callable[[dict[str, Any]], Item]]] = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", _arc),
    "piqa": ("ybisk/piqa", None, "validation", _piqa),
    "boolq": ("google/boolq", None, "validation", _boolq),
    "hellaswag": ("Rowan/hellaswag", None, "validation", _hellaswag),
}


def load_hub_task(spec: str) -> Task:
    """``hub:NAME`` through ``datasets``; a clear error where the package or the network is missing."""
    name = spec.removeprefix(HUB_PREFIX)
    if name not in HUB:
        raise TaskError(f"unknown hub task {name!r}; choose one of {', '.join('hub:' + n for n in HUB)}")
    try:
        import datasets
    except ImportError:
        raise TaskError(f"{spec} needs the 'datasets' package (pip install datasets) and a network; the local "
                        f"tasks (arc_easy, piqa, boolq, lambada, gsm8k) need neither") from None
    dataset, config, split, convert = HUB[name]
    try:
        rows = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth and missing-dataset errors alike
        raise TaskError(f"cannot load {dataset} ({type(exc).__name__}: {str(exc)[:200]}); is the hub reachable?") \
            from None
    return Task(name, "choice", tuple(convert(r) for r in rows))
