"""``evaluate_endpoint``: one call that evaluates a served model on a list of tasks, and, given a
baseline endpoint, evaluates it too and reports deltas and token agreement. Results are JSON (with a
schema version) and Markdown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

SCHEMA_VERSION = 1
PERPLEXITY_TASK = "wikitext"


@dataclass(frozen=True)
class Endpoint:
    """A served model: its URL, the name clients send (None: the first served) and the API key to send
    (None: ``$OPENAI_API_KEY``; for a baseline, the candidate's key). The key stays out of reports."""

    url: str
    model: Optional[str] = None
    api_key: Optional[str] = field(default=None, repr=False)

    def described(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model}


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how; ``tasks`` are built-in task names, ``wikitext`` (perplexity over
    ``text_file``) or JSONL file paths."""

    endpoint: Endpoint
    tokenizer: str
    tasks: tuple[str, ...] = (PERPLEXITY_TASK,)
    baseline: Optional[Endpoint] = None
    baseline_tokenizer: Optional[str] = None
    text_file: Optional[Path] = None
    seq_len: int = 1024
    max_windows: Optional[int] = None
    limit: Optional[int] = None  # items per task
    concurrency: int = 8
    max_tokens: int = 256  # generation tasks
    agreement_windows: int = 8
    top_k: int = 10
    progress: bool = True


def _load_tasks(settings: EvalSettings) -> dict[str, Any]:
    """Every task file read and checked before any request is sent (None stands for perplexity)."""
    from accuracy.tasks import load_task

    return {spec: None if spec == PERPLEXITY_TASK else load_task(spec, settings.limit) for spec in settings.tasks}


def _evaluate_one(endpoint: Endpoint, tokenizer_source: str, tasks: dict[str, Any], settings: EvalSettings,
                  log: Callable[[str], None], api_key: str) -> dict[str, Any]:
    from accuracy.perplexity import endpoint_perplexity
    from core.checkpoint import load_tokenizer
    from accuracy.task_runner import run_task
    from core.data import data_file

    tokenizer, results = load_tokenizer(tokenizer_source), {}
    for spec, task in tasks.items():
        if task is None:
            result = endpoint_perplexity(endpoint.url, settings.text_file or data_file("wikitext2-test.raw"),
                                         tokenizer, endpoint.model, settings.seq_len, settings.max_windows,
                                         settings.concurrency, settings.progress, api_key)
            log(f"[{result['model']}] wikitext: token ppl {result['token_perplexity']:.3f}, word ppl "
                f"{result['word_perplexity']:.3f}, {result['bits_per_byte']:.4f} bits/byte "
                f"({result['tokens']:,} tokens, {result['wall_s']:.0f} s)")
            results[PERPLEXITY_TASK] = result
        else:
            result = run_task(endpoint.url, endpoint.model, tokenizer, task, settings.concurrency,
                              settings.max_tokens, settings.progress, api_key)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items() if not k.endswith("_stderr"))
            log(f"[{result['model']}] {task.name}: {shown} ({result['items']} items, {result['wall_s']:.0f} s)")
            results[task.name] = result
    return results


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The figures a comparison shows for one task result."""
    if "token_perplexity" in result:
        return {k: result[k] for k in ("token_perplexity", "word_perplexity", "bits_per_byte")}
    return {k: v for k, v in result["metrics"].items() if not k.endswith("_stderr")}


def deltas(results: dict[str, Any], baseline: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per task and figure: the candidate's value minus the baseline's."""
    return {task: {k: v - headline(baseline[task])[k] for k, v in headline(result).items()}
            for task, result in results.items() if task in baseline}


def evaluate_endpoint(settings: EvalSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluates ``settings.endpoint`` (and the baseline, with deltas and agreement, when given)."""
    from accuracy.agreement import endpoint_agreement
    from core.client import resolve_api_key
    from core.data import data_file

    tasks = _load_tasks(settings)
    key = resolve_api_key(settings.endpoint.api_key)
    report: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "endpoint": settings.endpoint.described(),
                              "results": _evaluate_one(settings.endpoint, settings.tokenizer, tasks, settings, log,
                                                       key)}
    if settings.baseline:
        base_key = key if settings.baseline.api_key is None else resolve_api_key(settings.baseline.api_key)
        report["baseline"] = settings.baseline.described()
        report["baseline_results"] = _evaluate_one(settings.baseline, settings.baseline_tokenizer or settings.tokenizer,
                                                   tasks, settings, log, base_key)
        report["deltas"] = deltas(report["results"], report["baseline_results"])
        agreement = endpoint_agreement(settings.endpoint.url, settings.baseline.url,
                                       settings.text_file or data_file("wikitext2-test.raw"), settings.tokenizer,
                                       settings.endpoint.model, settings.baseline.model,
                                       max_windows=settings.agreement_windows, top_k=settings.top_k,
                                       progress=settings.progress, api_key=key, baseline_api_key=base_key)
        report["agreement"] = agreement
        log(f"agreement with the baseline: top-1 {agreement['top1_agreement']:.2%}, mean KL "
            f"{agreement['mean_kl']:.5f} over {agreement['positions']:,} positions")
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per task figure, baseline and delta columns when present."""
    base = report.get("baseline_results")
    lines = ["| task | figure | value |" + (" baseline | delta |" if base else ""),
             "|---|---|---|" + ("---|---|" if base else "")]
    for task, result in report["results"].items():
        for name, value in headline(result).items():
            row = f"| {task} | {name} | {value:.4f} |"
            if base and task in base:
                row += f" {headline(base[task])[name]:.4f} | {report['deltas'][task][name]:+.4f} |"
            lines.append(row)
    if "agreement" in report:
        a = report["agreement"]
        lines += ["", f"Agreement with the baseline over {a['positions']:,} positions (top-{a['top_k']} "
                      f"log-probabilities): top-1 {a['top1_agreement']:.2%}, mean KL {a['mean_kl']:.5f}, "
                      f"max KL {a['max_kl']:.4f}."]
    return "\n".join(lines)
