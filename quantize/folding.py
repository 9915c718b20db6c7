"""Where the equivalence transforms (SmoothQuant, AWQ) fold their scales, per architecture, and applying
them to one decoder layer in the recipe's order.

Folding divides the module that produces a linear's input by ``s`` and multiplies the linear's columns by
``s``; that keeps the float function only if the producer really scales its output channel by channel. A
norm computes ``x_hat * (offset + w)``: offset 0 in Llama's RMSNorm, 1 in Gemma's; and which norm feeds
the MLP differs (Gemma 2/3's ``post_attention_layernorm`` normalises the attention output, the MLP reads
``pre_feedforward_layernorm``). So the transforms run only on the families listed in ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from core.schemes import QuantArgs
from quantize.methods import TRANSFORMS, MethodError, Recipe
from quantize.transforms import awq_clip, awq_scales, fold_scales, smoothquant_scales, smoothquant_search


@dataclass(frozen=True)
class Mapping:
    """``smooth`` produces the input of every linear in ``balance`` (names relative to a decoder layer)."""

    smooth: str
    balance: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """How a family's decoder layer feeds its linears, and how its norms scale (``x_hat * (offset + w)``)."""

    name: str
    norm_offset: float
    mappings: tuple[Mapping, ...]


_ATTENTION = (Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              Mapping("self_attn.v_proj", ("self_attn.o_proj",)))
_MLP_FROM = lambda norm: (Mapping(norm, ("mlp.gate_proj", "mlp.up_proj")),  # noqa: E731
                          Mapping("mlp.up_proj", ("mlp.down_proj",)))
LLAMA = Family("llama", 0.0, _ATTENTION + _MLP_FROM("post_attention_layernorm"))
GEMMA = Family("gemma", 1.0, _ATTENTION + _MLP_FROM("post_attention_layernorm"))
GEMMA2 = Family("gemma2", 1.0, _ATTENTION + _MLP_FROM("pre_feedforward_layernorm"))
# Phi-3 fuses q/k/v and gate/up into one linear each: the norms fold into the fused linears; v -> o and up ->
# down would scale a slice of a fused linear's rows, which llm-compressor's Phi-3 mappings skip too
PHI3 = Family("phi3", 0.0, (Mapping("input_layernorm", ("self_attn.qkv_proj",)),
                            Mapping("post_attention_layernorm", ("mlp.gate_up_proj",))))
FAMILIES: dict[str, Family] = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
    "gemma": GEMMA, "gemma2": GEMMA2, "gemma3_text": GEMMA2, "phi3": PHI3,
}


def family_of(config: Any, recipe: Recipe) -> Optional[Family]:
    """The family whose folding rules apply; None when the recipe folds nothing. Refuses other architectures."""
    if not recipe.transforms:
        return None
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise MethodError(f"{'+'.join(recipe.transforms)} folds scales into norms and linears, which is defined for "
                          f"model types {', '.join(sorted(FAMILIES))}, not {model_type!r}; RTN and GPTQ "
                          f"(--method rtn|gptq) need no folding and work on it")
    return FAMILIES[model_type]


@dataclass
class Folded:
    """What the transforms did to a layer, for measuring quantization error in the original float space:
    ``reference`` holds the weights before AWQ clipped them (the only non-equivalent step), ``out_scale`` the
    factor that maps a linear's outputs back when its rows were divided (a linear that smooths another)."""

    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    out_scale: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Step:
    """One mapping of one layer, as a transform sees it."""

    mapping: Mapping
    smooth: torch.nn.Module
    balance: list[torch.nn.Linear]
    stats: Any
    args: dict[str, QuantArgs]
    options: dict[str, Any]
    folded: Folded

    @property
    def first(self) -> str:
        return self.mapping.balance[0]

    def fold(self, s: torch.Tensor, offset: float) -> None:
        """Folds ``s`` and keeps the statistics of the balance layers' inputs in the new space, so the next
        transform of the recipe sees the activations as they now are."""
        fold_scales(self.smooth, self.balance, s, offset)
        for name in self.mapping.balance:
            self.stats.samples_of(name).div_(s)
            if name in self.stats.absmax:
                self.stats.absmax[name] = self.stats.absmax[name] / s
        if isinstance(self.smooth, torch.nn.Linear):
            name = self.mapping.smooth
            self.folded.out_scale[name] = self.folded.out_scale.get(name, torch.ones_like(s)) * s
            if name in self.folded.reference:
                self.folded.reference[name] = self.folded.reference[name] / s.unsqueeze(1)


def _smoothquant(step: _Step, offset: float) -> None:
    # SmoothQuant proper (and LLMC, llm-compressor) folds into norms only; ``smooth_linears`` also folds
    # into a linear feeding another (up_proj -> down_proj), as lmquant does
    if isinstance(step.smooth, torch.nn.Linear) and not step.options["smooth_linears"]:
        return
    weights, alpha = [b.weight for b in step.balance], step.options["alpha"]
    if alpha is None:
        s, alpha = smoothquant_search(step.stats.samples_of(step.first), step.stats.absmax[step.first], weights,
                                      step.args[step.first], step.options["act_args"])
    else:
        s = smoothquant_scales(step.stats.absmax[step.first], weights, alpha)
    step.options["report_alpha"](step.first, alpha)
    step.fold(s, offset)


def _awq(step: _Step, offset: float) -> None:
    x = step.stats.samples_of(step.first)
    step.fold(awq_scales(x, [b.weight for b in step.balance], step.args[step.first]), offset)
    for name, b in zip(step.mapping.balance, step.balance):
        step.folded.reference[name] = b.weight.detach().float().clone()
        b.weight.copy_(awq_clip(step.stats.samples_of(step.first), b.weight, step.args[name]))


TRANSFORM_STEPS: dict[str, Callable[[_Step, float], None]] = {"smoothquant": _smoothquant, "awq": _awq}
assert set(TRANSFORM_STEPS) == set(TRANSFORMS), "every transform name parse_recipe accepts needs a step here"


def check_family_modules(family: Family, layer: torch.nn.Module) -> None:
    """Fails before any work when the decoder layer lacks a module the family's mappings name."""
    names = dict(layer.named_modules())
    missing = [m for mp in family.mappings for m in (mp.smooth, *mp.balance) if m not in names]
    if missing:
        raise MethodError(f"the {family.name} folding rules name modules this decoder layer does not have: "
                          f"{', '.join(missing)}; use --method rtn or gptq")


@torch.no_grad()
def apply_transforms(layer: torch.nn.Module, family: Family, stats: Any, recipe: Recipe, args: dict[str, QuantArgs],
                     alpha: Optional[float], smooth_linears: bool = False, act_args: Optional[QuantArgs] = None,
                     report_alpha: Callable[[str, float], None] = lambda name, alpha: None) -> Folded:
    """Applies the recipe's transforms, in the recipe's order, to each mapping of the layer; ``alpha`` None
    searches SmoothQuant's migration strength per mapping (``report_alpha`` receives the choice)."""
    modules, folded = dict(layer.named_modules()), Folded()
    options = {"alpha": alpha, "smooth_linears": smooth_linears, "act_args": act_args, "report_alpha": report_alpha}
    for mapping in family.mappings:
        smooth, balance = modules[mapping.smooth], [modules[b] for b in mapping.balance]
        if isinstance(smooth, torch.nn.Linear) and smooth.out_features != balance[0].in_features:
            continue  # e.g. v_proj -> o_proj under grouped-query attention: shapes do not line up
        if any(b not in args for b in mapping.balance):
            continue  # a balance layer is not quantized (ignored): nothing to protect
        step = _Step(mapping, smooth, balance, stats, args, options, folded)
        for name in recipe.transforms:
            TRANSFORM_STEPS[name](step, family.norm_offset)
    return folded
