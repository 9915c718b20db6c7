"""One served artifact measured through its endpoint: perplexity, agreement with the baseline, tasks, load.

Agreement needs the baseline's scores of the same windows: the baseline cell returns them (``scores``) and
every other cell is compared with them, so the two never have to be served at once.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

from workflows.bench.matrix import EvalSettings, LoadtestSettings

TEXT = "wikitext2-test.raw"


def _load_settings(load: LoadtestSettings, tokenizer: str) -> Any:
    from loadtest.profiles import Concurrency
    from loadtest.runner import LoadSettings
    from loadtest.workloads import LengthDist

    extra = {} if load.prefill_requests is None else {"prefill_requests": load.prefill_requests}
    return LoadSettings(profiles=tuple(Concurrency(n) for n in load.streams), input_len=LengthDist("fixed", load.input_len),
                        output_len=LengthDist("fixed", load.output_len), num_requests=load.requests,
                        stop_at_saturation=False, tokenizer=tokenizer, **extra)


def window_scores(url: str, name: str, tokenizer: Any, ev: EvalSettings) -> list[dict[str, Any]]:
    """The served model's top-k log-probabilities over the agreement windows, as JSON-ready dicts."""
    from accuracy.perplexity import score_windows, text_windows
    from core.data import data_file

    text = data_file(TEXT).read_text(encoding="utf-8", errors="replace")
    windows, _ = text_windows(text, tokenizer, ev.agreement_seq_len, ev.agreement_windows)
    _, scores = asyncio.run(score_windows(url, name, windows, 1, ev.top_k))
    return [{"logprobs": s.logprobs, "top": s.top} for s in scores]


def agreement(scores: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
    """Top-1 agreement and KL of a cell's window scores with the baseline's."""
    from accuracy.agreement import compare_scores
    from accuracy.client import PromptScores

    def parsed(rows: list[dict[str, Any]]) -> list[PromptScores]:
        return [PromptScores(r["logprobs"], [], r["top"]) for r in rows]

    return compare_scores(parsed(baseline), parsed(scores))


def latency_samples(load: dict[str, Any]) -> list[dict[str, Any]]:
    """Per load-test run, the counted requests' TTFT and TPOT in ms (what the report's distributions plot)."""
    def values(run: dict[str, Any], key: str) -> list[float]:
        return [r[key] * 1000 for r in run["request_rows"] if r["ok"] and r["counted"] and r[key] is not None]

    return [{"profile": run["profile"], "ttft_ms": values(run, "ttft_s"), "tpot_ms": values(run, "tpot_s")}
            for run in load["runs"]]


def kv_cache_tokens(gateway_log: Path) -> Optional[int]:
    """The tokens the engine's KV cache holds, from vLLM's start-up log (None where the engine does not say)."""
    found = re.search(r"\(log: (\S+)\)", gateway_log.read_text(errors="replace"))
    engine_log = Path(found.group(1)) if found else None
    if engine_log is None or not engine_log.exists():
        return None
    tokens = re.search(r"KV cache size: ([\d,]+) tokens", engine_log.read_text(errors="replace"))
    return int(tokens.group(1).replace(",", "")) if tokens else None


def size_mib(artifact: Path) -> float:
    """The weights' size: a GGUF file's, or a checkpoint directory's safetensors."""
    files = [artifact] if artifact.is_file() else list(artifact.glob("*.safetensors"))
    return sum(p.stat().st_size for p in files) / 2**20


def measure_served(name: str, artifact: Path, tokenizer_dir: str, ev: EvalSettings, load: LoadtestSettings,
                   out_dir: Path, baseline: Optional[list[dict[str, Any]]], want_scores: bool, speed: bool,
                   stage: Callable[[str], None], log: Callable[[str], None]) -> dict[str, Any]:
    """Serves ``artifact`` behind the gateway and measures it; ``baseline``: the baseline's window scores to
    compare with; ``want_scores``: return this cell's own (it is the baseline); ``speed``: run the load test."""
    from accuracy.perplexity import endpoint_perplexity
    from accuracy.task_runner import run_task
    from accuracy.tasks import load_task
    from core.checkpoint import load_tokenizer
    from core.data import data_file
    from loadtest.runner import run_loadtest
    from serving.engine import free_port
    from serving.launcher import served

    tokenizer = load_tokenizer(tokenizer_dir)
    steps: dict[str, float] = {}
    result: dict[str, Any] = {"size_mib": size_mib(artifact)}
    stage("serve")
    t = time.perf_counter()
    with served(artifact, free_port(), name, out_dir / "logs" / f"gateway-{name}.log",
                log=lambda m: log(f"[{name}] {m}")) as gw:
        steps["serve_start_s"] = time.perf_counter() - t
        result["kv_cache_tokens"] = kv_cache_tokens(gw.log_path)
        stage("perplexity")
        t = time.perf_counter()
        ppl = endpoint_perplexity(gw.url, data_file(TEXT), tokenizer, model=name, seq_len=ev.seq_len,
                                  max_windows=ev.windows, progress=False)
        result.update(perplexity=ppl["perplexity"], perplexity_detail=ppl)
        log(f"[{name}] perplexity {ppl['perplexity']:.3f} over {ppl['windows']} windows")
        if ev.agreement_windows and (baseline is not None or want_scores):
            stage("agreement")
            scores = window_scores(gw.url, name, tokenizer, ev)
            if want_scores:
                result["scores"] = scores
            if baseline is not None:
                result["agreement"] = agreement(scores, baseline)
        for spec in ev.tasks:
            stage(f"task {spec}")
            task = run_task(gw.url, name, tokenizer, load_task(spec, ev.task_limit), progress=False)
            result.setdefault("tasks", {})[task["task"]] = {"items": task["items"], **task["metrics"]}
        steps["eval_s"] = time.perf_counter() - t
        if not speed:
            return {**result, "engine_start_s": steps["serve_start_s"], "steps": steps}
        stage("loadtest")
        t = time.perf_counter()
        report = run_loadtest(gw.url, name, _load_settings(load, tokenizer_dir), log=lambda m: log(f"[{name}] {m}"))
        steps["loadtest_s"] = time.perf_counter() - t
    summary, loaded = report["summary"], report["runs"][-1]
    return {**result, "prefill_tok_s": summary["prefill_tok_s"], "decode_tok_s": summary["decode_tok_s_per_stream"],
            "aggregate_output_tok_s": loaded["output_tok_s"],
            "ttft_p50_ms": loaded["ttft_s"]["p50"] * 1000 if loaded["ttft_s"]["p50"] is not None else None,
            "tpot_p50_ms": loaded["tpot_s"]["p50"] * 1000 if loaded["tpot_s"]["p50"] is not None else None,
            "latency": latency_samples(report), "engine_start_s": steps["serve_start_s"], "steps": steps}
