"""The per-layer analysis report of a calibrated quantization (JSON and Markdown)."""

from __future__ import annotations

import json
from pathlib import Path


def write_layer_report(out_dir: Path, layers: list[dict]) -> None:
    """Writes ``quantization_report.json`` and ``.md``: per linear, output cosine and relative error
    against its float version (on calibration inputs), weight and input kurtosis, GPTQ dampening."""
    (out_dir / "quantization_report.json").write_text(json.dumps({"layers": layers}, indent=2))
    lines = ["| layer | linear | output cosine | output rel. error | weight kurtosis | input kurtosis | damp | s |",
             "|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        for name in layer["output_cosine"]:
            damp = layer["dampening"].get(name)
            lines.append(f"| {layer['index']} | {name} | {layer['output_cosine'][name]:.5f} | "
                         f"{layer['output_rel_error'][name]:.4f} | {layer['weight_kurtosis'][name]:.1f} | "
                         f"{layer['input_kurtosis'][name]:.1f} | {'' if damp is None else f'{damp:g}'} | "
                         f"{layer['seconds']:.1f} |")
    (out_dir / "quantization_report.md").write_text("# Quantization report\n\n" + "\n".join(lines) + "\n")
