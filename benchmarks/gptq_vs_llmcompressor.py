"""GPTQ W8A8 of the demo model by qserve and by llm-compressor, side by side in one run.

    .venv/bin/python benchmarks/gptq_vs_llmcompressor.py --llmcompressor-python /path/to/venv/bin/python

llm-compressor pins its own transformers, so it lives in a separate environment; this script gives both tools
the same token ids (``--samples`` x ``--seq-len`` of the shared WikiText-2 validation text, cut by qserve's
calibration loader), runs each in a child process of its own interpreter (wall time of the quantization
call alone, peak RSS from the child's own VmHWM), alternating ``--rounds`` times, and prints a table with the
ratio. Without ``--llmcompressor-python`` only qserve runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK = ('next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024')

QSERVE = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from pathlib import Path
from core.schemes import get_scheme
from quantize import pipeline
from quantize.pipeline import QuantizeOptions, quantize_checkpoint
ids = torch.load({ids!r})
pipeline.load_calibration = lambda spec, tokenizer: (ids, {{"file": "shared ids"}})
start = time.perf_counter()
quantize_checkpoint(Path({model!r}), get_scheme("w8a8"), "gptq", Path({out!r}), force=True, progress=False,
                    options=QuantizeOptions(), log=lambda m: None)
print(json.dumps({{"wall_s": time.perf_counter() - start, "peak_rss_mib": {peak}}}))
"""

LLMCOMPRESSOR = """
import json, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
ids = torch.load({ids!r})
data = Dataset.from_dict({{"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}})
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.bfloat16)
start = time.perf_counter()
oneshot(model=model, dataset=data, recipe=GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
        max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0], output_dir={out!r})
print(json.dumps({{"wall_s": time.perf_counter() - start, "peak_rss_mib": {peak}}}))
"""


def _run(python: str, code: str) -> dict:
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child failed ({python}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llmcompressor-python", help="interpreter of an environment with llmcompressor installed")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs of each tool")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from core.models import resolve_model
    from quantize.calibration import CalibrationSpec, load_calibration

    model = resolve_model("smollm2-135m")
    ids, _ = load_calibration(CalibrationSpec(num_samples=args.samples, seq_len=args.seq_len),
                              AutoTokenizer.from_pretrained(model))
    tools = {"qserve": sys.executable}
    if args.llmcompressor_python:
        tools["llm-compressor"] = args.llmcompressor_python
    results: dict[str, list[dict]] = {name: [] for name in tools}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ids, f"{tmp}/ids.pt")
        for _ in range(args.rounds):
            for name, python in tools.items():
                code = (QSERVE if name == "qserve" else LLMCOMPRESSOR).format(
                    root=str(ROOT), ids=f"{tmp}/ids.pt", model=str(model), out=f"{tmp}/{name}", peak=PEAK)
                results[name].append(_run(python, code))
                print(f"{name}: {results[name][-1]['wall_s']:.1f} s, {results[name][-1]['peak_rss_mib']:.0f} MiB",
                      flush=True)
    print(f"\nGPTQ W8A8, demo model, {args.samples} x {args.seq_len} calibration tokens, {args.rounds} round(s)")
    print("| tool | wall s (median) | peak RSS MiB |\n|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {statistics.median(r['wall_s'] for r in runs):.1f} | "
              f"{max(r['peak_rss_mib'] for r in runs):.0f} |")
    if len(results) == 2:
        ratio = statistics.median(r["wall_s"] for r in results["qserve"]) / statistics.median(
            r["wall_s"] for r in results["llm-compressor"])
        print(f"qserve / llm-compressor wall time: {ratio:.2f}")


if __name__ == "__main__":
    main()
