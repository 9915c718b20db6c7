"""The per-layer analysis report of a calibrated quantization: measured per linear, written as JSON and Markdown."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

REPORT_TOKENS = 1024  # enough for the report's cosine / relative error; fewer matmuls per linear


@dataclass
class LayerReport:
    """One decoder layer's row of the report, by linear (names relative to the layer)."""

    index: int
    seconds: float = 0.0
    dampening: dict[str, float] = field(default_factory=dict)
    output_cosine: dict[str, float] = field(default_factory=dict)
    output_rel_error: dict[str, float] = field(default_factory=dict)
    weight_kurtosis: dict[str, float] = field(default_factory=dict)  # as quantized (after transforms)
    input_kurtosis: dict[str, float] = field(default_factory=dict)
    weight_kurtosis_before: dict[str, float] = field(default_factory=dict)  # before transforms
    input_kurtosis_before: dict[str, float] = field(default_factory=dict)
    smoothquant_alpha: dict[str, float] = field(default_factory=dict)  # per mapping, by its first balance linear
    expert_tokens: list[int] = field(default_factory=list)  # MoE: calibration tokens routed to each expert
    expert_fallback: list[int] = field(default_factory=list)  # MoE: experts rounded to nearest (too few tokens)


def kurtosis(t: torch.Tensor) -> float:
    """Fourth standardised moment: 3 for a Gaussian, large where a few values are outliers."""
    t = t.float().flatten()
    centered = t - t.mean()
    return float(centered.pow(4).mean() / centered.pow(2).mean().clamp(min=1e-20).pow(2))


def report_linear(name: str, weight: torch.Tensor, new_weight: torch.Tensor, stats: Any, folded: Any,
                  report: LayerReport) -> None:
    """Output error of the quantized linear against the original float one, on the same inputs: against the
    weights before AWQ's clipping, with outputs mapped back where a transform divided the linear's rows."""
    x = stats.samples_of(name)[:REPORT_TOKENS]
    ref_out, q_out = x @ folded.reference.get(name, weight).T, x @ new_weight.T
    if name in folded.out_scale:
        ref_out, q_out = ref_out * folded.out_scale[name], q_out * folded.out_scale[name]
    report.output_cosine[name] = float(torch.nn.functional.cosine_similarity(ref_out.flatten(), q_out.flatten(), dim=0))
    report.output_rel_error[name] = float((q_out - ref_out).norm() / ref_out.norm().clamp(min=1e-12))
    report.weight_kurtosis[name] = kurtosis(weight)
    report.input_kurtosis[name] = kurtosis(x)


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
