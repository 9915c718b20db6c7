"""``qserve loadtest URL ...`` (the ``run`` command, default) and ``qserve loadtest compare A.json B.json``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from qserve.common import user_errors


class _RunByDefault(TyperGroup):
    """Routes ``qserve loadtest URL ...`` to the ``run`` command, so the common case needs no sub-command."""

    def parse_args(self, ctx, args):  # noqa: ANN001 - click's signature
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


loadtest_app = typer.Typer(cls=_RunByDefault, no_args_is_help=True,
                           help="Load-test an OpenAI-compatible endpoint (`qserve loadtest URL`), or compare reports.")


@loadtest_app.command("run")
@user_errors
def run(url: str = typer.Argument(..., help="Base URL of an OpenAI-compatible server (with or without /v1)."),
        model: Optional[str] = typer.Option(None, help="Model name (default: the first served)."),
        profile: str = typer.Option("concurrency:8", help="synchronous | concurrency:N | constant:RATE | poisson:RATE; "
                                                          "comma lists sweep (concurrency:1,4,16), concurrency:auto "
                                                          "doubles until saturation."),
        burstiness: float = typer.Option(1.0, help="Poisson gap shape: 1 Poisson, <1 burstier, >1 steadier."),
        max_concurrency: Optional[int] = typer.Option(None, help="Cap on in-flight requests for rate profiles "
                                                                 "(and the top of concurrency:auto)."),
        workload: str = typer.Option("synthetic", help="synthetic (prompts cut from real text) | file (text: a prompt "
                                                       "per line; JSONL: {prompt, max_tokens?}) | sharegpt."),
        dataset: Optional[Path] = typer.Option(None, help="Text for synthetic (default: WikiText-2 valid), the prompt "
                                                          "file, or the ShareGPT JSON."),
        input_len: str = typer.Option("512", help="Prompt tokens: N, uniform:LO:HI or normal:MEAN:STD."),
        output_len: Optional[str] = typer.Option(None, help="Output tokens, same forms (default 64; ShareGPT: the "
                                                            "reply's length). EOS is ignored so it holds."),
        shared_prefix: float = typer.Option(0.0, help="Fraction of each synthetic prompt shared by all requests."),
        num_requests: int = typer.Option(32, help="Requests per run (0: until --duration); a sweep step sends at "
                                                  "least 4 per stream."),
        duration: Optional[float] = typer.Option(None, help="Seconds per run after which no request is issued."),
        warmup: float = typer.Option(0.1, help="Leading requests left out of the figures (<1: a fraction)."),
        cooldown: float = typer.Option(0.1, help="Trailing requests left out of the figures (<1: a fraction)."),
        prefill_requests: int = typer.Option(8, help="max_tokens=1 requests for prefill throughput (0: skip)."),
        warmup_requests: int = typer.Option(1, help="Unmeasured requests before anything is measured."),
        cache_salt: str = typer.Option("auto", help="vLLM's prefix-cache salt sent with every request: auto (fresh "
                                                    "per run, so a rerun of a seeded workload cannot hit the "
                                                    "previous run's cache), none (not sent), or a string."),
        endpoint: str = typer.Option("completions", help="completions | chat."),
        stream: bool = typer.Option(True, help="Stream (TTFT and ITL need it)."),
        slo: List[str] = typer.Option([], help="Goodput SLO, repeatable: ttft=500ms, tpot=50ms, e2e=10s."),
        tokenizer: Optional[str] = typer.Option(None, help="The model's tokenizer: exact prompt lengths, and token "
                                                           "counts where the server sends no usage."),
        timeout: float = typer.Option(600.0, help="Per-request timeout in seconds."),
        seed: int = typer.Option(0, help="Seed of prompts, lengths and arrival times."),
        stop_at_saturation: bool = typer.Option(True, help="End a sweep once more load adds no throughput."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON report (schema qserve.loadtest/2)."),
        csv: Optional[Path] = typer.Option(None, help="CSV with one row per request."),
        html: Optional[Path] = typer.Option(None, help="HTML report; its PNG plots are written beside it.")) -> None:
    """Measure prefill and decode throughput, TTFT/TPOT/ITL/E2E percentiles and goodput of a served model."""
    from loadtest.figures import SLO
    from loadtest.profiles import parse_profiles
    from loadtest.runner import LoadSettings, run_loadtest
    from loadtest.workloads import LengthDist, WorkloadError

    if endpoint not in ("completions", "chat"):
        raise WorkloadError(f"--endpoint {endpoint!r}: use completions or chat")
    if num_requests <= 0 and not duration:
        raise WorkloadError("--num-requests 0 needs --duration SECONDS to bound the run")
    settings = LoadSettings(
        profiles=tuple(parse_profiles(profile, burstiness, max_concurrency)), workload=workload, source=dataset,
        input_len=LengthDist.parse(input_len), output_len=LengthDist.parse(output_len) if output_len else None,
        shared_prefix=shared_prefix, num_requests=num_requests or None, duration_s=duration, warmup=warmup,
        cooldown=cooldown, prefill_requests=prefill_requests, warmup_requests=warmup_requests,
        cache_salt=None if cache_salt == "none" else cache_salt, endpoint=endpoint, stream=stream,
        slos=tuple(SLO.parse(s) for s in slo), request_timeout_s=timeout, seed=seed, tokenizer=tokenizer,
        stop_at_saturation=stop_at_saturation)
    report = run_loadtest(url, model, settings, log=typer.echo)
    _write_outputs(report, output, csv, html)
    if report["interrupted"]:
        raise typer.Exit(130)


def _write_outputs(report: dict, output: Optional[Path], csv: Optional[Path], html: Optional[Path]) -> None:
    from loadtest.report import run_table, write_csv, write_json

    typer.echo("\n" + run_table(report))
    for path, writer in ((output, write_json), (csv, write_csv)):
        if path:
            writer(report, path)
            typer.echo(f"saved {path}")
    if html:
        from loadtest.html_report import write_html

        typer.echo("saved " + ", ".join(str(p) for p in write_html(report, html)))


@loadtest_app.command("compare")
@user_errors
def compare(reports: List[Path] = typer.Argument(..., help="Load test JSON reports; the first is the baseline."),
            names: Optional[str] = typer.Option(None, help="Comma-separated column names (default: file stems)."),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the markdown table here.")) -> None:
    """Put load test reports side by side (e.g. bf16 vs W8A8 vs W4A16), with ratios to the first."""
    from loadtest.report import compare as compare_reports, load_report
    from loadtest.workloads import WorkloadError

    labels = names.split(",") if names else [p.stem for p in reports]
    if len(labels) != len(reports):
        raise WorkloadError(f"--names gives {len(labels)} names for {len(reports)} reports")
    table = compare_reports([(label, load_report(path)) for label, path in zip(labels, reports)])
    typer.echo(table)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table + "\n")
        typer.echo(f"saved {output}")
