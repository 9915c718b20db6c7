"""``qserve loadtest URL ...`` (the ``run`` command, default) and ``qserve loadtest compare A.json B.json``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from qserve.common import API_KEY_HELP, deprecated_option, output_files, renamed, user_errors, write_text


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
        served_model_name: Optional[str] = typer.Option(None, help="Model name clients send (default: the first "
                                                                   "served)."),
        model: Optional[str] = deprecated_option("--model", "--served-model-name"),
        api_key: Optional[str] = typer.Option(None, help=API_KEY_HELP, show_default=False),
        profile: str = typer.Option("concurrency:8", help="synchronous | concurrency:N | constant:RATE | poisson:RATE; "
                                                          "comma lists sweep (concurrency:1,4,16), concurrency:auto "
                                                          "doubles until saturation."),
        burstiness: float = typer.Option(1.0, help="Poisson gap shape: 1 Poisson, <1 burstier, >1 steadier."),
        max_concurrency: Optional[int] = typer.Option(None, help="Cap on in-flight requests for rate profiles "
                                                                 "(and the top of concurrency:auto)."),
        workload: str = typer.Option("synthetic", help="synthetic (prompts cut from real text) | file (text: a prompt "
                                                       "per line; JSONL: {prompt, max_tokens?}) | sharegpt."),
        prompt_file: Optional[Path] = typer.Option(None, help="Text that synthetic prompts are cut from (default: "
                                                              "WikiText-2 valid), the file workload's prompts, or the "
                                                              "ShareGPT JSON."),
        dataset: Optional[Path] = deprecated_option("--dataset", "--prompt-file"),
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
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for the reports: loadtest.json "
                                                                           "(schema qserve.loadtest/2), requests.csv, "
                                                                           "report.html and its PNG plots."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the JSON report to this file."),
        csv: Optional[Path] = typer.Option(None, help="Write the CSV (one row per request) to this file."),
        html: Optional[Path] = typer.Option(None, help="Write the HTML report to this file; its PNG plots go beside "
                                                       "it.")) -> None:
    """Measure prefill and decode throughput, TTFT/TPOT/ITL/E2E percentiles and goodput of a served model."""
    from loadtest.figures import SLO
    from loadtest.profiles import parse_profiles
    from loadtest.runner import LoadSettings, run_loadtest
    from loadtest.workloads import LengthDist, WorkloadError

    served_model_name = renamed(served_model_name, model, "--model", "--served-model-name")
    prompt_file = renamed(prompt_file, dataset, "--dataset", "--prompt-file")
    files = output_files(output, {"--json": json_out, "--csv": csv, "--html": html},
                         {"--json": "loadtest.json", "--csv": "requests.csv", "--html": "report.html"},
                         (".json", "--json"))
    if endpoint not in ("completions", "chat"):
        raise WorkloadError(f"--endpoint {endpoint!r}: use completions or chat")
    if num_requests <= 0 and not duration:
        raise WorkloadError("--num-requests 0 needs --duration SECONDS to bound the run")
    settings = LoadSettings(
        profiles=tuple(parse_profiles(profile, burstiness, max_concurrency)), workload=workload, source=prompt_file,
        input_len=LengthDist.parse(input_len), output_len=LengthDist.parse(output_len) if output_len else None,
        shared_prefix=shared_prefix, num_requests=num_requests or None, duration_s=duration, warmup=warmup,
        cooldown=cooldown, prefill_requests=prefill_requests, warmup_requests=warmup_requests,
        cache_salt=None if cache_salt == "none" else cache_salt, endpoint=endpoint, stream=stream,
        slos=tuple(SLO.parse(s) for s in slo), request_timeout_s=timeout, seed=seed, tokenizer=tokenizer,
        stop_at_saturation=stop_at_saturation)
    report = run_loadtest(url, served_model_name, settings, log=typer.echo, api_key=api_key)
    _write_outputs(report, files["--json"], files["--csv"], files["--html"])
    if report["interrupted"]:
        raise typer.Exit(130)


def _write_outputs(report: dict, json_path: Optional[Path], csv: Optional[Path], html: Optional[Path]) -> None:
    from loadtest.report import run_table, write_csv, write_json

    typer.echo("\n" + run_table(report))
    for path, writer in ((json_path, write_json), (csv, write_csv)):
        if path:
            writer(report, path)
            typer.echo(f"saved {path}")
    if html:
        from loadtest.html_report import write_html

        typer.echo("saved " + ", ".join(str(p) for p in write_html(report, html)))


@loadtest_app.command("compare")
@user_errors
def compare(reports: List[Path] = typer.Argument(..., help="Load test JSON reports; the first is the baseline."),
            names: Optional[str] = typer.Option(None, help="Comma-separated column names (default: file stems, or the "
                                                           "directory of a -o DIR report)."),
            output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for the table: compare.md."),
            markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the Markdown table to this "
                                                                                 "file.")) -> None:
    """Put load test reports side by side (e.g. bf16 vs W8A8 vs W4A16), with ratios to the first."""
    from loadtest.report import compare as compare_reports, load_report
    from loadtest.workloads import WorkloadError

    files = output_files(output, {"--markdown": markdown_out}, {"--markdown": "compare.md"}, (".md", "--markdown"))
    # a report written with -o DIR is DIR/loadtest.json: the directory names it
    labels = names.split(",") if names else [p.parent.name if p.name == "loadtest.json" else p.stem for p in reports]
    if len(labels) != len(reports):
        raise WorkloadError(f"--names gives {len(labels)} names for {len(reports)} reports")
    table = compare_reports([(label, load_report(path)) for label, path in zip(labels, reports)])
    typer.echo(table)
    write_text(files["--markdown"], table + "\n")
