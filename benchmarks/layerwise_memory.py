"""Peak RSS of calibrated (GPTQ) quantization must not grow with depth.

Builds random Llama checkpoints with the demo model's widths and N and 2N layers (the demo
tokenizer beside them), quantizes each with GPTQ W8A8 in a fresh child process and prints wall
time and peak RSS.

    .venv/bin/python benchmarks/layerwise_memory.py [--layers 30] [--samples 32] [--seq-len 512]
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
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from quantize.calibration import CalibrationSpec
from quantize.pipeline import QuantizeOptions, quantize_checkpoint
from quantize.schemes import get_scheme
start = time.perf_counter()
quantize_checkpoint(Path({model!r}), get_scheme("w8a8"), "gptq", Path({out!r}), progress=False, log=lambda m: None,
                    options=QuantizeOptions(calibration=CalibrationSpec(num_samples={samples}, seq_len={seq_len})))
print(json.dumps({{"wall_s": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_random_llama(demo: Path, out: Path, layers: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(demo)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (demo / name).exists():
            shutil.copy(demo / name, out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    from exporters.models import prepare_model

    demo = prepare_model("smollm2-135m")
    print("| layers | wall s | peak RSS MiB |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (args.layers, 2 * args.layers):
            model = Path(tmp) / f"llama-{layers}"
            make_random_llama(demo, model, layers)
            code = CHILD.format(root=str(ROOT), model=str(model), out=str(Path(tmp) / f"q-{layers}"),
                                samples=args.samples, seq_len=args.seq_len)
            result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"| {layers} | {measured['wall_s']:.1f} | {measured['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
