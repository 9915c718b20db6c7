"""How much W4A16 round-to-nearest perplexity on the demo model moves when the scales move by bf16 rounding.

    .venv/bin/python benchmarks/rtn_scale_sensitivity.py [--windows 20] [--seeds 3]

Variants, each decoded with the scale as the checkpoint holds it: ``unrounded`` (integers from float32
scales, decoded with the bf16 scale: qserve before 4dfa0cf), ``rounded`` (scales rounded to bf16 first: qserve
now), and ``jitter`` (float32 scales times 1 + U(-2^-9, 2^-9), as large as bf16 rounding, decoded exactly).
Also the mean squared weight error of the first two. Perplexity in float32 over ``--windows`` x 2048 tokens.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accuracy.scoring import disjoint_windows, windows_perplexity
    from core.data import data_file
    from core.models import prepare_model
    from core.numerics import compute_qparams, dequantize, quantize
    from core.schemes import get_scheme

    model_dir = prepare_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = dict(model.named_parameters())
    originals = {n: p.detach().clone() for n, p in params.items() if n.endswith("proj.weight")}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(data_file("wikitext2-test.raw").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    windows = list(disjoint_windows(ids, 2048, args.windows))
    weights = get_scheme("w4a16").weights

    def load(kind: str, seed: int = 0) -> float:
        generator, error = torch.Generator().manual_seed(seed), 0.0
        for name, w in originals.items():
            q_args = replace(weights, scale_dtype="bfloat16" if kind == "rounded" else None)
            scale, zero = compute_qparams(w, q_args)
            if kind == "jitter":
                scale = scale * (1 + (torch.rand(scale.shape, generator=generator) * 2 - 1) * 2 ** -9)
            q = quantize(w, scale, zero, q_args)
            decoded = dequantize(q, scale if kind == "jitter" else scale.to(torch.bfloat16).float(), zero, q_args)
            error += float((decoded - w).pow(2).sum())
            params[name].data.copy_(decoded.to(torch.bfloat16).float())
        return error

    print("| variant | weight squared error | WikiText-2 ppl |\n|---|---|---|")
    for kind, seed in [("unrounded", 0), ("rounded", 0), *[("jitter", s) for s in range(args.seeds)]]:
        error = load(kind, seed)
        label = f"{kind} (seed {seed})" if kind == "jitter" else kind
        print(f"| {label} | {error:.1f} | {windows_perplexity(model, windows)[0]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
