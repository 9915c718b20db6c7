"""GPTQ's column loop alone, on the four weight shapes of one demo-model layer (q/k/v and gate/up stacked).

    .venv/bin/python benchmarks/gptq_loop.py

Random weights and a Hessian from random inputs: speed depends on shapes, not values. Prints milliseconds
per shape (mean of 3 after a warm-up) and the total for the model's 30 layers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # rows x columns: q/k/v, o, gate/up, down


def main() -> None:
    import torch

    from core.schemes import QuantArgs
    from quantize.gptq import gptq_quantize

    args = QuantArgs(num_bits=8, strategy="channel", scale_dtype="bfloat16")
    torch.manual_seed(0)
    total = 0.0
    for rows, cols in SHAPES:
        x = torch.randn(4096, cols)
        hessian, weight = 2 * x.T @ x / 4096, torch.randn(rows, cols) * 0.02
        gptq_quantize(weight, hessian, args)
        start = time.perf_counter()
        for _ in range(3):
            gptq_quantize(weight, hessian, args)
        seconds = (time.perf_counter() - start) / 3
        total += seconds
        print(f"{rows} x {cols}: {seconds * 1000:.0f} ms")
    print(f"per layer {total * 1000:.0f} ms; 30 layers {total * 30:.1f} s")


if __name__ == "__main__":
    main()
