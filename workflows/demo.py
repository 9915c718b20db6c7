"""The end-to-end demo: prepare the demo model, quantize it, serve each variant, measure, compare."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from core.data import data_file
from accuracy.perplexity import endpoint_perplexity
from loadtest.profiles import Concurrency
from loadtest.runner import LoadSettings, run_loadtest
from loadtest.workloads import LengthDist

COLUMNS = [("variant", "variant", "{}"), ("perplexity", "WikiText-2 ppl", "{:.2f}"),
           ("prefill_tok_s", "prefill tok/s", "{:,.0f}"), ("decode_tok_s", "decode tok/s (1 stream)", "{:.1f}"),
           ("aggregate_output_tok_s", "output tok/s (8 streams)", "{:.1f}"), ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
           ("size_mib", "checkpoint MiB", "{:.1f}")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "n/a" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _size_mib(model: Path) -> float:
    """The weights' size: a GGUF file's, or a checkpoint directory's safetensors."""
    files = [model] if model.is_file() else list(model.glob("*.safetensors"))
    return sum(p.stat().st_size for p in files) / 2**20


def measure_variant(name: str, model_dir: Path, port: int, out_dir: Path, windows: int,
                    settings: LoadSettings, log: Callable[[str], None], seq_len: int = 2048,
                    tokenizer: str | None = None) -> dict[str, Any]:
    """Serves one checkpoint (or GGUF file) behind the gateway and measures perplexity and speed through it;
    ``tokenizer``: where the tokenizer is (default: the checkpoint)."""
    from serving.launcher import served

    steps: dict[str, float] = {}
    t = time.perf_counter()
    with served(model_dir, port, name, out_dir / "logs" / f"gateway-{name}.log",
                log=lambda m: log(f"[{name}] {m}")) as gw:
        steps["serve_start_s"] = time.perf_counter() - t
        log(f"[{name}] gateway ready in {steps['serve_start_s']:.0f} s at {gw.url}")
        t = time.perf_counter()
        ppl = endpoint_perplexity(gw.url, data_file("wikitext2-test.raw"), tokenizer=tokenizer or str(model_dir),
                                  model=name, seq_len=seq_len, max_windows=windows)
        steps["eval_s"] = time.perf_counter() - t
        log(f"[{name}] perplexity {ppl['perplexity']:.3f} over {ppl['windows']} windows in {steps['eval_s']:.0f} s")
        t = time.perf_counter()
        load = run_loadtest(gw.url, name, settings, log=lambda m: log(f"[{name}] {m}"))
        steps["loadtest_s"] = time.perf_counter() - t
    summary, loaded = load["summary"], load["runs"][-1]
    return {"variant": name, "checkpoint": str(model_dir), "perplexity": ppl["perplexity"],
            "prefill_tok_s": summary["prefill_tok_s"], "decode_tok_s": summary["decode_tok_s_per_stream"],
            "aggregate_output_tok_s": loaded["output_tok_s"],
            "ttft_p50_ms": loaded["ttft_s"]["p50"] * 1000 if loaded["ttft_s"]["p50"] is not None else None,
            "size_mib": _size_mib(model_dir), "steps": steps, "perplexity_detail": ppl, "loadtest": load}


def run_demo(out_dir: Path, schemes: tuple[str, ...] = ("w8a8", "w4a16"), model: str = "smollm2-135m",
             port: int = 8300, windows: int = 20, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the whole chain and writes ``demo.md`` and ``demo.json`` under ``out_dir``."""
    from core.models import prepare_model
    from quantize.pipeline import quantize_checkpoint
    from core.schemes import get_scheme

    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    base = prepare_model(model, log=log)
    timings["prepare_s"] = time.perf_counter() - t
    variants = [("bf16", base)]
    for scheme in schemes:
        t = time.perf_counter()
        target = out_dir / "checkpoints" / f"{model}-{scheme}-rtn"
        quantize_checkpoint(base, get_scheme(scheme), "rtn", target, force=True, log=log)
        timings[f"quantize_{scheme}_s"] = time.perf_counter() - t
        variants.append((scheme, target))
    settings = LoadSettings(profiles=(Concurrency(1), Concurrency(8)), input_len=LengthDist("fixed", 512),
                            output_len=LengthDist("fixed", 64), num_requests=12, prefill_requests=8,
                            stop_at_saturation=False)
    rows = [measure_variant(name, path, port, out_dir, windows, settings, log) for name, path in variants]
    report = {"schema": "qserve.demo/1", "model": model, "timings": timings, "rows": rows,
              "table": markdown_table(rows)}
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2))
    (out_dir / "demo.md").write_text(f"# qserve demo: {model}\n\n{report['table']}\n")
    log("\n" + report["table"] + f"\n\nsaved {out_dir / 'demo.md'} and {out_dir / 'demo.json'}")
    return report
