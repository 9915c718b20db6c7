"""Calibrated quantization one decoder layer at a time.

The embeddings run once over the calibration samples; a catcher in place of layer 0 records the
hidden states and the keyword arguments (mask, rotary embeddings) the model passes to its layers.
Then, per layer: load its weights from the safetensors files, capture the inputs of its linears,
apply the recipe's transforms, quantize, run the quantized layer to make the next layer's inputs, and
give its memory back. Peak memory is one layer plus the activations, whatever the depth.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from quantize.methods import QuantizedWeight, Recipe, quantize_weight
from quantize.schemes import Scheme
from quantize.transforms import LLAMA_MAPPINGS, awq_clip, awq_scales, fold_scales, smoothquant_scales

BATCH = 8
AWQ_SAMPLE_TOKENS = 4096


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


def _release_freed_memory() -> None:
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


class Stats:
    """Per-linear input statistics gathered by forward hooks over all calibration batches."""

    def __init__(self, hessian: bool) -> None:
        self.want_hessian = hessian
        self.absmax: dict[str, torch.Tensor] = {}
        self.hessian: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self._last_product: tuple[Any, torch.Tensor] = (None, torch.empty(0))

    def _product(self, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x^T x`` in float32, computed once for linears that read the same input (q/k/v, gate/up)."""
        key = (raw.data_ptr(), tuple(raw.shape))
        if self._last_product[0] != key:
            self._last_product = (key, x.T @ x)
        return self._last_product[1]

    def hook(self, name: str) -> Callable:
        def record(_module: torch.nn.Module, inputs: tuple, _output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            amax = x.abs().amax(dim=0)
            self.absmax[name] = torch.maximum(self.absmax[name], amax) if name in self.absmax else amax
            self.count[name] = self.count.get(name, 0) + x.shape[0]
            if self.want_hessian:
                h = self._product(inputs[0], x)
                self.hessian[name] = self.hessian[name] + h if name in self.hessian else h.clone()
            if sum(len(s) for s in self.samples.get(name, [])) < AWQ_SAMPLE_TOKENS:
                stride = max(1, x.shape[0] * BATCH // AWQ_SAMPLE_TOKENS)
                # a copy: a strided view would keep the whole float32 batch alive (~90 MiB per batch)
                self.samples.setdefault(name, []).append(x[::stride].clone())

        return record

    def hessian_of(self, name: str) -> torch.Tensor:
        return 2 * self.hessian[name] / self.count[name]

    def samples_of(self, name: str) -> torch.Tensor:
        return torch.cat(self.samples[name])[:AWQ_SAMPLE_TOKENS]


def _linears(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def _run(layer: torch.nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def _collect(layer: torch.nn.Module, inputs: list, hessian: bool) -> Stats:
    stats = Stats(hessian)
    handles = [m.register_forward_hook(stats.hook(n)) for n, m in _linears(layer).items()]
    try:
        _run(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return stats


def check_mappings(layer: torch.nn.Module, recipe: Recipe) -> None:
    """Fails before any work when a transform cannot find the modules it rescales."""
    if not recipe.transforms:
        return
    from quantize.methods import MethodError

    names = dict(layer.named_modules())
    missing = [m for mp in LLAMA_MAPPINGS for m in (mp.smooth, *mp.balance) if m not in names]
    if missing:
        raise MethodError(f"{'+'.join(recipe.transforms)} cannot apply to this architecture: no modules named "
                          f"{', '.join(missing)} in its decoder layer (known layout: Llama/Mistral/Qwen2)")


@torch.no_grad()
def _transform(layer: torch.nn.Module, stats: Stats, recipe: Recipe, scheme: Scheme, alpha: float) -> None:
    modules = dict(layer.named_modules())
    for mapping in LLAMA_MAPPINGS:
        smooth, balance = modules[mapping.smooth], [modules[b] for b in mapping.balance]
        if isinstance(smooth, torch.nn.Linear) and smooth.out_features != balance[0].in_features:
            continue  # e.g. v_proj -> o_proj under grouped-query attention: shapes do not line up
        first = mapping.balance[0]
        if "smoothquant" in recipe.transforms and not isinstance(smooth, torch.nn.Linear):
            s = smoothquant_scales(stats.absmax[first], [b.weight for b in balance], alpha)
            fold_scales(smooth, balance, s)
            stats.absmax[first] = stats.absmax[first] / s
        if "awq" in recipe.transforms:
            x = stats.samples_of(first)
            s = awq_scales(x, [b.weight for b in balance], scheme.weights)
            fold_scales(smooth, balance, s)
            for b in balance:
                b.weight.copy_(awq_clip(x / s, b.weight, scheme.weights))


def calibrated_layers(embed: torch.Tensor, load_layer: Callable[[int], dict[str, torch.Tensor]], config: Any,
                      samples: torch.Tensor, scheme: Scheme, recipe: Recipe, is_target: Callable[[str], bool],
                      alpha: float = 0.5, gptq_config: Any = None,
                      ) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, QuantizedWeight], LayerReport]]:
    """Yields, per decoder layer, its float tensors (transformed), its quantized linears and a report."""
    from transformers import AutoModelForCausalLM

    # Layers run in the checkpoint's dtype (bf16 matmuls are ~5x faster than fp32 on CPUs with AMX or
    # AVX512-BF16); statistics, Hessians and the quantizers work in float32.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=embed.dtype)
    model.requires_grad_(False)
    base = model.model
    base.embed_tokens.to_empty(device="cpu")
    base.embed_tokens.weight.copy_(embed)
    base.rotary_emb = type(base.rotary_emb)(config=config)
    layers = base.layers
    inputs: list[tuple[torch.Tensor, dict]] = []
    first = layers[0]

    class Catcher(torch.nn.Module):
        def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            inputs.append((hidden, {k: v for k, v in kwargs.items() if k != "past_key_values"}))
            raise _Caught

    layers[0] = Catcher()
    with torch.no_grad():
        for batch in samples.split(BATCH):
            try:
                base(input_ids=batch, use_cache=False)
            except _Caught:
                pass
    layers[0] = first
    del base.embed_tokens

    for index in range(len(layers)):
        start = time.perf_counter()
        report = LayerReport(index)
        layer = layers[index]
        prefix = f"model.layers.{index}."
        layer.to_empty(device="cpu")
        dtypes = {}
        state = load_layer(index)
        for name, tensor in state.items():
            dtypes[name] = tensor.dtype
        layer.load_state_dict({k[len(prefix):]: v for k, v in state.items()})
        targets = {n: m for n, m in _linears(layer).items() if is_target(prefix + n)}
        reference = {n: m.weight.detach().float() for n, m in targets.items()} if recipe.transforms else {}
        if recipe.transforms:
            stats = _collect(layer, inputs, hessian=False)
            report.input_kurtosis_before = {n: _kurtosis(stats.samples_of(n)) for n in targets}
            report.weight_kurtosis_before = {n: _kurtosis(w) for n, w in reference.items()}
            _transform(layer, stats, recipe, scheme, alpha)
        needs_hessian = recipe.quantizer == "gptq"
        stats = _collect(layer, inputs, hessian=needs_hessian)
        quantized: dict[str, QuantizedWeight] = {}
        for name, linear in targets.items():
            calibration = {"hessian": stats.hessian_of(name)} if needs_hessian else None
            if calibration is not None and gptq_config is not None:
                calibration["gptq"] = gptq_config
            weight = linear.weight.detach().float()
            qw = quantize_weight(weight, scheme.weights, recipe.quantizer, calibration)
            x = stats.samples_of(name)
            ref_out = x @ weight.T
            new_weight = qw.dequantize()
            q_out = x @ new_weight.T
            report.output_cosine[name] = float(torch.nn.functional.cosine_similarity(ref_out.flatten(), q_out.flatten(), dim=0))
            report.output_rel_error[name] = float((q_out - ref_out).norm() / ref_out.norm().clamp(min=1e-12))
            report.weight_kurtosis[name] = _kurtosis(weight)
            report.input_kurtosis[name] = _kurtosis(x)
            if qw.dampening is not None:
                report.dampening[name] = qw.dampening
            linear.weight.data = new_weight.to(linear.weight.dtype)
            quantized[name] = qw
        outputs = _run(layer, inputs)
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(outputs, inputs)]
        floats = {prefix + k: v.detach().to(dtypes[prefix + k]) for k, v in layer.state_dict().items()
                  if prefix + k in dtypes and k.removesuffix(".weight") not in targets}
        report.seconds = time.perf_counter() - start
        layer.to("meta")
        _release_freed_memory()
        yield index, floats, {prefix + n: q for n, q in quantized.items()}, report
