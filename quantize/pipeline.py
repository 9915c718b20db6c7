"""``quantize_checkpoint``: the one entry point from a float checkpoint to a quantized export.

Weights stream from the safetensors files one tensor at a time, so memory stays near the largest
tensor; calibrated methods will hook in per decoder layer. The output appears atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from core.progress import progress as progress_bar
from core.checkpoint import (AUX_FILES, check_weights_fit_config, iter_tensors, layer_loader, qserve_version,
                             weight_files)
from exporters import compressed_tensors
from core.atomic import atomic_output_dir, check_free_space
from core.models import ModelError
from core.shards import ShardWriter
from quantize.calibration import CalibrationSpec, load_calibration
from quantize.gptq import GPTQConfig
from quantize.methods import MethodError, Recipe, parse_recipe, quantize_weight
from quantize.moe import MIN_EXPERT_TOKENS
from quantize.report import write_layer_report
from quantize.grouping import auto_group_sizes, check_fused_consistent, check_group_fit
from core.schemes import Scheme, matches

@dataclass
class QuantizeReport:
    """What a quantization did, written to ``qserve.json`` in the output."""

    source: str
    output: str
    scheme: dict
    method: str
    quantized_layers: int
    seconds: float
    size_bytes: int
    source_size_bytes: int
    source_sha256: str
    skipped: list[str] = field(default_factory=list)
    calibration: Optional[dict] = None
    rotation: Optional[dict] = None

    def to_dict(self) -> dict:
        return dict(self.__dict__, qserve_version=qserve_version())


def meta_model(model_dir: Path) -> torch.nn.Module:
    """The architecture in ``model_dir``, built on the meta device: module names and shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _tensor_headers(files: list[Path]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Each tensor's shape and safetensors dtype (``BF16``...), from the weight files' headers in one pass."""
    from safetensors import safe_open

    shapes, dtypes = {}, {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                header = f.get_slice(key)
                shapes[key], dtypes[key] = header.get_shape(), header.get_dtype()
    return shapes, dtypes


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _scale_dtype(dtypes: dict[str, str], weights: set[str]) -> str:
    """The dtype the target weights are stored in, which their scales are stored (and so rounded) in;
    float32 when they differ."""
    found = {dtypes[k] for k in weights}
    return _SAFETENSORS_DTYPES.get(found.pop(), "float32") if len(found) == 1 else "float32"


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _output_bytes_needed(files: list[Path], shapes: dict[str, list[int]], dtypes: dict[str, str], weights: set[str],
                         scheme: Scheme, rotated: bool) -> int:
    """About the most disk a quantization's output takes while it is written: the source, its target weights at
    the scheme's bits, plus one shard's spill file; plus a rotated full-precision copy of the source."""
    source = sum(p.stat().st_size for p in files)
    stored = sum(math.prod(shapes[k]) * _DTYPE_BYTES.get(dtypes[k], 2) for k in weights)
    quantized = sum(math.prod(shapes[k]) * scheme.weights.num_bits // 8 for k in weights)
    output = source - stored + quantized
    return output + min(output, 2 * 2**30) + (source if rotated else 0)


def source_fingerprint(files: list[Path]) -> str:
    """A checkpoint's identity (``qserve.json``'s ``source_sha256``; bench's cache key): each weight file's name,
    size and first MiB."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
        with open(path, "rb") as fh:  # the first MiB: a fingerprint, cheap on large checkpoints
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def _write_streamed(files: list[Path], targets: dict[str, str], scheme: Scheme, recipe: Recipe,
                    writer: ShardWriter, progress: bool) -> list[dict]:
    """Round-to-nearest needs no data: each tensor is read, quantized if targeted, written, freed."""
    with progress_bar(total=len(targets), desc=f"quantize {scheme.name}/{recipe.name}", unit="linear",
                      disable=not progress) as bar:
        for key, tensor in iter_tensors(files):
            if key in targets:
                qw = quantize_weight(tensor, scheme.weights_for(targets[key]), recipe.quantizer)
                writer.add(compressed_tensors.layer_tensors(targets[key], qw, scheme, tensor.dtype))
                bar.update(1)
            else:
                writer.add({key: tensor})
    return []


def _write_calibrated(model_dir: Path, files: list[Path], targets: dict[str, str], scheme: Scheme, recipe: Recipe,
                      writer: ShardWriter, samples: torch.Tensor, options: "QuantizeOptions",
                      progress: bool, log: Callable[[str], None]) -> list[dict]:
    """Transforms and calibrated quantizers: one decoder layer at a time (see ``quantize.layerwise``)."""
    from dataclasses import asdict

    from transformers import AutoConfig

    from quantize.layerwise import calibrated_layers

    config = AutoConfig.from_pretrained(model_dir)
    load = layer_loader(files)
    outside = load(-1)
    writer.add(outside)  # spilled to disk at once
    embed = outside.pop("model.embed_tokens.weight")  # read once: written out and used for the calibration inputs
    dtype = embed.dtype
    del outside
    reports = []
    layers = calibrated_layers(embed, load, config, samples, scheme, recipe,
                               is_target=lambda name: f"{name}.weight" in targets, alpha=options.smoothquant_alpha,
                               gptq_config=options.gptq, device=options.device,
                               smooth_linears=options.smooth_linears, min_expert_tokens=options.min_expert_tokens)
    del embed  # the generator drops its own reference once the calibration inputs exist
    for index, floats, quantized, report in progress_bar(layers, total=config.num_hidden_layers, disable=not progress,
                                                 desc=f"quantize {scheme.name}/{recipe.name}", unit="layer"):
        writer.add(floats)
        for name, qw in quantized.items():
            writer.add(compressed_tensors.layer_tensors(name, qw, scheme, dtype))
        reports.append(asdict(report))
    _log_raised_dampening(reports, options.gptq.dampening, log)
    _log_expert_fallback(reports, options.min_expert_tokens, log)
    return reports


def _moe_scheme(model: torch.nn.Module, scheme: Scheme, log: Callable[[str], None]) -> tuple[Scheme, list[str]]:
    """For a Mixture-of-Experts model: the scheme with the router (and shared-expert gate) kept in the
    checkpoint's precision, and every routed expert projection by its checkpoint name; refuses what the
    expert-by-expert calibration cannot do, before any work."""
    from dataclasses import replace

    from quantize.moe import MoEError, expert_linears, moe_family

    family = moe_family(model.config)
    if family is None:
        return scheme, []
    if scheme.static_activations:
        raise MoEError(f"--scheme {scheme.name} takes static activation scales, which every expert would need from "
                       f"its own calibration tokens; use dynamic activations (w8a8) or a weight-only scheme on "
                       f"{model.config.model_type}")
    experts = expert_linears(model)
    kept = tuple(p for p in family.keep_float if p not in scheme.ignore)
    if scheme.quantizes_weights:
        log(f"{model.config.model_type}: {len(experts)} routed expert linears; the router stays at the checkpoint's "
            f"precision ({', '.join(family.keep_float)})")
    return replace(scheme, ignore=scheme.ignore + kept), experts


def _log_expert_fallback(reports: list[dict], min_tokens: int, log: Callable[[str], None], shown: int = 8) -> None:
    """Says which MoE experts got too few calibration tokens for GPTQ and were rounded to nearest."""
    fell = [(r["index"], e, r["expert_tokens"][e]) for r in reports for e in r["expert_fallback"]]
    total = sum(len(r["expert_tokens"]) for r in reports)
    if total:
        listed = ", ".join(f"layer {i} expert {e} ({n} tokens)" for i, e, n in fell[:shown])
        more = f" and {len(fell) - shown} more" if len(fell) > shown else ""
        log(f"MoE calibration: {total - len(fell)} of {total} experts calibrated on their routed tokens"
            + (f"; rounded to nearest (fewer than {min_tokens} tokens): {listed}{more}" if fell else "")
            + " (per expert: quantization_report.json)")


def _log_raised_dampening(reports: list[dict], asked: float, log: Callable[[str], None], shown: int = 6) -> None:
    """Says which linears GPTQ had to damp more than asked (a Hessian that did not factor): past a few
    tenfold raises GPTQ is close to round-to-nearest there."""
    raised = [(f"model.layers.{r['index']}.{name}", d) for r in reports for name, d in r["dampening"].items()
              if d > asked]
    if raised:
        listed = ", ".join(f"{name} {d:g}" for name, d in raised[:shown])
        more = f" and {len(raised) - shown} more (quantization_report.json)" if len(raised) > shown else ""
        log(f"GPTQ raised dampening above {asked:g} where the Hessian did not factor: {listed}{more}")


def _check_device(device: str) -> None:
    """Fails before any work when the requested device is not there."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")


@contextlib.contextmanager
def _weights_source(model_dir: Path, options: "QuantizeOptions", out_tmp: Path, log: Callable[[str], None],
                    scheme: Scheme, samples: Optional[torch.Tensor]) -> Iterator[tuple[Path, Optional[dict]]]:
    """The checkpoint the quantizer reads: ``model_dir``, or a rotated copy of it (beside the output, removed
    afterwards) when ``options.rotate`` asks for one; a learned rotation is optimised on ``samples`` for
    ``scheme`` first."""
    if not options.rotate:
        yield model_dir, None
        return
    from quantize.rotation import ROTATIONS, rotate_checkpoint

    refine = None
    if ROTATIONS[options.rotate].learned:
        from quantize.spinquant import LearnConfig, learn_rotation

        learn = LearnConfig(steps=options.rotate_steps)
        refine = lambda start: learn_rotation(model_dir, start, scheme, samples, learn, log)  # noqa: E731
    rotated = Path(tempfile.mkdtemp(prefix=".rotated-", dir=out_tmp.parent))
    try:
        report = rotate_checkpoint(model_dir, rotated, options.rotate, options.rotate_seed, refine)
        untied = (f"; the LM head was tied to the embeddings and is now stored on its own "
                  f"(+{report['lm_head_bytes_added'] / 2**20:.1f} MiB)" if report["untied_lm_head"] else "")
        log(f"rotated the residual stream and attention heads ({options.rotate}, seed {options.rotate_seed}){untied}")
        yield rotated, report
    finally:
        shutil.rmtree(rotated, ignore_errors=True)


@dataclass(frozen=True)
class QuantizeOptions:
    """Knobs of the calibrated methods; the defaults are the usual ones."""

    calibration: CalibrationSpec = CalibrationSpec()
    smoothquant_alpha: Optional[float] = 0.5  # None: searched per layer and mapping ("auto")
    smooth_linears: bool = False  # SmoothQuant also between linears (up_proj -> down_proj), not only norms
    gptq: GPTQConfig = GPTQConfig()
    device: str = "cpu"  # where calibrated layers run: "cpu", "cuda", "cuda:1"
    auto_group_size: bool = False  # per layer, the largest group size that divides its inputs
    report_png: bool = False  # also draw the per-layer report (quantization_report.png; needs matplotlib)
    rotate: Optional[str] = None  # a rotation of quantize.rotation.ROTATIONS fused into the weights first
    rotate_seed: int = 0
    rotate_steps: int = 40  # optimiser steps of a learned rotation (one calibration sample each)
    min_expert_tokens: int = MIN_EXPERT_TOKENS  # MoE: an expert routed fewer calibration tokens is rounded to nearest


def quantize_checkpoint(model_dir: Path, scheme: Scheme, method: str, out_dir: Path, force: bool = False,
                        progress: bool = True, log: Callable[[str], None] = print,
                        options: QuantizeOptions = QuantizeOptions()) -> QuantizeReport:
    """Quantizes the linear layers of ``model_dir`` with ``method`` and writes a compressed-tensors checkpoint."""
    start = time.perf_counter()
    recipe = parse_recipe(method)
    files = weight_files(model_dir)
    shapes, dtypes = _tensor_headers(files)
    model = meta_model(model_dir)
    check_weights_fit_config(model, shapes, model_dir)
    linear = [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    scheme, experts = _moe_scheme(model, scheme, log)
    linear += experts
    if not scheme.quantizes_weights and (scheme.kv_cache is None or scheme.overrides or options.rotate):
        raise MethodError(f"--scheme {scheme.name} quantizes no weights: it takes --kv-cache fp8, and no overrides "
                          f"or rotation; choose a weight scheme for those")
    targets = [n for n in linear if scheme.quantizes_weights and not matches(n, scheme.ignore) and f"{n}.weight" in shapes]
    skipped = [n for n in linear if n not in targets]
    if options.auto_group_size:
        scheme, chosen = auto_group_sizes(scheme, targets, shapes)
        log(chosen)
    if scheme.weights.scale_dtype is None:  # a preset that names its scale dtype (gguf-*) keeps it
        scheme = scheme.with_scale_dtype(_scale_dtype(dtypes, {f"{n}.weight" for n in targets}))
    compressed_tensors.check_fits(scheme)
    check_group_fit(scheme, targets, shapes)
    check_fused_consistent(scheme, targets)
    _check_device(options.device)
    needed = _output_bytes_needed(files, shapes, dtypes, {f"{n}.weight" for n in targets}, scheme,
                                  bool(options.rotate))
    check_free_space(out_dir, needed, f"the {scheme.name} checkpoint of {model_dir.name}")
    learned_rotation = False
    if options.rotate:
        from quantize.rotation import ROTATIONS, rotation_family

        rotation_family(model.config, options.rotate)
        learned_rotation = ROTATIONS[options.rotate].learned
        if learned_rotation and options.rotate_steps < 1:
            raise MethodError(f"--rotate-steps {options.rotate_steps}: a learned rotation needs at least 1 step")
        if learned_rotation and options.device != "cpu":
            raise MethodError(f"--rotate learned runs on the CPU (float32, the whole model); drop --device "
                              f"{options.device}, or use --rotate hadamard")
    needs_calibration = (recipe.needs_calibration or scheme.static_activations or scheme.kv_cache is not None
                         or learned_rotation)
    calibration_report, samples = None, None
    if needs_calibration:
        from transformers import AutoTokenizer

        from quantize.layerwise import check_mappings, release_freed_memory

        check_mappings(model, recipe)
        samples, calibration_report = load_calibration(options.calibration, AutoTokenizer.from_pretrained(model_dir))
        release_freed_memory()  # tokenizing the whole text leaves ~100 MiB of freed heap behind
        log(f"calibrating on {samples.shape[0]} x {samples.shape[1]} tokens of {calibration_report['file']}")
    del model
    target_weights = {f"{n}.weight": n for n in targets}

    with atomic_output_dir(out_dir, force=force) as tmp, _weights_source(model_dir, options, tmp, log, scheme, samples) as (source, rotation):
        writer = ShardWriter(tmp)
        if needs_calibration:
            layer_reports = _write_calibrated(source, weight_files(source), target_weights, scheme, recipe, writer,
                                              samples, options, progress, log)
        else:
            layer_reports = _write_streamed(weight_files(source), target_weights, scheme, recipe, writer, progress)
        writer.close()
        config = json.loads((source / "config.json").read_text())
        for name in AUX_FILES:
            if (model_dir / name).exists():
                shutil.copy2(model_dir / name, tmp / name)
        config["quantization_config"] = compressed_tensors.quantization_config(scheme)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        report = QuantizeReport(
            source=str(model_dir), output=str(out_dir), scheme=scheme.to_dict(), method=recipe.name,
            quantized_layers=len(targets), seconds=round(time.perf_counter() - start, 2),
            size_bytes=writer.total_bytes, source_size_bytes=sum(p.stat().st_size for p in files),
            source_sha256=source_fingerprint(files), skipped=skipped, calibration=calibration_report, rotation=rotation)
        (tmp / "qserve.json").write_text(json.dumps(report.to_dict(), indent=2))
        if layer_reports:
            title = f"{model_dir.name}: {scheme.name} / {recipe.name}" if options.report_png else None
            write_layer_report(tmp, layer_reports, figure_title=title)
    log(f"wrote {out_dir}: {len(targets)} layers {scheme.name}/{recipe.name}, "
        f"{report.size_bytes / 2**20:.1f} MiB (source {report.source_size_bytes / 2**20:.1f} MiB), {report.seconds:.1f} s")
    return report
