"""bf16 against quantized variants of the demo model on vLLM(-CPU), through the gateway: one load test per
variant, then ``qserve loadtest compare`` of the reports.

    .venv/bin/python benchmarks/loadtest_variants.py --out runs/loadtest [--scheme w8a8 --scheme w4a16]
        [--profile concurrency:1,8] [--input-len 512] [--output-len 64] [--num-requests 16]

Each variant is quantized with RTN (speed does not depend on the method), served alone (nothing else
runs on the machine meanwhile), load-tested with the same seeded workload, then stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/loadtest"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--scheme", action="append", help="quantized variants (default: w8a8, w4a16)")
    parser.add_argument("--profile", default="concurrency:1,8")
    parser.add_argument("--input-len", default="512")
    parser.add_argument("--output-len", default="64")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--warmup-requests", type=int, default=8, help="unmeasured requests per variant first")
    parser.add_argument("--port", type=int, default=8310)
    args = parser.parse_args()

    from core.models import prepare_model
    from loadtest.profiles import parse_profiles
    from loadtest.report import compare, run_table, write_json
    from loadtest.runner import LoadSettings, run_loadtest
    from loadtest.workloads import LengthDist
    from quantize.pipeline import quantize_checkpoint
    from core.schemes import get_scheme
    from serving.launcher import served

    base = prepare_model(args.model)
    variants = [("bf16", base)]
    for scheme in args.scheme or ["w8a8", "w4a16"]:
        target = args.out / "checkpoints" / f"{args.model}-{scheme}-rtn"
        if not (target / "config.json").exists():
            quantize_checkpoint(base, get_scheme(scheme), "rtn", target, progress=False)
        variants.append((scheme, target))
    settings = LoadSettings(profiles=tuple(parse_profiles(args.profile)), input_len=LengthDist.parse(args.input_len),
                            output_len=LengthDist.parse(args.output_len), num_requests=args.num_requests,
                            warmup_requests=args.warmup_requests, tokenizer=str(base), stop_at_saturation=False)
    reports = []
    for name, path in variants:
        with served(path, args.port, name, args.out / "logs" / f"gateway-{name}.log", log=print) as gateway:
            report = run_loadtest(gateway.url, name, settings, log=lambda m, n=name: print(f"[{n}] {m}"), progress=False)
        write_json(report, args.out / f"{name}.json")
        print(f"\n## {name}\n\n{run_table(report)}\n")
        reports.append((name, report))
    table = compare(reports)
    (args.out / "compare.md").write_text(table + "\n")
    print(table + f"\n\nsaved {args.out / 'compare.md'}")


if __name__ == "__main__":
    main()
