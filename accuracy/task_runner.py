"""Scoring a task's items against a served endpoint.

Choice and last-word items are scored by the log-likelihood the server gives the continuation after
its context (one ``echo`` request per continuation, tokenized here as lm-evaluation-harness does: the
context's trailing whitespace moves to the continuation and the pair is encoded whole); generation
items by the exact match of the final number of the chat answer.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Optional

from accuracy.client import chat_answer, score_prompt
from accuracy.perplexity import client_for, gather_limited
from accuracy.scoring import choice_metrics, extract_number
from accuracy.tasks import Task
from core.client import base_url, check_endpoint, resolve_api_key

GENERATION_INSTRUCTION = "\nSolve the problem, then give the final answer as a number after '####'."


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split where lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[:len(context_ids)], whole[len(context_ids):]


def _mean_with_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


async def _continuation_scores(client, url: str, model: str, tokenizer, context: str,
                               continuation: str) -> tuple[float, bool]:
    context_ids, cont_ids = encode_pair(tokenizer, context, continuation)
    scores = await score_prompt(client, url, model, context_ids + cont_ids)
    n = len(cont_ids)
    return sum(scores.logprobs[-n:]), all(scores.greedy[-n:])


def _choice_summary(task: Task, results: list[tuple[float, bool]]) -> dict[str, Any]:
    """``acc`` and ``acc_norm`` per item; partial items (one continuation for every context) only ``acc``, as
    lm-evaluation-harness reports WinoGrande: normalising by the continuation's length changes nothing there."""
    metrics: dict[str, list[float]] = {"acc": []} if task.kind == "partial" else {"acc": [], "acc_norm": []}
    at = 0
    for item in task.items:
        lls = [ll for ll, _ in results[at:at + len(item.choices)]]
        at += len(item.choices)
        for name, value in choice_metrics(lls, item.choices, item.answer).items():
            if name in metrics:
                metrics[name].append(value)
    return _summarise(metrics)


def scored_pairs(task: Task) -> list[tuple[str, str]]:
    """The (context, continuation) pairs whose log-likelihoods a choice or partial task needs, item by item."""
    if task.kind == "partial":
        return [(context, item.continuation) for item in task.items for context in item.choices]
    return [(item.context, c) for item in task.items for c in item.choices]


def _last_word_summary(results: list[tuple[float, bool]]) -> dict[str, Any]:
    summary = _summarise({"acc": [float(greedy) for _, greedy in results]})
    summary["perplexity"] = math.exp(-sum(ll for ll, _ in results) / len(results))
    return summary


def _summarise(metrics: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in metrics.items():
        out[name], out[f"{name}_stderr"] = _mean_with_stderr(values)
    return out


async def _run(url: str, model: Optional[str], tokenizer, task: Task, concurrency: int, max_tokens: int,
               progress: bool, api_key: str) -> tuple[str, dict[str, Any]]:
    url = base_url(url)
    async with client_for(url, api_key) as client:
        model = await check_endpoint(client, url, model)
        if task.kind == "generation":
            jobs = [lambda i=i: chat_answer(client, url, model, i.context + GENERATION_INSTRUCTION, max_tokens)
                    for i in task.items]
            answers = await gather_limited(jobs, concurrency, task.name, progress)
            found = [extract_number(a) for a in answers]
            hits = [float(f is not None and f == extract_number(i.reference)) for f, i in zip(found, task.items)]
            return model, _summarise({"exact_match": hits})
        pairs = scored_pairs(task)
        jobs = [lambda p=p: _continuation_scores(client, url, model, tokenizer, *p) for p in pairs]
        results = await gather_limited(jobs, concurrency, task.name, progress)
    return model, _last_word_summary(results) if task.kind == "last_word" else _choice_summary(task, results)


def run_task(url: str, model: Optional[str], tokenizer, task: Task, concurrency: int = 8, max_tokens: int = 256,
             progress: bool = True, api_key: Optional[str] = None) -> dict[str, Any]:
    """The task's metrics (each with its standard error) from the served model's answers; ``api_key``
    defaults to ``$OPENAI_API_KEY``."""
    start = time.perf_counter()
    model, metrics = asyncio.run(_run(url, model, tokenizer, task, concurrency, max_tokens, progress,
                                      resolve_api_key(api_key)))
    return {"task": task.name, "kind": task.kind, "items": len(task.items), "model": model, "metrics": metrics,
            "wall_s": time.perf_counter() - start}
