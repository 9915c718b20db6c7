"""One bench cell, start to end: quantize (cached), export for its target, serve and measure. Everything a
cell needs travels in its :class:`CellJob`, so an executor can run it in another process or on another machine.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from workflows.bench.matrix import TARGETS, Cell, Matrix


@dataclass(frozen=True)
class CellJob:
    """One cell's work, self-contained so that another process or machine can run it."""

    matrix: Matrix
    cell: Cell
    out_dir: Path
    cache_dir: Path
    baseline_scores: Optional[list] = None  # the baseline's window scores (None: no agreement measured)
    index: int = 1
    total: int = 1


def slug(name: str) -> str:
    """A name safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def read_json(path: Path) -> Any:
    """A JSON file's content, or None where it is missing or unreadable (a cell not finished)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    from core.checkpoint import weight_files

    count = 0
    for path in weight_files(model_dir):
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():
                shape = fh.get_slice(key).get_shape()
                count += math.prod(shape)
    return count


def _quantized(job: CellJob, model_dir: Path, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The cell's compressed-tensors checkpoint, cached; with the quantization's time and peak memory."""
    from core.memory import peak_rss_mib, reset_peak_rss
    from workflows.bench.cache import cached_checkpoint, quantize_cell

    cell, peak = job.cell, {}

    def quantize(out: Path) -> None:
        peak["reset"] = reset_peak_rss()
        quantize_cell(model_dir, cell, out, log=log)
        peak["mib"] = peak_rss_mib()

    source, reused = cached_checkpoint(model_dir, cell, job.cache_dir, quantize, log=log)
    recorded = json.loads((source / "qserve.json").read_text())
    facts = {"checkpoint": str(source), "reused": reused, "quantize_s": recorded["seconds"]}
    if "mib" in peak:  # measured now; a reused checkpoint keeps what its first run measured
        facts["quantize_peak_rss_mib"] = peak["mib"] if peak["reset"] else None
        (source / "bench_memory.json").write_text(json.dumps({"quantize_peak_rss_mib": facts["quantize_peak_rss_mib"]}))
    else:
        facts.update(read_json(source / "bench_memory.json") or {})
    layers = read_json(source / "quantization_report.json")
    if layers:
        facts["layers"] = [{"index": r["index"], "output_rel_error": r["output_rel_error"],
                            "weight_kurtosis": r["weight_kurtosis"], "input_kurtosis": r["input_kurtosis"]}
                           for r in layers["layers"]]
    return source, facts


def _artifact(job: CellJob, model_dir: Path, stage: Callable[[str], None],
              log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """What the cell's engine loads: the model itself, the cached checkpoint, or its export to the target layout."""
    from exporters.convert import export_checkpoint

    cell = job.cell
    layout = TARGETS[cell.target].layout
    if not cell.quantized and layout in ("compressed-tensors", "dequantized"):
        return model_dir, {}
    facts: dict[str, Any] = {}
    source = model_dir
    if cell.quantized:
        stage("quantize")
        source, facts = _quantized(job, model_dir, log)
    if layout == "compressed-tensors":
        return source, facts
    stage(f"export {layout}")
    exported = job.out_dir / "artifacts" / (slug(cell.name) + (".gguf" if layout == "gguf" else ""))
    export_checkpoint(source, layout, exported, force=True, log=log)
    return exported, facts


def run_cell(job: CellJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantizes (or reuses), exports, serves and measures one cell; never raises: a failure is its result."""
    from core.models import resolve_model
    from workflows.bench.measure import measure_served

    cell, start = job.cell, time.perf_counter()
    prefix = f"[{job.index}/{job.total} {cell.name}]"

    def stage(name: str) -> None:
        log(f"{prefix} {name} ({time.perf_counter() - start:.0f} s into the cell)")

    try:
        model_dir = resolve_model(job.matrix.model)
        artifact, facts = _artifact(job, model_dir, stage, log)
        measured = measure_served(cell.name, artifact, str(model_dir), job.matrix.eval, job.matrix.loadtest,
                                  job.out_dir, job.baseline_scores, cell.name == job.matrix.baseline, cell.loadtest,
                                  stage, log)
        result = {"status": "ok", **facts, **measured, "artifact": str(artifact),
                  "bits_per_weight": measured["size_mib"] * 2**20 * 8 / _param_count(model_dir)}
    except Exception as exc:  # noqa: BLE001 - a failing cell is a result; the others go on
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log(f"{prefix} failed: {message}")
        result = {"status": "failed", "error": f"{type(exc).__name__}: {message}"}
    return {**result, "cell": cell.name, "recipe": cell.recipe(), "target": cell.target,
            "seconds": time.perf_counter() - start}
