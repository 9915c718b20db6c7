"""Calibrated quantization one decoder layer at a time.

The embeddings run once over the calibration samples; a catcher in place of layer 0 records the
hidden states and the keyword arguments (mask, rotary embeddings) the model passes to its layers.
Then, per layer: load its weights from the safetensors files, capture the inputs of its linears,
apply the recipe's transforms, quantize, run the quantized layer to make the next layer's inputs, and
give its memory back. Peak memory is one layer plus the activations, whatever the depth. Llama-style
layers are calibrated group by group in one pass (``quantize.sequential``); others in two passes here.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional

import torch

from core.quantized import QuantizedWeight
from quantize.methods import MethodError, Recipe, quantize_weight
from core.schemes import QuantArgs, Scheme
from quantize.sequential import GROUPS, calibrate_staged, staged
from quantize.capture import StopForward
from quantize.report import REPORT_TOKENS, LayerReport, kurtosis, report_linear
from quantize.stats import Stats
from quantize.folding import Family, Folded, apply_transforms, check_family_modules, family_of
from quantize.kv_cache import observing
from quantize.shell import Shell, catch_inputs
from quantize.moe import MIN_EXPERT_TOKENS, MoEFamily, RoutedExperts, calibrate_sparse_block, is_sparse, moe_family
from quantize.moe import unfuse_experts

AWQ_SAMPLE_TOKENS = 4096
ALPHA_SEARCH_TOKENS = 2048  # the alpha search runs 17 quantized matmuls per mapping on them


def release_freed_memory() -> None:
    """Returns freed heap pages to the OS: without it glibc keeps each layer's scratch tensors'
    fragments and the process grows with depth (measured: +40 MiB per layer on the demo model)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def _propagate(layer: torch.nn.Module, shell: Shell) -> None:
    """Replaces each stored input by the layer's output on it (computed in the compute dtype, stored in the
    checkpoint's), batch by batch, so inputs and outputs are never all held at once."""
    for i, (hidden, kwargs) in enumerate(shell.inputs):
        out = layer(hidden.to(shell.dtype), **kwargs)
        shell.inputs[i] = ((out[0] if isinstance(out, tuple) else out).to(shell.store_dtype), kwargs)


def _stats(shell: Shell, hessian: bool, absmax: bool, sample_tokens: int = REPORT_TOKENS) -> Stats:
    return Stats(hessian, absmax, sample_tokens, sum(h.shape[0] * h.shape[1] for h, _ in shell.inputs))


@torch.no_grad()
def _collect(layer: torch.nn.Module, shell: Shell, stats: Stats) -> Stats:
    """Input statistics of every linear; from the second batch on, the layer stops at its last linear."""
    handles = [m.register_forward_pre_hook(stats.hook(n)) for n, m in _linears(layer).items()]
    try:
        for hidden, kwargs in shell.inputs:
            try:
                layer(hidden.to(shell.dtype), **kwargs)
            except StopForward:  # raised by the hook of the last linear once its input is recorded
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


def _quantize_group(names: tuple[str, ...], targets: dict[str, torch.nn.Linear], args: dict[str, QuantArgs],
                    stats: Stats, recipe: Recipe, gptq_config: Any, folded: Folded,
                    report: LayerReport) -> dict[str, QuantizedWeight]:
    """Quantizes the targets among ``names`` in place (each weight becomes its dequantized value) and fills
    their report rows (where inputs were seen: an MoE expert may have none); per-channel or grouped linears
    that share inputs and args are stacked."""
    runs: dict[Any, list[str]] = {}
    for name in (n for n in names if n in targets):
        stackable = args[name].strategy in ("channel", "group")
        runs.setdefault((stats.reads_from(name), args[name]) if stackable else name, []).append(name)
    quantized = {}
    for run in runs.values():
        for name, qw in _quantize_rows(run, targets, args[run[0]], stats, recipe, gptq_config).items():
            linear = targets[name]
            new_weight = qw.dequantize()
            if name in stats.samples:
                report_linear(name, linear.weight.detach().float(), new_weight, stats, folded, report)
            if qw.dampening is not None:
                report.dampening[name] = qw.dampening
            linear.weight.data = new_weight.to(linear.weight.dtype)
            quantized[name] = qw
    return quantized


def _input_scale(stats: Stats, name: str, args: QuantArgs) -> torch.Tensor:
    """Static per-tensor activation scale from the calibration inputs' absolute maximum."""
    absmax = stats.absmax[name].max().clamp(min=1e-8)
    return (absmax / ((args.qmax - args.qmin) / 2)).reshape(1).float()


@dataclass(frozen=True)
class _Plan:
    """What every layer of one calibrated run shares."""

    config: Any
    scheme: Scheme
    recipe: Recipe
    is_target: Callable[[str], bool]
    alpha: Optional[float]
    gptq_config: Any
    smooth_linears: bool
    device: torch.device
    family: Optional[Family]  # where the transforms fold; None when the recipe has none
    moe: Optional[MoEFamily] = None  # the sparse blocks' names (Mixture-of-Experts models)
    min_expert_tokens: int = MIN_EXPERT_TOKENS  # an expert routed fewer calibration tokens is rounded to nearest


class _LayerJob:
    """One decoder layer, in the order the work happens: load its weights, apply the recipe's transforms,
    quantize its linears group by group while its inputs are recorded, make the next layer's inputs."""

    def __init__(self, plan: _Plan, shell: Shell, index: int, state: dict[str, torch.Tensor]) -> None:
        self.plan, self.shell, self.prefix = plan, shell, f"model.layers.{index}."
        self.report, self.quantized = LayerReport(index), {}
        self.layer = shell.layers[index]
        shell.enter(index)
        self.sparse = plan.moe is not None and is_sparse(self.layer, plan.moe)
        if self.sparse and not isinstance(getattr(self.layer, plan.moe.block).experts, RoutedExperts):
            unfuse_experts(self.layer, plan.moe)  # one nn.Linear per expert projection, named as stored
        self.layer.to_empty(device=plan.device)
        self.dtypes = {name: tensor.dtype for name, tensor in state.items()}
        self.layer.load_state_dict({self._module_name(k[len(self.prefix):]): v for k, v in state.items()})
        self.targets = {n: m for n, m in _linears(self.layer).items() if plan.is_target(self._stored(n))}
        self.args = {n: plan.scheme.weights_for(self._stored(n)) for n in self.targets}
        self.folded, self.stats = Folded(), None
        self.kv_scales: dict[str, torch.Tensor] = {}

    def _stored(self, name: str) -> str:
        """A layer-relative module name as the checkpoint spells it, with the layer's prefix."""
        return self.prefix + (self.plan.moe.stored_name(name) if self.plan.moe else name)

    def _module_name(self, name: str) -> str:
        return self.plan.moe.module_name(name) if self.plan.moe else name

    def transform(self) -> None:
        """SmoothQuant/AWQ, on statistics of the float layer's inputs (kurtosis before them in the report)."""
        plan, family = self.plan, self.plan.family
        if family is None:
            return
        stats = _collect(self.layer, self.shell, _stats(self.shell, hessian=False,
                                                        absmax="smoothquant" in plan.recipe.transforms,
                                                        sample_tokens=_sample_tokens(plan.recipe, plan.alpha)))
        self.report.input_kurtosis_before = {n: kurtosis(stats.samples_of(n)) for n in self.targets}
        self.report.weight_kurtosis_before = {n: kurtosis(m.weight) for n, m in self.targets.items()}
        self.folded = apply_transforms(self.layer, family, stats, plan.recipe, self.args, plan.alpha,
                                       plan.smooth_linears, plan.scheme.input_activations,
                                       self.report.smoothquant_alpha.__setitem__)

    def quantize_group(self, names: tuple[str, ...], stats: Optional[Stats] = None, rtn: bool = False) -> None:
        """Quantizes the targets among ``names`` from the statistics recorded so far (or ``stats``), by the
        recipe's quantizer or, with ``rtn``, round to nearest."""
        stats = stats or self.stats
        recipe = replace(self.plan.recipe, quantizer="rtn") if rtn else self.plan.recipe
        try:
            group = _quantize_group(names, self.targets, self.args, stats, recipe, self.plan.gptq_config,
                                    self.folded, self.report)
        except torch.linalg.LinAlgError as exc:
            raise MethodError(f"GPTQ cannot use the calibration Hessian of {self.prefix}{'/'.join(names)} ({exc}); "
                              f"try more or longer calibration samples (--num-samples, --calib-seq-len), a "
                              f"larger --dampening (e.g. 0.1), or --method rtn") from None
        scheme = self.plan.scheme
        for name, qw in group.items():
            scale = _input_scale(stats, name, scheme.input_activations) if scheme.static_activations else None
            self.quantized[self._stored(name)] = qw.to_cpu(input_scale=scale)

    def quantize_experts(self, inputs: list[torch.Tensor]) -> None:
        """The sparse block's experts, one at a time on the tokens routed to each (``quantize.moe``)."""
        moe = self.plan.moe
        result = calibrate_sparse_block(getattr(self.layer, moe.block), moe.block, inputs, self.quantize_group, moe,
                                        self.plan.min_expert_tokens)
        self.report.expert_tokens, self.report.expert_fallback = result.tokens, result.fallback

    def quantize(self, propagate: bool) -> None:
        """Llama-style layers stage by stage in one pass; others record everything, quantize, then run again.
        KV-cache scales are observed where the quantized q/k/v first run (so the last layer runs too)."""
        scheme, recipe = self.plan.scheme, self.plan.recipe
        self.stats = _stats(self.shell, hessian=recipe.quantizer == "gptq", absmax=scheme.static_activations)
        observe, kv = observing(self.layer.self_attn) if scheme.kv_cache else contextlib.nullcontext(), None
        if staged(self.plan.config, self.layer):
            self.stats.share(GROUPS)
            with observe as kv:
                calibrate_staged(self.layer, self.shell, self.stats.record, self.quantize_group, propagate,
                                 self.quantize_experts if self.sparse else None)
        else:
            _collect(self.layer, self.shell, self.stats)
            self.quantize_group(tuple(self.targets))
            if propagate or scheme.kv_cache:
                with observe as kv:
                    _propagate(self.layer, self.shell)
        if kv is not None:
            self.kv_scales = {f"self_attn.{k}": v for k, v in kv.scales(scheme.kv_cache).items()}
        self.stats = None

    def release(self) -> dict[str, torch.Tensor]:
        """The layer's float tensors (transformed, in their checkpoint dtypes); its memory goes back."""
        floats = {self._stored(k): v.detach().to("cpu", self.dtypes[self._stored(k)])
                  for k, v in self.layer.state_dict().items()
                  if self._stored(k) in self.dtypes and k.removesuffix(".weight") not in self.targets}
        floats.update({self.prefix + k: v for k, v in self.kv_scales.items()})
        self.layer.to("meta")
        release_freed_memory()
        return floats


def calibrated_layers(embed: torch.Tensor, load_layer: Callable[[int], dict[str, torch.Tensor]], config: Any,
                      samples: torch.Tensor, scheme: Scheme, recipe: Recipe, is_target: Callable[[str], bool],
                      alpha: Optional[float] = 0.5, gptq_config: Any = None, device: str | torch.device = "cpu",
                      smooth_linears: bool = False, min_expert_tokens: int = MIN_EXPERT_TOKENS,
                      ) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, QuantizedWeight], LayerReport]]:
    """Yields, per decoder layer, its float tensors (transformed), its quantized linears (on the CPU, with
    ``input_scale`` set for static activation schemes) and a report."""
    # an architecture the transforms cannot fold into fails here, before any work
    plan = _Plan(config, scheme, recipe, is_target, alpha, gptq_config, smooth_linears, torch.device(device),
                 family_of(config, recipe), moe_family(config), min_expert_tokens)
    shell = catch_inputs(embed, config, samples, plan.device, observe_kv=scheme.kv_cache is not None)
    del embed  # the caller may drop its reference too: nothing here needs the embedding again
    release_freed_memory()
    for index in range(len(shell.layers)):
        start = time.perf_counter()
        job = _LayerJob(plan, shell, index, load_layer(index))
        job.transform()
        job.quantize(propagate=index + 1 < len(shell.layers))  # the last layer's outputs feed nothing
        floats = job.release()
        job.report.seconds = time.perf_counter() - start
        yield index, floats, job.quantized, job.report
