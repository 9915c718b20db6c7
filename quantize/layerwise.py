"""Calibrated quantization one decoder layer at a time.

The embeddings run once over the calibration samples; a catcher in place of layer 0 records the
hidden states and the keyword arguments (mask, rotary embeddings) the model passes to its layers.
Then, per layer: load its weights from the safetensors files, capture the inputs of its linears,
apply the recipe's transforms, quantize, run the quantized layer to make the next layer's inputs, and
give its memory back. Peak memory is one layer plus the activations, whatever the depth. Llama-style
layers are calibrated group by group in one pass (``quantize.sequential``); others in two passes here.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

import torch

from core.quantized import QuantizedWeight
from quantize.methods import MethodError, Recipe, quantize_weight
from core.schemes import QuantArgs, Scheme
from quantize.sequential import GROUPS, calibrate_staged, staged
from quantize.stats import Stats, StopLayer
from quantize.folding import Folded, apply_transforms, check_family_modules, family_of

BATCH = 4  # samples per forward: 8 gave the same speed with ~400 MiB more peak RSS (allocator high water)
AWQ_SAMPLE_TOKENS = 4096
ALPHA_SEARCH_TOKENS = 2048  # the alpha search runs 17 quantized matmuls per mapping on them
REPORT_TOKENS = 1024  # enough for the report's cosine / relative error; fewer matmuls per linear


class _Caught(Exception):
    pass


@dataclass
class LayerReport:
    index: int
    seconds: float = 0.0
    dampening: dict[str, float] = field(default_factory=dict)
    output_cosine: dict[str, float] = field(default_factory=dict)
    output_rel_error: dict[str, float] = field(default_factory=dict)
    weight_kurtosis: dict[str, float] = field(default_factory=dict)  # as quantized (after transforms)
    input_kurtosis: dict[str, float] = field(default_factory=dict)
    weight_kurtosis_before: dict[str, float] = field(default_factory=dict)  # before transforms
    input_kurtosis_before: dict[str, float] = field(default_factory=dict)
    smoothquant_alpha: dict[str, float] = field(default_factory=dict)  # per mapping, by its first balance linear


def release_freed_memory() -> None:
    """Returns freed heap pages to the OS: without it glibc keeps each layer's scratch tensors'
    fragments and the process grows with depth (measured: +40 MiB per layer on the demo model)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _kurtosis(t: torch.Tensor) -> float:
    t = t.float().flatten()
    centered = t - t.mean()
    return float(centered.pow(4).mean() / centered.pow(2).mean().clamp(min=1e-20).pow(2))


def _linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def _propagate(layer: torch.nn.Module, shell: "_Layers") -> None:
    """Replaces each stored input by the layer's output on it (computed in the compute dtype, stored in the
    checkpoint's), batch by batch, so inputs and outputs are never all held at once."""
    for i, (hidden, kwargs) in enumerate(shell.inputs):
        out = layer(hidden.to(shell.dtype), **kwargs)
        shell.inputs[i] = ((out[0] if isinstance(out, tuple) else out).to(shell.store_dtype), kwargs)


def _stats(shell: "_Layers", hessian: bool, absmax: bool, sample_tokens: int = REPORT_TOKENS) -> Stats:
    return Stats(hessian, absmax, sample_tokens, sum(h.shape[0] * h.shape[1] for h, _ in shell.inputs))


@torch.no_grad()
def _collect(layer: torch.nn.Module, shell: "_Layers", stats: Stats) -> Stats:
    """Input statistics of every linear; from the second batch on, the layer stops at its last linear."""
    handles = [m.register_forward_pre_hook(stats.hook(n)) for n, m in _linears(layer).items()]
    try:
        for hidden, kwargs in shell.inputs:
            try:
                layer(hidden.to(shell.dtype), **kwargs)
            except StopLayer:
                pass
            stats.last = stats.order[-1] if stats.order else None
    finally:
        for h in handles:
            h.remove()
    return stats


def check_mappings(model: torch.nn.Module, recipe: Recipe) -> None:
    """Fails before any work when the model has no decoder layers at ``model.layers.N`` (which the
    layer-by-layer pipeline walks), or when the recipe's transforms cannot fold into this architecture."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise MethodError(f"{recipe.name} calibrates layer by layer and needs decoder layers at model.layers.N "
                          f"(Llama, Mistral, Qwen2 and kin); {type(model).__name__} has none. "
                          f"Round-to-nearest (--method rtn) works on any architecture")
    family = family_of(model.config, recipe)
    if family is not None:
        check_family_modules(family, layers[0])


def _sample_tokens(recipe: Recipe, alpha: Optional[float]) -> int:
    if "awq" in recipe.transforms:
        return AWQ_SAMPLE_TOKENS
    return ALPHA_SEARCH_TOKENS if alpha is None and "smoothquant" in recipe.transforms else REPORT_TOKENS


def compute_dtype(device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The dtype decoder layers run in: the checkpoint's on GPUs and on CPUs with bf16 matrix units; float32
    on other CPUs, where bf16 matmuls run ~3x slower than float32 (measured on AVX-512 without BF16)."""
    if device.type != "cpu" or checkpoint_dtype == torch.float32:
        return checkpoint_dtype
    cpu = torch.cpu
    fast = getattr(cpu, "_is_amx_tile_supported", lambda: False)() or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    return checkpoint_dtype if fast else torch.float32


@dataclass
class _Layers:
    """The meta-device model shell, the calibration hidden states (stored in the checkpoint dtype) and
    the keyword arguments its layers take."""

    layers: torch.nn.ModuleList
    inputs: list[tuple[torch.Tensor, dict]]
    dtype: torch.dtype
    store_dtype: torch.dtype
    device: torch.device


@torch.no_grad()
def _catch_inputs(embed: torch.Tensor, config: Any, samples: torch.Tensor, device: torch.device) -> _Layers:
    """Runs the embeddings over the samples; a catcher in place of layer 0 records what layer 0 receives."""
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(device, embed.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    base = model.model
    base.embed_tokens.to_empty(device=device)
    base.embed_tokens.weight.copy_(embed)
    with torch.device(device):  # rotary tables are buffers built in __init__
        base.rotary_emb = type(base.rotary_emb)(config=config)
    shell = _Layers(base.layers, [], dtype, embed.dtype, device)
    first = base.layers[0]

    class Catcher(torch.nn.Module):
        def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            kept = {k: v for k, v in kwargs.items() if k != "past_key_values"}
            shell.inputs.append((hidden.to(shell.store_dtype), kept))
            raise _Caught

    base.layers[0] = Catcher()
    for batch in samples.split(BATCH):
        try:
            base(input_ids=batch.to(device), use_cache=False)
        except _Caught:
            pass
    base.layers[0] = first
    del base.embed_tokens
    return shell


def _quantize_rows(names: list[str], targets: dict[str, torch.nn.Linear], args: QuantArgs, stats: Stats,
                   recipe: Recipe, gptq_config: Any) -> dict[str, QuantizedWeight]:
    """Quantizes linears with the same args and inputs as one stacked weight: per-row scales and GPTQ's
    column loop treat rows independently given the Hessian, so the result is the same as one by one, with
    one Cholesky and one column loop for q/k/v (and for gate/up) instead of three (two)."""
    calibration = None
    if recipe.quantizer == "gptq":
        calibration = {"hessian": stats.hessian_of(names[0])}
        if gptq_config is not None:
            calibration["gptq"] = gptq_config
    weight = torch.cat([targets[n].weight.detach().float() for n in names])
    qw = quantize_weight(weight, args, recipe.quantizer, calibration)
    parts, first = {}, 0
    for name in names:
        rows = slice(first, first + targets[name].out_features)
        parts[name] = replace(qw, q=qw.q[rows], scale=qw.scale[rows], zero=qw.zero[rows])
        first = rows.stop
    return parts


def _report_linear(name: str, weight: torch.Tensor, new_weight: torch.Tensor, stats: Stats, folded: Folded,
                   report: LayerReport) -> None:
    """Output error of the quantized linear against the original float one, on the same inputs: against the
    weights before AWQ's clipping, with outputs mapped back where a transform divided the linear's rows."""
    x = stats.samples_of(name)[:REPORT_TOKENS]
    ref_out, q_out = x @ folded.reference.get(name, weight).T, x @ new_weight.T
    if name in folded.out_scale:
        ref_out, q_out = ref_out * folded.out_scale[name], q_out * folded.out_scale[name]
    report.output_cosine[name] = float(torch.nn.functional.cosine_similarity(ref_out.flatten(), q_out.flatten(), dim=0))
    report.output_rel_error[name] = float((q_out - ref_out).norm() / ref_out.norm().clamp(min=1e-12))
    report.weight_kurtosis[name] = _kurtosis(weight)
    report.input_kurtosis[name] = _kurtosis(x)


def _quantize_group(names: tuple[str, ...], targets: dict[str, torch.nn.Linear], args: dict[str, QuantArgs],
                    stats: Stats, recipe: Recipe, gptq_config: Any, folded: Folded,
                    report: LayerReport) -> dict[str, QuantizedWeight]:
    """Quantizes the targets among ``names`` in place (each weight becomes its dequantized value) and fills
    their report rows; per-channel or grouped linears that share inputs and args are stacked."""
    runs: dict[Any, list[str]] = {}
    for name in (n for n in names if n in targets):
        stackable = args[name].strategy in ("channel", "group")
        runs.setdefault((stats.reads_from(name), args[name]) if stackable else name, []).append(name)
    quantized = {}
    for run in runs.values():
        for name, qw in _quantize_rows(run, targets, args[run[0]], stats, recipe, gptq_config).items():
            linear = targets[name]
            new_weight = qw.dequantize()
            _report_linear(name, linear.weight.detach().float(), new_weight, stats, folded, report)
            if qw.dampening is not None:
                report.dampening[name] = qw.dampening
            linear.weight.data = new_weight.to(linear.weight.dtype)
            quantized[name] = qw
    return quantized


def _input_scale(stats: Stats, name: str, args: QuantArgs) -> torch.Tensor:
    """Static per-tensor activation scale from the calibration inputs' absolute maximum."""
    absmax = stats.absmax[name].max().clamp(min=1e-8)
    return (absmax / ((args.qmax - args.qmin) / 2)).reshape(1).float()


def calibrated_layers(embed: torch.Tensor, load_layer: Callable[[int], dict[str, torch.Tensor]], config: Any,
                      samples: torch.Tensor, scheme: Scheme, recipe: Recipe, is_target: Callable[[str], bool],
                      alpha: Optional[float] = 0.5, gptq_config: Any = None, device: str | torch.device = "cpu",
                      smooth_linears: bool = False,
                      ) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, QuantizedWeight], LayerReport]]:
    """Yields, per decoder layer, its float tensors (transformed), its quantized linears (on the CPU, with
    ``input_scale`` set for static activation schemes) and a report."""
    device, family = torch.device(device), family_of(config, recipe)
    shell = _catch_inputs(embed, config, samples, device)
    del embed  # the caller may drop its reference too: nothing here needs the embedding again
    release_freed_memory()
    for index in range(len(shell.layers)):
        start, report, prefix = time.perf_counter(), LayerReport(index), f"model.layers.{index}."
        layer = shell.layers[index]
        layer.to_empty(device=device)
        state = load_layer(index)
        dtypes = {name: tensor.dtype for name, tensor in state.items()}
        layer.load_state_dict({k[len(prefix):]: v for k, v in state.items()})
        del state
        targets = {n: m for n, m in _linears(layer).items() if is_target(prefix + n)}
        args = {n: scheme.weights_for(prefix + n) for n in targets}
        folded = Folded()
        if family is not None:
            stats = _collect(layer, shell, _stats(shell, hessian=False, absmax="smoothquant" in recipe.transforms,
                                                  sample_tokens=_sample_tokens(recipe, alpha)))
            report.input_kurtosis_before = {n: _kurtosis(stats.samples_of(n)) for n in targets}
            report.weight_kurtosis_before = {n: _kurtosis(m.weight) for n, m in targets.items()}
            folded = apply_transforms(layer, family, stats, recipe, args, alpha, smooth_linears,
                                      scheme.input_activations, report.smoothquant_alpha.__setitem__)
        stats = _stats(shell, hessian=recipe.quantizer == "gptq", absmax=scheme.static_activations)
        quantized: dict[str, QuantizedWeight] = {}

        def quantize_group(names: tuple[str, ...]) -> None:
            try:
                group = _quantize_group(names, targets, args, stats, recipe, gptq_config, folded, report)
            except torch.linalg.LinAlgError as exc:
                raise MethodError(f"GPTQ cannot use the calibration Hessian of {prefix}{'/'.join(names)} ({exc}); "
                                  f"try more or longer calibration samples (--num-samples, --calib-seq-len), a "
                                  f"larger --dampening (e.g. 0.1), or --method rtn") from None
            for name, qw in group.items():
                scale = _input_scale(stats, name, scheme.input_activations) if scheme.static_activations else None
                quantized[prefix + name] = qw.to_cpu(input_scale=scale)

        propagate = index + 1 < len(shell.layers)  # the last layer's outputs feed nothing
        if staged(config, layer):
            stats.share(GROUPS)
            calibrate_staged(layer, shell, stats.record, quantize_group, propagate)
        else:
            _collect(layer, shell, stats)
            quantize_group(tuple(targets))
            if propagate:
                _propagate(layer, shell)
        del stats
        floats = {prefix + k: v.detach().to("cpu", dtypes[prefix + k]) for k, v in layer.state_dict().items()
                  if prefix + k in dtypes and k.removesuffix(".weight") not in targets}
        report.seconds = time.perf_counter() - start
        layer.to("meta")
        release_freed_memory()
        yield index, floats, quantized, report
