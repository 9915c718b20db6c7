"""qserve GGUF files against llama.cpp's own quantizer, served by llama.cpp, measured through the gateway.

    .venv/bin/python benchmarks/llamacpp_compare.py [--windows 16] [--seq-len 1024] [--speed]

Accuracy: WikiText-2 (test) perplexity through the gateway for the bf16 GGUF, llama.cpp's own Q4_0 and
Q4_K_M (``llama-quantize`` on the same bf16 GGUF), and qserve's Q4_0/Q4_1 files made by RTN, GPTQ and
AWQ+GPTQ. qserve's files store the (tied) token embedding as Q8_0, as llama.cpp's Q4_0 does, so sizes
compare. ``--speed`` adds ``qserve loadtest`` at 1, 4 and 8 streams on the bf16 and the best 4-bit file and
the batch-1 decode rate against the memory-bandwidth bound (weight bytes per token / measured read
bandwidth). vLLM under the same load is not part of this script yet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QSERVE_FILES = {  # name -> (scheme, method)
    "qserve Q4_0 RTN": ("gguf-q4_0", "rtn"),
    "qserve Q4_0 GPTQ": ("gguf-q4_0", "gptq"),
    "qserve Q4_1 RTN": ("gguf-q4_1", "rtn"),
    "qserve Q4_1 GPTQ": ("gguf-q4_1", "gptq"),
    "qserve Q4_1 AWQ+GPTQ": ("gguf-q4_1", "awq+gptq"),
}


def _qserve(*args: str, timeout: float = 3600) -> str:
    result = subprocess.run([sys.executable, "-m", "qserve", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"qserve {' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def build_files(model: Path, tmp: Path, log) -> dict[str, Path]:
    """Every GGUF to compare, with how long each took to make."""
    from serving.llamacpp_server import llama_server_binary

    files = {"bf16": tmp / "bf16.gguf"}
    _qserve("export", str(model), "--layout", "gguf", "-o", str(files["bf16"]))
    quantize = llama_server_binary().parent / "llama-quantize"
    for kind in ("Q4_0", "Q4_K_M"):
        out = tmp / f"llamacpp-{kind}.gguf"
        start = time.perf_counter()
        subprocess.run([str(quantize), str(files["bf16"]), str(out), kind, "2"], check=True, capture_output=True)
        log(f"llama.cpp {kind}: {time.perf_counter() - start:.1f} s")
        files[f"llama.cpp {kind}"] = out
    for name, (scheme, method) in QSERVE_FILES.items():
        ckpt, out = tmp / name.replace(" ", "-"), tmp / f"{name.replace(' ', '-')}.gguf"
        start = time.perf_counter()
        _qserve("quantize", str(model), "--scheme", scheme, "--method", method, "-o", str(ckpt))
        _qserve("export", str(ckpt), "--layout", "gguf", "--gguf-embeddings", "q8_0", "-o", str(out))
        log(f"{name}: {time.perf_counter() - start:.1f} s")
        files[name] = out
    return files


def perplexity(gguf: Path, tokenizer: Path, args, tmp: Path) -> dict:
    from serving.launcher import GatewayProcess
    from serving.server import free_port

    gateway = GatewayProcess(gguf, free_port(), "m", tmp / "logs" / f"{gguf.stem}.log", extra=("--threads", "2"))
    try:
        gateway.wait_ready(timeout_s=300)
        report = tmp / f"{gguf.stem}-eval.json"
        start = time.perf_counter()
        _qserve("eval", gateway.url, "--tokenizer", str(tokenizer), "--served-model-name", "m", "--seq-len",
                str(args.seq_len), "--max-windows", str(args.windows), "--concurrency", "1", "--json", str(report))
        wall = time.perf_counter() - start
    finally:
        gateway.stop()
    result = json.loads(report.read_text())["results"]["wikitext"]
    return {"ppl": result["token_perplexity"], "tokens": result.get("tokens"), "eval_s": wall}


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Best of ``repeats`` sums over a ``gib`` GiB array: a single-stream read bandwidth estimate."""
    import numpy as np

    data = np.ones(int(gib * 2**30 / 8), dtype=np.float64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return gib * 2**30 / best / 1e9


def loadtest(url: str, name: str, tokenizer: Path, streams: int, out: Path) -> dict:
    _qserve("loadtest", "run", url, "--served-model-name", name, "--tokenizer", str(tokenizer), "--profile",
            f"concurrency:{streams}", "--input-len", "512", "--output-len", "64", "--num-requests",
            str(max(4, 2 * streams)), "--no-stop-at-saturation", "--json", str(out))
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows per file")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--speed", action="store_true")
    args = parser.parse_args()

    from core.models import prepare_model

    model = prepare_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = build_files(model, tmp, lambda m: print(m, flush=True))
        print("\n| file | size MiB | perplexity | eval s |\n|---|---|---|---|")
        rows = {}
        for name, path in files.items():
            rows[name] = {**perplexity(path, model, args, tmp), "size_mib": path.stat().st_size / 2**20}
            r = rows[name]
            print(f"| {name} | {r['size_mib']:.1f} | {r['ppl']:.3f} | {r['eval_s']:.0f} |", flush=True)
        print(json.dumps(rows, indent=1))
        if args.speed:
            speed(files, rows, model, tmp)


def speed(files: dict[str, Path], rows: dict, model: Path, tmp: Path) -> None:
    from loadtest.report import run_table
    from serving.launcher import GatewayProcess
    from serving.server import free_port

    bandwidth = read_bandwidth_gbs()
    best = min((n for n in rows if n.startswith("qserve")), key=lambda n: rows[n]["ppl"])
    print(f"\nread bandwidth {bandwidth:.1f} GB/s (numpy sum over 1 GiB, best of 5)")
    for name in ("bf16", best):
        bound = bandwidth * 1e9 / files[name].stat().st_size
        print(f"\n{name}: decode bound {bound:.0f} tok/s ({files[name].stat().st_size / 2**20:.1f} MiB read per token)")
        gateway = GatewayProcess(files[name], free_port(), "m", tmp / "logs" / f"speed-{files[name].stem}.log",
                                 extra=("--threads", "2"))
        try:
            gateway.wait_ready(timeout_s=300)
            for streams in (1, 4, 8):
                print(run_table(loadtest(gateway.url, "m", model, streams, tmp / f"lt-{streams}.json")), flush=True)
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
