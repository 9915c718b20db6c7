"""Peak RSS of calibrated (GPTQ) quantization must not grow with depth.

Builds random Llama checkpoints with the demo model's widths and N and 2N layers (the demo
tokenizer beside them), quantizes each with GPTQ W8A8 in a fresh child process and prints wall
time and peak RSS, and a trace of the process's memory per decoder layer: the peak while that layer
was calibrated and written (VmHWM, reset after each layer through ``/proc/self/clear_refs``), and after
it its anonymous memory (RssAnon: tensors) and file-backed pages (RssFile: mapped libraries and
safetensors). Flat means the last layers of the deep model peak where its first layers and the shallow
model's layers do.

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
import json, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
import quantize.layerwise as layerwise

def memory():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    with open("/proc/self/clear_refs", "w") as reset:
        reset.write("5")  # the next reading's VmHWM is the next layer's own peak
    return {{k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}}

trace, calibrated = [], layerwise.calibrated_layers

def traced(*args, **kwargs):
    for item in calibrated(*args, **kwargs):
        yield item
        trace.append(memory())  # the pipeline has written this layer and asks for the next

layerwise.calibrated_layers = traced
from quantize.calibration import CalibrationSpec
from quantize.pipeline import QuantizeOptions, quantize_checkpoint
from core.schemes import get_scheme
start = time.perf_counter()
quantize_checkpoint(Path({model!r}), get_scheme("w8a8"), "gptq", Path({out!r}), progress=False, log=lambda m: None,
                    options=QuantizeOptions(calibration=CalibrationSpec(num_samples={samples}, seq_len={seq_len})))
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS when it was forked (measured: a
# 1.5 GiB parent makes a 13 MiB child report 1.5 GiB); the last reading covers the writes after the last layer
peak = max([memory()["VmHWM"]] + [t["VmHWM"] for t in trace])
print(json.dumps({{"wall_s": time.perf_counter() - start, "trace": trace, "peak_rss_mib": peak}}))
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

    from core.models import prepare_model

    demo = prepare_model("smollm2-135m")
    runs = {}
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
            runs[layers] = measured["trace"]
    print_trace(runs)


def print_trace(runs: dict[int, list[dict]]) -> None:
    """Memory (MiB) at layers 1, 2, 5, 10, ... of each run, side by side (the first layer's peak includes
    loading the embeddings and catching the calibration inputs)."""
    deepest = max(runs)
    marks = sorted({1, 2, 5, *range(10, deepest + 1, 10), *runs})
    print("\nlayer | " + " | ".join(f"{n} layers: peak / RssAnon / RssFile" for n in runs))
    print("|".join(["---"] * (len(runs) + 1)))
    for mark in marks:
        cells = [" / ".join(f"{t[mark - 1][k]:.0f}" for k in ("VmHWM", "RssAnon", "RssFile")) if mark <= len(t) else "-"
                 for t in runs.values()]
        print(f"{mark} | " + " | ".join(cells))
    for n, t in runs.items():
        half, peak = len(t) // 2, lambda part: max((x["VmHWM"] for x in part), default=float("nan"))
        print(f"{n} layers: highest layer peak in layers 2-{half} {peak(t[1:half]):.0f} MiB, in layers {half + 1}-{n} "
              f"{peak(t[half:]):.0f} MiB; RssAnon after layer {half} {t[half - 1]['RssAnon']:.0f}, after layer {n} "
              f"{t[-1]['RssAnon']:.0f} MiB")


if __name__ == "__main__":
    main()
