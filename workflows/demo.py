"""The end-to-end demo: the ``demo`` bench preset (bf16 and RTN checkpoints of the demo model, each served,
measured through the endpoint and compared), with the schemes and perplexity windows the user chose."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from workflows.bench.matrix import Matrix, parse_matrix, preset_path, read_matrix


def demo_matrix(schemes: tuple[str, ...] = ("w8a8", "w4a16"), windows: int = 20) -> Matrix:
    """The demo preset with ``schemes`` (RTN) beside bf16 and ``windows`` perplexity windows."""
    raw = read_matrix(preset_path("demo"))
    raw["cells"] = [raw["cells"][0], {"name": "{scheme}", "scheme": list(schemes), "method": "rtn"}]
    raw["eval"] = {**raw["eval"], "windows": windows}
    return parse_matrix(raw, "the demo preset")


def run_demo(out_dir: Path, schemes: tuple[str, ...] = ("w8a8", "w4a16"), windows: int = 20,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the demo preset afresh (quantized checkpoints are reused from the bench cache) into ``out_dir``."""
    from workflows.bench.run import run_bench

    return run_bench(demo_matrix(schemes, windows), out_dir, resume=False, log=log)
