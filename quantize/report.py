"""The per-layer analysis report of a calibrated quantization (JSON and Markdown)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def write_layer_report(out_dir: Path, layers: list[dict], figure_title: Optional[str] = None) -> None:
    """Writes ``quantization_report.json`` and ``.md``: per linear, output cosine and relative error
    against its float version (on calibration inputs), weight and input kurtosis, GPTQ dampening; with a
    ``figure_title``, also ``quantization_report.png`` (those figures by layer depth)."""
    (out_dir / "quantization_report.json").write_text(json.dumps({"layers": layers}, indent=2))
    lines = ["| layer | linear | output cosine | output rel. error | weight kurtosis | input kurtosis | damp | s |",
             "|---|---|---|---|---|---|---|---|"]

    def kurt(layer: dict, kind: str, name: str) -> str:
        before = layer[f"{kind}_kurtosis_before"].get(name)  # present when a transform ran: "before → after"
        after = f"{layer[f'{kind}_kurtosis'][name]:.1f}"
        return f"{before:.1f} → {after}" if before is not None else after

    for layer in layers:
        for name in layer["output_cosine"]:
            damp = layer["dampening"].get(name)
            lines.append(f"| {layer['index']} | {name} | {layer['output_cosine'][name]:.5f} | "
                         f"{layer['output_rel_error'][name]:.4f} | {kurt(layer, 'weight', name)} | "
                         f"{kurt(layer, 'input', name)} | {'' if damp is None else f'{damp:g}'} | "
                         f"{layer['seconds']:.1f} |")
    (out_dir / "quantization_report.md").write_text("# Quantization report\n\n" + "\n".join(lines) + "\n")
    if figure_title is not None:
        from quantize.report_figure import write_report_figure

        write_report_figure(out_dir / "quantization_report.png", layers, figure_title)
