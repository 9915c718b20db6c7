"""Sizes of every checkpoint layout qserve writes, on the demo model: bits per weight of the quantized
linears (scales, zero points and indices included), total size and its ratio to bf16.

    .venv/bin/python benchmarks/layout_sizes.py [--json OUT]

Each scheme is quantized once with RTN (sizes do not depend on the method), then exported to every
layout that can hold it; ``qserve inspect`` measures each result from its stored tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (scheme preset, asymmetric weights?)
SCHEMES = [("w4a16", False), ("w4a16", True), ("w8a16", False), ("w8a8", False), ("fp8-dynamic", False)]
LAYOUTS = ("compressed-tensors", "gptq", "awq", "dequantized")


def measure(model: Path, work: Path) -> list[dict]:
    from dataclasses import replace

    from exporters.convert import export_checkpoint
    from exporters.inspect import inspect_checkpoint
    from quantize.pipeline import quantize_checkpoint
    from core.schemes import SchemeError, get_scheme

    rows = []
    for preset, asym in SCHEMES:
        scheme = get_scheme(preset)
        scheme = replace(scheme, weights=replace(scheme.weights, symmetric=not asym))
        name = f"{preset}{'-asym' if asym else ''}"
        ckpt = work / name
        quantize_checkpoint(model, scheme, "rtn", ckpt, progress=False, log=lambda m: None)
        for layout in LAYOUTS:
            out = ckpt if layout == "compressed-tensors" else work / f"{name}-{layout}"
            if layout != "compressed-tensors":
                try:
                    export_checkpoint(ckpt, layout, out, log=lambda m: None)
                except SchemeError as exc:
                    rows.append({"scheme": name, "layout": layout, "refused": str(exc).split(";")[0]})
                    continue
            report = inspect_checkpoint(out)
            q_weights = sum(g.weights for g in report.groups)
            q_bytes = sum(g.stored_bytes for g in report.groups)
            rows.append({"scheme": name, "layout": layout, "format": report.format,
                         "linear_bits_per_weight": round(8 * q_bytes / q_weights, 3) if q_weights else 16.0,
                         "total_mib": round(report.total_bytes / 2**20, 1),
                         "vs_bf16": round(report.total_bytes / report.bf16_bytes, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    from core.models import prepare_model

    model = prepare_model("smollm2-135m")
    with tempfile.TemporaryDirectory(prefix="qserve-sizes-") as tmp:
        rows = measure(model, Path(tmp))
    print("| scheme | layout | bits/weight (linears) | total MiB | vs bf16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['scheme']} | {r['layout']} | refused: {r['refused']} | | |")
        else:
            print(f"| {r['scheme']} | {r['layout']} | {r['linear_bits_per_weight']:.3f} | {r['total_mib']:.1f} | "
                  f"{r['vs_bf16']:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
