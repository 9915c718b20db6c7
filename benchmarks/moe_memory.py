"""Peak RSS of GPTQ on a Mixture-of-Experts model must not grow with the number of experts beyond their weights.

Builds random Qwen3-MoE checkpoints with the demo model's attention widths (hidden 576, 9 heads, 3 KV heads),
expert width 768 and top-2 routing, with E and 2E experts per layer (the demo tokenizer beside them),
quantizes each with GPTQ W4A16 (group 64) in a fresh child process and prints wall time, peak RSS (VmHWM), one
layer's expert weights, and per layer the calibration tokens each expert received and which experts fell
back to round-to-nearest. The experts are calibrated one at a time, so the 2E run may add the extra experts'
weights (a layer is loaded whole) but no per-expert statistics.

    .venv/bin/python benchmarks/moe_memory.py [--experts 8] [--layers 4] [--samples 32] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from quantize.calibration import CalibrationSpec
from quantize.pipeline import QuantizeOptions, quantize_checkpoint
from core.schemes import get_scheme
start = time.perf_counter()
quantize_checkpoint(Path({model!r}), get_scheme("w4a16"), "gptq", Path({out!r}), progress=False, log=lambda m: None,
                    options=QuantizeOptions(calibration=CalibrationSpec(num_samples={samples}, seq_len={seq_len})))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({{"wall_s": time.perf_counter() - start, "peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024}}))
"""


def make_random_moe(demo: Path, out: Path, experts: int, layers: int) -> int:
    """A random Qwen3-MoE with the demo model's attention widths; returns one layer's expert bytes (bf16)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_moe", hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                  head_dim=64, num_hidden_layers=layers, num_experts=experts, num_experts_per_tok=2,
                                  moe_intermediate_size=768, intermediate_size=1536, vocab_size=49152,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (demo / name).exists():
            shutil.copy(demo / name, out / name)
    return experts * 3 * 576 * 768 * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    from core.models import prepare_model

    demo = prepare_model("smollm2-135m")
    rows, reports = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for experts in (args.experts, 2 * args.experts):
            model, out = Path(tmp) / f"moe-{experts}", Path(tmp) / f"q-{experts}"
            layer_bytes = make_random_moe(demo, model, experts, args.layers)
            code = CHILD.format(root=str(ROOT), model=str(model), out=str(out), samples=args.samples,
                                seq_len=args.seq_len)
            result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append((experts, measured["wall_s"], measured["peak_rss_mib"], layer_bytes / 2**20))
            reports[experts] = json.loads((out / "quantization_report.json").read_text())["layers"]
    print("| experts per layer | wall s | peak RSS MiB | one layer's experts MiB (bf16) |\n|---|---|---|---|")
    for experts, wall, peak, layer_mib in rows:
        print(f"| {experts} | {wall:.1f} | {peak:.0f} | {layer_mib:.1f} |")
    for experts, layers in reports.items():
        print(f"\n{experts} experts: calibration tokens per expert, by layer (fell back to RTN: below 128)")
        for layer in layers:
            print(f"  layer {layer['index']}: {layer['expert_tokens']} fallback {layer['expert_fallback']}")


if __name__ == "__main__":
    main()
