"""``qserve bench``: every cell of a matrix quantized (cached), exported for its target, served, measured
through the endpoint; a report side by side.

The baseline cell runs first: its scores of the agreement windows are what every other cell is compared
with. Each cell's result is written atomically under ``cells/`` as soon as it completes, so an interrupted run
loses at most the cells that were running, and a rerun (``resume``) skips the finished ones. A failing cell is
recorded with its one-line error and the others go on. Cells run where the executor puts them: one after
another here, or on a Ray cluster.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from core.atomic import write_text_atomic
from workflows.bench.cell import CellJob, read_json, slug
from workflows.bench.executors import get_executor
from workflows.bench.matrix import Cell, Matrix

SCORES_FILE = "baseline_scores.json"


def measured_with(matrix: Matrix, cell: Cell) -> Any:
    """What a finished cell's result depends on (its recipe, target, the model and the measurement settings), as
    JSON reads it back: a rerun keeps the result only when this is unchanged."""
    return json.loads(json.dumps({"model": matrix.model, "recipe": cell.recipe(), "target": cell.target,
                                  "loadtest": cell.loadtest, "baseline": matrix.baseline,
                                  "eval": dataclasses.asdict(matrix.eval),
                                  "load": dataclasses.asdict(matrix.loadtest)}, default=str))


def _ordered(matrix: Matrix) -> list[Cell]:
    """The baseline first (the others are compared with it), then the matrix's order."""
    return [matrix.cell(matrix.baseline), *(c for c in matrix.cells if c.name != matrix.baseline)]


def run_bench(matrix: Matrix, out_dir: Path, resume: bool = True, cache_dir: Optional[Path] = None,
              executor: str = "local", address: Optional[str] = None, constraints: Any = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every cell not already finished under ``out_dir``, on ``executor``; writes the reports."""
    from core.models import cache_root
    from workflows.bench.report import write_reports

    run = get_executor(executor, address)
    cache_dir = cache_dir or cache_root() / "bench"
    cells_dir = out_dir / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    cells = _ordered(matrix)
    results: dict[str, dict[str, Any]] = {}
    for cell in cells:
        done = read_json(cells_dir / f"{slug(cell.name)}.json") if resume else None
        if done and done.get("status") == "ok":
            if done.get("measured_with") == measured_with(matrix, cell):
                log(f"{cell.name}: finished in an earlier run, kept")
                results[cell.name] = done
            else:
                log(f"{cell.name}: its recipe, target or measurement settings changed since the earlier run: redone")
    started, finished = time.perf_counter(), [0]

    def record(result: dict[str, Any]) -> None:
        result["measured_with"] = measured_with(matrix, matrix.cell(result["cell"]))
        scores = result.pop("scores", None)
        if scores is not None:
            write_text_atomic(out_dir / SCORES_FILE, json.dumps(scores))
        write_text_atomic(cells_dir / f"{slug(result['cell'])}.json", json.dumps(result, indent=2, default=str))
        results[result["cell"]] = result
        finished[0] += 1
        left = sum(1 for c in cells if c.name not in results)
        eta = (time.perf_counter() - started) / finished[0] * left
        log(f"{result['cell']}: {result['status']} in {result['seconds']:.0f} s; {len(results)}/{len(cells)} cells "
            f"done" + (f", about {eta / 60:.0f} min left" if left else ""))

    jobs = [CellJob(matrix, c, out_dir, cache_dir, index=i, total=len(cells))
            for i, c in enumerate(cells, 1) if c.name not in results]
    try:
        if jobs and jobs[0].cell.name == matrix.baseline:  # the others need its scores: it runs alone, first
            run([jobs.pop(0)], record, log)
        ok = results.get(matrix.baseline, {}).get("status") == "ok"
        baseline = read_json(out_dir / SCORES_FILE) if ok else None
        if jobs:
            run([dataclasses.replace(j, baseline_scores=baseline) for j in jobs], record, log)
    finally:
        getattr(run, "close", lambda: None)()  # a Ray executor disconnects from its cluster
    return write_reports(matrix, results, out_dir, constraints, log)
