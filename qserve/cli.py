"""The ``qserve`` command line: parse arguments, call one library function, print the outcome.

Heavy imports (torch, transformers, vLLM) happen inside the commands so that ``--help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from qserve.common import (API_KEY_HELP, OptionError, deprecated_option, flags, given_options, output_files, refuse_options,
                           renamed, user_errors, write_json, write_text)
from qserve.loadtest_cli import loadtest_app

app = typer.Typer(help="Quantize, export, serve, load-test and evaluate LLMs on vLLM.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
models_app = typer.Typer(help="Built-in demo models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(loadtest_app, name="loadtest")
keys_app = typer.Typer(help="API keys for `qserve serve --api-keys FILE`.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(key_id: str = typer.Argument(..., help="A name for the key, shown in metrics and errors."),
             rpm: Optional[int] = typer.Option(None, help="Requests per minute."),
             tpm: Optional[int] = typer.Option(None, help="Prompt + completion tokens per minute."),
             model: List[str] = typer.Option([], help="Allowed model (repeatable; default: all).")) -> None:
    """Make a random key: prints it once, and the key-file entry that stores only its SHA-256."""
    import secrets

    from serving.keys import key_hash

    key = "sk-qs-" + secrets.token_urlsafe(24)
    entry = [f"  - id: {key_id}", f"    sha256: {key_hash(key)}"]
    entry += [f"    rpm: {rpm}"] if rpm else []
    entry += [f"    tpm: {tpm}"] if tpm else []
    entry += [f"    models: [{', '.join(model)}]"] if model else []
    typer.echo(f"key (shown once, give it to the client): {key}\n\nkey-file entry (under `keys:`):\n" + "\n".join(entry))


@models_app.command("prepare")
@user_errors
def models_prepare(name: str = typer.Argument("smollm2-135m", help="Demo model name."),
                   force: bool = typer.Option(False, help="Rebuild even if cached.")) -> None:
    """Build the demo model's safetensors checkpoint (cached under ~/.cache/qserve/models)."""
    from core.models import prepare_model

    typer.echo(str(prepare_model(name, force=force)))


@app.command()
@user_errors
def quantize(ctx: typer.Context,
             model: str = typer.Argument(..., help="Checkpoint directory, hub id, or demo model name."),
             scheme: str = typer.Option("w8a8", help="Scheme preset: w8a8, w8a8-static, w8a16, w4a16, w3a16, "
                                                     "w2a16, fp8, fp8-dynamic; gguf-q4_0, gguf-q4_1, "
                                                     "gguf-q8_0 (llama.cpp blocks); none (with --kv-cache)."),
             method: str = typer.Option("rtn", help="rtn, hqq, gptq, awq, smoothquant, or joined with '+' "
                                                    "(smoothquant+gptq, awq+gptq)."),
             output: Path = typer.Option(..., "--output", "-o", help="Output checkpoint directory (a file for "
                                                                     "--layout gguf)."),
             layout: str = typer.Option("compressed-tensors", help="compressed-tensors (what vLLM loads), or gguf "
                                                                   "(one llama.cpp file; with --scheme gguf-q4_0, "
                                                                   "gguf-q4_1 or gguf-q8_0)."),
             group_size: Optional[str] = typer.Option(None, help="Weight group size (overrides the preset), or "
                                                                 "'auto': per layer the largest that fits."),
             override: List[str] = typer.Option([], help="PATTERN=PRESET[:gN], repeatable: other weights for "
                                                         "matching layers, e.g. 're:.*down_proj$=w8a16'."),
             device: str = typer.Option("cpu", help="Where calibrated layers run: cpu, cuda, cuda:N."),
             asymmetric: bool = typer.Option(False, "--asym", help="Asymmetric weights (with a zero point)."),
             observer: Optional[str] = typer.Option(None, help="Weight range: minmax, mse (clipping search), or "
                                                              "extreme (llama.cpp's Q4_0 rule; symmetric only). "
                                                              "Default: the preset's (minmax; extreme for "
                                                              "gguf-q4_0)."),
             calib_file: Optional[str] = typer.Option(None, help="Calibration text or JSONL file, or a hub "
                                                                 "dataset hf:NAME[:CONFIG]:SPLIT (default: shared "
                                                                 "WikiText-2 validation)."),
             num_samples: int = typer.Option(128, help="Calibration samples."),
             calib_seq_len: int = typer.Option(512, help="Tokens per calibration sample."),
             seed: int = typer.Option(0, help="Seed for choosing calibration windows."),
             smoothquant_alpha: str = typer.Option("0.5", help="SmoothQuant migration strength in [0, 1], or "
                                                             "'auto': searched per layer on calibration data."),
             smooth_linears: bool = typer.Option(False, help="SmoothQuant also folds into a linear feeding "
                                                             "another (up_proj -> down_proj), not only norms."),
             actorder: bool = typer.Option(False, help="GPTQ activation ordering (with static groups)."),
             dampening: float = typer.Option(0.01, help="GPTQ dampening (raised automatically if needed)."),
             report_png: bool = typer.Option(False, help="Also draw the calibrated methods' per-layer report "
                                                         "(quantization_report.png)."),
             rotate: Optional[str] = typer.Option(None, help="Fuse a rotation into the weights first (QuaRot-style): "
                                                             "hadamard, orthogonal (random), or learned "
                                                             "(SpinQuant-style, optimised on the calibration data)."),
             rotate_seed: int = typer.Option(0, help="Seed of the rotation's random signs or matrix."),
             rotate_steps: int = typer.Option(40, help="Optimiser steps of --rotate learned (one calibration "
                                                       "sample each; ~4 s a step for the demo model on 2 cores)."),
             kv_cache: Optional[str] = typer.Option(None, help="Also quantize the KV cache: fp8 (static per-tensor "
                                                               "k/v scales, calibrated; served with vLLM's fp8 cache)."),
             force: bool = typer.Option(False, help="Overwrite an existing output directory.")) -> None:
    """Quantize a checkpoint and write it in the compressed-tensors layout vLLM loads."""
    from core.models import resolve_model
    from quantize.calibration import CalibrationSpec
    from quantize.gptq import GPTQConfig
    from quantize.methods import parse_alpha, parse_recipe
    from quantize.pipeline import QuantizeOptions, quantize_checkpoint
    from core.schemes import SchemeError, compose_scheme

    from workflows.quantize_export import PREFLIGHT, quantize_to_file

    if layout != "compressed-tensors" and layout not in PREFLIGHT:
        raise OptionError(f"--layout {layout!r}: quantize writes compressed-tensors or {', '.join(PREFLIGHT)}; "
                          f"convert to other layouts afterwards with qserve export")
    auto = group_size is not None and group_size.lower() == "auto"
    if group_size is not None and not auto and not group_size.isdigit():
        raise SchemeError(f"--group-size takes a number (e.g. 64) or 'auto', not {group_size!r}")
    # validate names before resolving (and downloading) a model
    chosen = compose_scheme(scheme, int(group_size) if group_size and not auto else None, asymmetric, observer,
                            tuple(override), kv_cache)
    recipe = parse_recipe(method)
    learned = False
    if rotate is not None:
        from quantize.rotation import ROTATIONS, check_kind

        check_kind(rotate)
        learned = ROTATIONS[rotate].learned
    _refuse_inapplicable(ctx, recipe, chosen, rotate, learned)
    alpha = parse_alpha(smoothquant_alpha)
    options = QuantizeOptions(
        calibration=CalibrationSpec(num_samples=num_samples, seq_len=calib_seq_len, seed=seed, path=calib_file),
        smoothquant_alpha=alpha, smooth_linears=smooth_linears, gptq=GPTQConfig(actorder=actorder, dampening=dampening),
        device=device, auto_group_size=auto, report_png=report_png, rotate=rotate, rotate_seed=rotate_seed,
        rotate_steps=rotate_steps)
    if layout == "compressed-tensors":
        quantize_checkpoint(resolve_model(model), chosen, method, output, force=force, log=typer.echo, options=options)
        return
    quantize_to_file(resolve_model(model), chosen, method, output, layout, force=force, log=typer.echo, options=options)


def _refuse_inapplicable(ctx: typer.Context, recipe, scheme, rotate: Optional[str], learned: bool) -> None:
    """Options of a method or a data path that this run does not take fail in one line, never silently."""
    calibrated = recipe.needs_calibration or scheme.static_activations or scheme.kv_cache is not None or learned
    if not scheme.quantizes_weights and scheme.kv_cache is None:
        raise OptionError(f"--scheme {scheme.name} quantizes nothing on its own; add --kv-cache fp8, or choose a "
                          f"weight scheme")
    checks = [
        (not scheme.quantizes_weights, ("method", "override", "group_size", "asymmetric", "observer", "rotate"),
         f"to --scheme {scheme.name}, which quantizes no weights (only the KV cache)"),
        (recipe.quantizer != "gptq", ("actorder", "dampening"), "without GPTQ (e.g. --method gptq or awq+gptq)"),
        ("smoothquant" not in recipe.transforms, ("smoothquant_alpha", "smooth_linears"),
         "without SmoothQuant (e.g. --method smoothquant+gptq)"),
        (scheme.weights.type == "float", ("asymmetric",), "to FP8 weights, which are symmetric"),
        (rotate is None, ("rotate_seed",), "without a rotation (e.g. --rotate hadamard)"),
        (not learned, ("rotate_steps",), "without a learned rotation (--rotate learned)"),
        (not calibrated, ("calib_file", "num_samples", "calib_seq_len", "seed", "device", "report_png"),
         f"to {recipe.name} on {scheme.name}, which needs no calibration data (it streams tensor by tensor); "
         f"use a calibrated method or a static-activation scheme"),
    ]
    for inapplicable, names, reason in checks:
        if inapplicable:
            refuse_options(ctx, names, reason)


@app.command()
@user_errors
def export(checkpoint: Path = typer.Argument(..., help="A quantized checkpoint: compressed-tensors, gptq or awq (gguf: a float one too)."),
           layout: str = typer.Option(..., help="compressed-tensors, gptq (AutoGPTQ v1), awq (AutoAWQ GEMM), "
                                                "dequantized (plain float weights) or gguf (llama.cpp)."),
           output: Path = typer.Option(..., "--output", "-o", help="Output checkpoint directory (a file for gguf)."),
           gguf_float: Optional[str] = typer.Option(None, help="gguf: storage of unquantized matrices: bf16, f16, f32 "
                                                               "or q8_0 (default: the checkpoint's dtype)."),
           gguf_embeddings: Optional[str] = typer.Option(None, help="gguf: storage of the token embeddings and output "
                                                                    "head when unquantized (default: as --gguf-float)."),
           force: bool = typer.Option(False, help="Overwrite an existing output.")) -> None:
    """Rewrite a quantized checkpoint in another layout, losslessly; gguf also takes float checkpoints."""
    from exporters.convert import FILE_TARGETS, export_checkpoint

    options = {k: v for k, v in (("float_type", gguf_float), ("embedding_type", gguf_embeddings)) if v is not None}
    if options and layout not in FILE_TARGETS:
        raise OptionError(f"--gguf-float/--gguf-embeddings apply to --layout gguf, not {layout}")
    export_checkpoint(checkpoint, layout, output, force=force, log=typer.echo, **options)


@app.command()
@user_errors
def inspect(checkpoint: Path = typer.Argument(..., help="Checkpoint directory, or a .gguf file."),
            json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the inspection as JSON.")) -> None:
    """Print a checkpoint's format, per-module scheme, bits per weight (scales included) and size against
    bf16, and check that every quantized layer decodes to finite weights of its shape."""
    from exporters.inspect import inspect_checkpoint

    report = inspect_checkpoint(checkpoint)
    typer.echo(report.markdown())
    write_json(json_out, report.to_dict())
    if report.problems:
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def serve(ctx: typer.Context,
          model: Optional[str] = typer.Argument(None, help="Checkpoint directory, hub id, or demo model name "
                                                            "(or --config for several models)."),
          config: Optional[Path] = typer.Option(None, "--config", "-c",
                                                help="YAML gateway config: models, checkpoints or URLs, replicas, "
                                                     "engine args, keys, limits. Options given here override it."),
          host: str = typer.Option("127.0.0.1", help="Gateway address."),
          port: int = typer.Option(8000, help="Gateway port."),
          served_model_name: Optional[str] = typer.Option(None, help="Model name clients send (default: directory "
                                                                     "name)."),
          name: Optional[str] = deprecated_option("--name", "--served-model-name"),
          replicas: int = typer.Option(1, min=1, help="Engines for the checkpoint; requests go to the least busy."),
          engine: Optional[str] = typer.Option(None, help="vllm or llamacpp (default: llamacpp for a .gguf file, "
                                                          "vllm for a checkpoint directory)."),
          threads: Optional[int] = typer.Option(None, min=1, help="llama.cpp: CPU threads (default: every core)."),
          max_model_len: Optional[int] = typer.Option(None, help="Context length given to the engine (default: 4096, "
                                                                 "or the model's own when shorter)."),
          enforce_eager: Optional[bool] = typer.Option(
              None, "--enforce-eager/--compile",
              help="Skip torch.compile and CUDA graphs. Default: eager on the CPU engine (starts in ~30 s, not ~3 min)."),
          log_dir: Optional[Path] = typer.Option(None, help="Where vLLM's log goes (default $QSERVE_CACHE/logs, i.e. ~/.cache/qserve/logs)."),
          api_keys: Optional[Path] = typer.Option(None, help="YAML/JSON key file (hashed keys, rpm/tpm limits, model "
                                                             "allow-lists); QSERVE_API_KEY adds one key. None: open."),
          max_in_flight: int = typer.Option(256, help="Requests at once per engine; more wait in the queue."),
          max_queue: int = typer.Option(512, help="Requests waiting for a slot; beyond, 429 with Retry-After."),
          queue_timeout: float = typer.Option(60.0, help="Seconds a request may wait in the queue before a 429."),
          max_body_mb: float = typer.Option(8.0, help="Largest request body accepted (MiB); larger gets 413.")) -> None:
    """Serve a checkpoint (or the models of --config) behind the OpenAI-compatible gateway: on vLLM, or a
    .gguf file on llama.cpp. Extra arguments go to the engine unchanged (e.g. --tensor-parallel-size 2)."""
    from core.models import DEMO_MODELS
    from serving.config import load_config, validate_config
    from serving.server import serve as run_server

    served_model_name = renamed(served_model_name, name, "--name", "--served-model-name")
    given = given_options(ctx)
    top = {"host": host, "port": port, "log_dir": log_dir, "api_keys": api_keys,
           "max_body_bytes": int(max_body_mb * 2**20),
           "limits": {"max_in_flight": max_in_flight, "max_queue": max_queue, "queue_timeout_s": queue_timeout}}
    if config is not None:
        per_model = flags(ctx, given & {"served_model_name", "name", "replicas", "max_model_len", "enforce_eager",
                                        "engine", "threads"})
        if model is not None or ctx.args or per_model:
            raise OptionError(f"with --config, the checkpoint, {', '.join(per_model) or 'per-model options'} "
                              f"and engine arguments go in the config's models")
        source = {"max_body_mb": "max_body_bytes", "max_in_flight": "limits", "max_queue": "limits",
                  "queue_timeout": "limits"}
        overrides = {source.get(p, p) for p in given} & top.keys()
        settings = load_config(config, {field: top[field] for field in overrides})
    elif model is None:
        raise OptionError(f"give a checkpoint to serve (e.g. `qserve serve {next(iter(DEMO_MODELS))}`, the "
                          f"demo model) or --config FILE")
    else:
        spec = {"name": served_model_name or Path(model).name.removesuffix(".gguf"), "checkpoint": model, "replicas": replicas,
                "max_model_len": max_model_len, "enforce_eager": enforce_eager, "engine_args": list(ctx.args),
                "engine": engine, "threads": threads}
        settings = validate_config({**top, "models": [spec]}, "command line")
    run_server(settings, log=typer.echo)


@app.command("eval")
@user_errors
def evaluate(ctx: typer.Context,
             url: str = typer.Argument(..., help="Base URL of an OpenAI-compatible server."),
             tokenizer: str = typer.Option(..., help="Checkpoint directory (or hub id) of the served model's tokenizer."),
             served_model_name: Optional[str] = typer.Option(None, help="Model name clients send (default: the first "
                                                                        "served)."),
             model: Optional[str] = deprecated_option("--model", "--served-model-name"),
             api_key: Optional[str] = typer.Option(None, help=API_KEY_HELP, show_default=False),
             tasks: str = typer.Option("wikitext", help="Comma-separated: wikitext (perplexity), arc_easy, piqa, "
                                                        "boolq, lambada, gsm8k, or JSONL files of "
                                                        "{question, choices, answer} lines."),
             baseline: Optional[str] = typer.Option(None, help="Base URL of a baseline server: evaluated too, with "
                                                               "deltas and top-1/KL agreement."),
             baseline_served_model_name: Optional[str] = typer.Option(None, help="Model name at the baseline."),
             baseline_model: Optional[str] = deprecated_option("--baseline-model", "--baseline-served-model-name"),
             baseline_tokenizer: Optional[str] = typer.Option(None, help="Baseline tokenizer (default: --tokenizer)."),
             baseline_api_key: Optional[str] = typer.Option(None, help="API key for the baseline (default: the "
                                                                       "--api-key one).", show_default=False),
             text_file: Optional[Path] = typer.Option(None, help="Text for perplexity and agreement "
                                                                 "(default: WikiText-2 test)."),
             seq_len: int = typer.Option(1024, help="Tokens per perplexity window."),
             max_windows: int = typer.Option(0, help="Cap on perplexity windows, for quick runs (0: the whole text)."),
             limit: int = typer.Option(0, help="Items per task, for quick runs (0: all)."),
             concurrency: int = typer.Option(8, help="Requests in flight at once."),
             top_k: int = typer.Option(10, help="Log-probabilities per position for the agreement measure."),
             lm_eval_tasks: Optional[str] = typer.Option(None, "--lm-eval", help="Run these lm-evaluation-harness "
                                                                                 "tasks instead (it must be installed)."),
             output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for the reports: eval.json "
                                                                                "and eval.md (with --lm-eval: the "
                                                                                "harness's output path)."),
             json_out: Optional[Path] = typer.Option(None, "--json", help="Write the JSON report to this file."),
             markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the Markdown table to this "
                                                                                  "file.")) -> None:
    """Accuracy of a served model: perplexity (token, word, bits per byte), task accuracy, and agreement
    with a baseline endpoint, all through the endpoint."""
    if lm_eval_tasks:  # before the deprecation lines: an option that does not apply is the one thing to say
        refuse_options(ctx, ("tasks", "baseline", "baseline_served_model_name", "baseline_model", "baseline_tokenizer",
                             "baseline_api_key", "text_file", "seq_len", "max_windows", "top_k", "json_out",
                             "markdown_out"),
                       "with --lm-eval (lm-evaluation-harness runs its own tasks and writes its own results, to "
                       "-o DIR): leave {them} out, or run the built-in tasks without --lm-eval")
    served_model_name = renamed(served_model_name, model, "--model", "--served-model-name")
    baseline_served_model_name = renamed(baseline_served_model_name, baseline_model, "--baseline-model",
                                         "--baseline-served-model-name")
    if lm_eval_tasks:
        from accuracy.harness import run_lm_eval

        raise typer.Exit(run_lm_eval(url, served_model_name, tokenizer, lm_eval_tasks, concurrency, limit or None,
                                     output, api_key))
    files = output_files(output, {"--json": json_out, "--markdown": markdown_out},
                         {"--json": "eval.json", "--markdown": "eval.md"}, (".json", "--json"))
    from accuracy.runner import Endpoint, EvalSettings, evaluate_endpoint, markdown

    settings = EvalSettings(Endpoint(url, served_model_name, api_key),
                            tokenizer, tuple(t.strip() for t in tasks.split(",") if t.strip()),
                            Endpoint(baseline, baseline_served_model_name, baseline_api_key) if baseline else None,
                            baseline_tokenizer, text_file, seq_len, max_windows or None, limit or None, concurrency,
                            top_k=top_k)
    report = evaluate_endpoint(settings, log=typer.echo)
    table = markdown(report)
    typer.echo(table)
    write_json(files["--json"], report)
    write_text(files["--markdown"], table + "\n")


@app.command()
@user_errors
def demo(output: Path = typer.Option(Path("runs/demo"), "--output", "-o", help="Where the report goes."),
         scheme: List[str] = typer.Option(["w8a8", "w4a16"], help="Schemes to compare with bf16 (repeatable)."),
         windows: int = typer.Option(20, help="Perplexity windows of 2048 tokens.")) -> None:
    """Run the whole chain on the demo model (the bench `demo` preset) and print the bf16-vs-quantized table."""
    from workflows.demo import run_demo
    from core.schemes import get_scheme

    for s in scheme:
        if not get_scheme(s).quantizes_weights:
            raise OptionError(f"--scheme {s} quantizes no weights, so the demo has nothing to compare with bf16; "
                              f"choose a weight scheme (e.g. w8a8, w4a16)")
    run_demo(output, tuple(scheme), windows=windows, log=typer.echo)


@app.command()
@user_errors
def bench(matrix: Optional[Path] = typer.Argument(None, help="A matrix YAML: model, baseline, defaults and cells "
                                                             "(lists expand into one cell per value)."),
          output: Path = typer.Option(..., "--output", "-o", help="Run directory: cells/, report.md/.html/.json/.csv."),
          preset: Optional[str] = typer.Option(None, help="A matrix shipped with qserve instead of MATRIX: demo, "
                                                          "methods, llmc-findings."),
          resume: bool = typer.Option(True, help="Keep the cells an earlier run of this directory finished."),
          cache_dir: Optional[Path] = typer.Option(None, help="Where quantized cells are cached (default: "
                                                              "$QSERVE_CACHE/bench)."),
          executor: str = typer.Option("local", help="local (one cell after another here) or ray (cells on a Ray "
                                                     "cluster, one per worker)."),
          address: Optional[str] = typer.Option(None, help="The Ray cluster's address (--executor ray)."),
          max_ppl_increase: Optional[str] = typer.Option(None, help="Rank only cells within this perplexity "
                                                                    "increase over the baseline (2% or 0.02)."),
          min_decode_tok_s: Optional[float] = typer.Option(None, help="Rank only cells decoding at least this "
                                                                      "fast (tokens/s, one stream).")) -> None:
    """Quantize, export, serve and measure every cell of a matrix, and compare them side by side."""
    from workflows.bench.matrix import load_matrix, preset_path
    from workflows.bench.report import Constraints
    from workflows.bench.run import run_bench

    if (matrix is None) == (preset is None):
        raise OptionError("give a matrix file or --preset NAME (one of them)")
    constraints = Constraints.parse(max_ppl_increase, min_decode_tok_s)
    loaded = load_matrix(matrix if matrix is not None else preset_path(preset))
    run_bench(loaded, output, resume=resume, cache_dir=cache_dir, executor=executor, address=address,
              constraints=constraints, log=typer.echo)


@app.command("simulate-kv")
@user_errors
def simulate_kv(checkpoint: Path = typer.Argument(..., help="A checkpoint directory (float or quantized)."),
                method: List[str] = typer.Option(["kivi4", "kivi2"], help="Simulated KV-cache methods (repeatable): "
                                                                          "kivi4, kivi2; prerope4, prerope2 (keys "
                                                                          "quantized before RoPE, as KVQuant does)."),
                seq_len: int = typer.Option(2048, help="Tokens per perplexity window."),
                max_windows: int = typer.Option(20, help="Perplexity windows."),
                json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the rows here.")) -> None:
    """Perplexity with KV caches no engine serves (KIVI), in transformers; every row says "simulated, not served"."""
    from workflows.kv_simulation import markdown, simulated_kv_perplexity

    rows = simulated_kv_perplexity(checkpoint, list(method), seq_len=seq_len, max_windows=max_windows, log=typer.echo)
    typer.echo(markdown(rows))
    write_json(json_path, {"rows": rows})


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
