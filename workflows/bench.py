"""``qserve bench``: every cell of a matrix quantized (cached), exported for its target, served, measured
through the endpoint, one engine at a time; a report side by side.

Each cell's result is written atomically under ``cells/`` as soon as it completes, so an interrupted run
loses at most the cell that was running, and a rerun (``resume``) skips the finished ones. A failing cell is
recorded with its one-line error and the others go on.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from core.atomic import atomic_output_file
from workflows.bench_cache import cached_checkpoint, quantize_cell
from workflows.bench_matrix import TARGETS, Cell, Matrix

REPORT_SCHEMA = "qserve.bench/1"
COLUMNS = [("cell", "cell", "{}"), ("status", "status", "{}"), ("perplexity", "WikiText-2 ppl", "{:.3f}"),
           ("ppl_change", "ppl vs baseline", "{:+.2%}"), ("size_mib", "MiB", "{:.1f}"),
           ("prefill_tok_s", "prefill tok/s", "{:,.0f}"), ("decode_tok_s", "decode tok/s (1 stream)", "{:.1f}"),
           ("aggregate_output_tok_s", "output tok/s (most streams)", "{:.1f}"), ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
           ("quantize_s", "quantize s", "{:.0f}"), ("engine_start_s", "engine start s", "{:.0f}")]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _write_atomic(path: Path, text: str) -> None:
    with atomic_output_file(path, force=True) as tmp:
        tmp.write_text(text)


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _artifact(cell: Cell, model_dir: Path, out_dir: Path, cache_dir: Path, log: Callable[[str], None]) -> tuple[Path, dict]:
    """What the cell's engine loads: the model itself, the cached checkpoint, or its export to the target layout."""
    from exporters.convert import export_checkpoint

    if not cell.quantized and TARGETS[cell.target].layout in ("compressed-tensors", "dequantized"):
        return model_dir, {}
    facts: dict[str, Any] = {}
    source = model_dir
    if cell.quantized:
        start = time.perf_counter()
        source, reused = cached_checkpoint(model_dir, cell, cache_dir,
                                           lambda out: quantize_cell(model_dir, cell, out, log=log), log=log)
        recorded = json.loads((source / "qserve.json").read_text())
        facts = {"checkpoint": str(source), "reused": reused, "quantize_s": recorded["seconds"],
                 "wall_quantize_s": time.perf_counter() - start}
    layout = TARGETS[cell.target].layout
    if layout == "compressed-tensors":
        return source, facts
    exported = out_dir / "artifacts" / (_slug(cell.name) + (".gguf" if layout == "gguf" else ""))
    export_checkpoint(source, layout, exported, force=True, log=log)
    return exported, facts


def run_cell(matrix: Matrix, cell: Cell, model_dir: Path, out_dir: Path, cache_dir: Path,
             log: Callable[[str], None]) -> dict[str, Any]:
    """Quantizes (or reuses), exports, serves and measures one cell."""
    from loadtest.profiles import Concurrency
    from loadtest.runner import LoadSettings
    from loadtest.workloads import LengthDist
    from serving.engine import free_port
    from workflows.demo import measure_variant

    artifact, facts = _artifact(cell, model_dir, out_dir, cache_dir, log)
    load = matrix.loadtest
    settings = LoadSettings(profiles=tuple(Concurrency(n) for n in load.streams),
                            input_len=LengthDist("fixed", load.input_len), output_len=LengthDist("fixed", load.output_len),
                            num_requests=load.requests, stop_at_saturation=False, tokenizer=str(model_dir))
    measured = measure_variant(cell.name, artifact, free_port(), out_dir, matrix.eval.windows, settings, log,
                               seq_len=matrix.eval.seq_len, tokenizer=str(model_dir))
    return {**facts, **{k: v for k, v in measured.items() if k not in ("variant", "loadtest")},
            "engine_start_s": measured["steps"]["serve_start_s"], "artifact": str(artifact)}


def run_bench(matrix: Matrix, out_dir: Path, resume: bool = True, cache_dir: Path | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every cell not already finished under ``out_dir``; writes ``report.json``, ``.md`` and ``.csv``."""
    from core.models import cache_root, resolve_model

    model_dir = resolve_model(matrix.model)
    cache_dir = cache_dir or cache_root() / "bench"
    cells_dir = out_dir / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for i, cell in enumerate(matrix.cells, 1):
        path = cells_dir / f"{_slug(cell.name)}.json"
        done = _read_result(path) if resume else None
        if done and done.get("status") == "ok":
            log(f"[{i}/{len(matrix.cells)}] {cell.name}: finished in an earlier run, kept")
            results[cell.name] = done
            continue
        eta = ""
        if i > 1:
            eta = f", about {(time.perf_counter() - started) / (i - 1) * (len(matrix.cells) - i + 1) / 60:.0f} min left"
        log(f"[{i}/{len(matrix.cells)}] {cell.name}{eta}")
        start = time.perf_counter()
        try:
            result = {"status": "ok", **run_cell(matrix, cell, model_dir, out_dir, cache_dir, log)}
        except Exception as exc:  # noqa: BLE001 - a failing cell is a result; the others go on
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log(f"[{cell.name}] failed: {message}")
            result = {"status": "failed", "error": f"{type(exc).__name__}: {message}"}
        result.update(cell=cell.name, recipe=cell.recipe(), target=cell.target, seconds=time.perf_counter() - start)
        _write_atomic(path, json.dumps(result, indent=2, default=str))
        results[cell.name] = result
    return write_report(matrix, results, out_dir, log)


def write_report(matrix: Matrix, results: dict[str, dict[str, Any]], out_dir: Path,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """``report.json`` (schema ``qserve.bench/1``), ``report.md`` and ``report.csv``, rows in matrix order."""
    baseline = results.get(matrix.baseline, {}).get("perplexity")
    rows = []
    for cell in matrix.cells:
        result = results.get(cell.name, {"status": "not run"})
        row = {"cell": cell.name, **result}
        if baseline and result.get("perplexity"):
            row["ppl_change"] = result["perplexity"] / baseline - 1
        rows.append(row)
    report = {"schema": REPORT_SCHEMA, "model": matrix.model, "baseline": matrix.baseline, "rows": rows}
    _write_atomic(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    table = _markdown(rows)
    _write_atomic(out_dir / "report.md", f"# qserve bench: {matrix.model}\n\nbaseline: {matrix.baseline}\n\n{table}\n")
    with atomic_output_file(out_dir / "report.csv", force=True) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([key for key, _, _ in COLUMNS] + ["error"])
        for row in rows:
            writer.writerow([row.get(key, "") for key, _, _ in COLUMNS] + [row.get("error", "")])
    log(f"\n{table}\n\nsaved {out_dir / 'report.md'}, report.json and report.csv")
    return report


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
