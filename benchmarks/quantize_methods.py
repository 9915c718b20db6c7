"""Quantizes the demo model with each recipe and prints wall time, peak RSS and WikiText-2 perplexity.

    .venv/bin/python benchmarks/quantize_methods.py [--samples 128] [--seq-len 512] [--windows 20] [--only gptq ...]

Each quantization runs in a child process so its peak RSS is its own. Perplexity is computed with
transformers on the decoded (fake-quant) weights, in float32 unless ``--eval-dtype`` says otherwise, over
``--windows`` x 2048 tokens of the shared test text; for W8A8 the linear inputs are also fake-quantized per token, as vLLM's dynamic int8 kernels do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES = [("w4a16", "rtn", {}), ("w4a16", "gptq", {}), ("w4a16", "awq", {}), ("w4a16", "awq+gptq", {}),
           ("w4a16", "rtn", {"symmetric": False}), ("w4a16", "gptq", {"symmetric": False}),
           ("w4a16", "awq", {"symmetric": False}), ("w4a16", "awq+gptq", {"symmetric": False}),
           ("w4a16", "awq+gptq/actorder", {"symmetric": False}),
           ("w8a8", "rtn", {}), ("w8a8", "smoothquant", {}), ("w8a8", "gptq", {}), ("w8a8", "smoothquant+gptq", {}),
           ("w8a8", "smoothquant+gptq/aauto", {}), ("w8a8", "smoothquant+gptq/aauto/linears", {}),
           ("w4a16", "rtn/rot", {}), ("w4a16", "gptq/rot", {}), ("w4a16", "gptq/rot", {"symmetric": False}),
           ("w8a8", "rtn/rot", {}), ("w8a8", "gptq/rot", {}),
           ("w4a16", "awq+gptq/actorder/rot", {"symmetric": False}), ("w4a16", "rtn/spin", {}),
           ("w4a16", "gptq/spin", {"symmetric": False}), ("w8a8", "rtn/spin", {}), ("w8a8", "gptq/spin", {}),
           *[(scheme, method, {"symmetric": False}) for scheme in ("w3a16", "w2a16") for method in ("rtn", "hqq")],
           *[(scheme, "awq", {"symmetric": sym}) for scheme in ("w3a16", "w2a16") for sym in (True, False)],
           ("w3a16", "gptq", {"symmetric": False})]
# label options after the method: "/actorder" GPTQ with activation ordering, "/aX" SmoothQuant alpha X (0.5
# otherwise; "/aauto" searched per layer), "/linears" SmoothQuant also from up_proj into down_proj, "/rot"
# the Hadamard rotation (--rotate hadamard) first, "/spin" the learned one (--rotate learned, 40 steps)
ROTATE_LABELS = {"rot": "hadamard", "spin": "learned"}

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from dataclasses import replace
from pathlib import Path
from quantize.calibration import CalibrationSpec
from quantize.pipeline import QuantizeOptions, quantize_checkpoint
from core.schemes import get_scheme
scheme = get_scheme({scheme!r})
scheme = replace(scheme, weights=replace(scheme.weights, **{weight_overrides!r}))
from quantize.gptq import GPTQConfig
opts = QuantizeOptions(calibration=CalibrationSpec(num_samples={samples}, seq_len={seq_len}),
                       gptq=GPTQConfig(actorder={actorder!r}), smooth_linears={smooth_linears!r},
                       smoothquant_alpha={alpha!r}, rotate={rotate!r})
start = time.perf_counter()
quantize_checkpoint(Path({model!r}), scheme, {method!r}.split("/")[0], Path({out!r}), force=True, progress=False, options=opts,
                    log=lambda m: None)
# VmHWM, this process's own peak; ru_maxrss would start at the parent's RSS when it forked this child
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
print(json.dumps({{"wall_s": time.perf_counter() - start, "peak_rss_mib": peak}}))
"""


def perplexity(model_dir: Path, ckpt: Path | None, windows: int, act_quant: bool, dtype_name: str = "auto",
               simulated_kv: str | None = None) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporters.dequantize import dequantized_state_dict
    from core.data import data_file
    from accuracy.scoring import disjoint_windows as make_windows, windows_perplexity
    from core import numerics
    from core.schemes import QuantArgs

    from quantize.shell import compute_dtype

    # weights rounded to bf16 as the checkpoint stores them; computed in float32 by default (the exact figure,
    # the same on CPUs with and without bf16 units); "auto" computes as the calibrated layers ran
    dtype = compute_dtype(torch.device("cpu"), torch.bfloat16) if dtype_name == "auto" else getattr(torch, dtype_name)
    # a rotated checkpoint stores its LM head on its own (the rotation unties it)
    untie = {} if ckpt is None else {"tie_word_embeddings": json.loads((ckpt / "config.json").read_text())
                                      .get("tie_word_embeddings", True)}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **untie)
    if ckpt is not None:
        state = {k: v.to(dtype) for k, v in dequantized_state_dict(ckpt, torch.bfloat16).items()}
        missing, _ = model.load_state_dict(state, strict=False)
        assert all("lm_head" in m for m in missing), missing
        model.tie_weights()
    if simulated_kv:
        from accuracy.simulated_kv import use_simulated_kv

        use_simulated_kv(model, simulated_kv)
    if act_quant:
        per_token = QuantArgs(num_bits=8, strategy="channel")
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.register_forward_pre_hook(
                    lambda _m, inp: (numerics.fake_quantize(inp[0].reshape(-1, inp[0].shape[-1]), per_token)
                                     .reshape(inp[0].shape),))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(data_file("wikitext2-test.raw").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return windows_perplexity(model, make_windows(ids, 2048, windows))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="methods (gptq) or scheme/method labels (w4a16-asym/awq) to run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temporary folder)")
    parser.add_argument("--no-ppl", action="store_true", help="time and measure memory only")
    parser.add_argument("--eval-dtype", choices=["auto", "float32", "bfloat16"], default="float32",
                        help="perplexity computed in (auto: as the calibrated layers run here); float32, the exact "
                             "figure, is the default so that machines with and without bf16 units compare")
    args = parser.parse_args()

    from core.models import prepare_model
    from quantize.methods import parse_alpha

    model = prepare_model("smollm2-135m")
    rows = []
    with (contextlib.nullcontext(str(args.workdir)) if args.workdir else tempfile.TemporaryDirectory()) as tmp:
        # every quantization first, each in a fresh child, so that peak RSS is the quantizer's own
        for scheme, method, overrides in RECIPES:
            label = f"{scheme}{'-asym' if overrides.get('symmetric') is False else ''}"
            if args.only and method not in args.only and f"{label}/{method}" not in args.only:
                continue
            out = Path(tmp) / f"{label}-{method.replace('/', '-')}"
            options = method.split("/")[1:]
            alpha = next((parse_alpha(o[1:]) for o in options if o.startswith("a") and o != "actorder"), 0.5)
            rotate = next((ROTATE_LABELS[o] for o in options if o in ROTATE_LABELS), None)
            code = CHILD.format(root=str(ROOT), scheme=scheme, weight_overrides=overrides, samples=args.samples,
                                actorder="actorder" in options, smooth_linears="linears" in options, alpha=alpha, rotate=rotate,
                                seq_len=args.seq_len, model=str(model), method=method, out=str(out))
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"{label} {method} failed:\n{result.stderr[-3000:]}")
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append({"scheme": label, "method": method, "checkpoint": out, **measured})
            print(f"{label} {method}: {measured['wall_s']:.1f} s, peak RSS {measured['peak_rss_mib']:.0f} MiB", flush=True)
        base = {"scheme": "bf16", "method": "-", "wall_s": None, "peak_rss_mib": None, "checkpoint": None}
        rows.insert(0, base)
        for row in rows:
            checkpoint = row.pop("checkpoint")
            if args.no_ppl:
                row["perplexity"] = float("nan")
                continue
            row["perplexity"] = perplexity(model, checkpoint, args.windows, row["scheme"] == "w8a8", args.eval_dtype)
            print(f"{row['scheme']} {row['method']}: ppl {row['perplexity']:.3f}", flush=True)
    import torch

    from quantize.shell import compute_dtype

    print(f"\n{args.samples} x {args.seq_len} calibration tokens; perplexity over {args.windows} x 2048 tokens, "
          f"computed in {args.eval_dtype if args.eval_dtype != 'auto' else compute_dtype(torch.device('cpu'), torch.bfloat16)}"
          f"; layers calibrated in {compute_dtype(torch.device('cpu'), torch.bfloat16)}; {torch.get_num_threads()} threads")
    print("\n| scheme | method | wall s | peak RSS MiB | WikiText-2 ppl |\n|---|---|---|---|---|")
    for r in rows:
        wall = f"{r['wall_s']:.1f}" if r["wall_s"] else "-"
        rss = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] else "-"
        print(f"| {r['scheme']} | {r['method']} | {wall} | {rss} | {r['perplexity']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
