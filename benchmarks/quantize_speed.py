"""Wall time of calibrated quantization per device: the demo model, or a random model of a given shape.

    python benchmarks/quantize_speed.py --device cpu cuda --recipes w8a8/gptq w4a16/awq
    python benchmarks/quantize_speed.py --model random:llama-1b --tokenizer DIR --device cuda

Speed depends on shapes, not weight values, so ``random:NAME`` builds a randomly initialised Llama of
a known shape (with the demo model's tokenizer), which is how a machine without the demo checkpoint
(e.g. a GPU host with no network) measures. Prints wall seconds, the share spent per layer, and peak
GPU memory on CUDA.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "llama-1b": (2048, 8192, 16, 32, 8),
    "tiny": (128, 256, 2, 4, 2),  # a smoke test of the script itself
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def random_model(name: str, tokenizer_dir: Path, out: Path) -> Path:
    """A random bf16 Llama of the named shape, saved with the given tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SHAPES[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).exists():
            shutil.copy2(tokenizer_dir / f, out / f)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="checkpoint dir, demo name, or random:SHAPE")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer dir for random:SHAPE (default: the demo model)")
    parser.add_argument("--device", nargs="+", default=["cpu"])
    parser.add_argument("--recipes", nargs="+", default=["w8a8/gptq", "w4a16/awq", "w4a16/gptq"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    import torch

    from core.models import resolve_model
    from quantize.calibration import CalibrationSpec
    from quantize.pipeline import QuantizeOptions, quantize_checkpoint
    from core.schemes import get_scheme

    with tempfile.TemporaryDirectory() as tmp:
        if args.model.startswith("random:"):
            tokenizer = args.tokenizer or resolve_model("smollm2-135m")
            model = random_model(args.model[7:], tokenizer, Path(tmp) / "model")
        else:
            model = resolve_model(args.model)
        rows = []
        for device in args.device:
            for recipe in args.recipes:
                scheme, method = recipe.split("/")
                opts = QuantizeOptions(calibration=CalibrationSpec(num_samples=args.samples, seq_len=args.seq_len),
                                       device=device)
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                out = Path(tmp) / f"out-{device.replace(':', '')}-{scheme}-{method}"
                quantize_checkpoint(model, get_scheme(scheme), method, out, force=True, progress=False,
                                    options=opts, log=lambda m: None)
                wall = time.perf_counter() - start
                gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
                rows.append((device, recipe, wall, gpu))
                print(f"{args.model} {device} {recipe}: {wall:.1f} s" + (f", peak GPU {gpu:.2f} GiB" if gpu else ""),
                      flush=True)
        agreement = _device_agreement(Path(tmp), args.device, args.recipes)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"\n{args.model}, {args.samples} x {args.seq_len} calibration tokens; GPU: {name}; "
          f"CPU threads: {torch.get_num_threads()}")
    print("| device | scheme/method | wall s | peak GPU GiB |\n|---|---|---|---|")
    for device, recipe, wall, gpu in rows:
        print(f"| {device} | {recipe} | {wall:.1f} | {'-' if gpu is None else f'{gpu:.2f}'} |")
    for recipe, diff in agreement.items():
        print(f"{recipe}: decoded weights, {args.device[0]} vs {args.device[1]}: mean |difference| / mean |weight| = {diff:.2e}")


def _device_agreement(tmp: Path, devices: list[str], recipes: list[str]) -> dict[str, float]:
    """For each recipe run on two devices, how far apart their decoded weights are (rounding-order noise
    can flip a few integers; a real divergence shows as a large figure)."""
    from exporters.dequantize import dequantized_state_dict

    if len(devices) < 2:
        return {}
    out = {}
    for recipe in recipes:
        a, b = (dequantized_state_dict(tmp / f"out-{d.replace(':', '')}-{recipe.replace('/', '-')}") for d in devices[:2])
        keys = [k for k in a if k.endswith("proj.weight")]
        out[recipe] = float(sum((a[k] - b[k]).abs().mean() for k in keys) / sum(a[k].abs().mean() for k in keys))
    return out


if __name__ == "__main__":
    main()
