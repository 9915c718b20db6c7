"""Quantization methods and recipes, registered by name; ``quantize_weight`` and ``parse_recipe`` are the entry points.

A *quantizer* maps one float weight (with the Hessian of its inputs, for GPTQ) to integers and scales.
A *transform* rescales a decoder layer before quantization (SmoothQuant, AWQ). A recipe is transforms
followed by one quantizer: ``awq`` is AWQ then RTN, ``smoothquant+gptq`` is SmoothQuant then GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from core import numerics
from quantize.gptq import GPTQConfig, gptq_quantize
from quantize.hqq import hqq_qparams
from core.quantized import QuantizedWeight
from core.schemes import QuantArgs


class MethodError(ValueError):
    """An unknown or inapplicable method; the message says what exists."""


@dataclass(frozen=True)
class Quantizer:
    fn: Callable[[torch.Tensor, QuantArgs, Optional[dict]], QuantizedWeight]
    needs_hessian: bool = False


QUANTIZERS: dict[str, Quantizer] = {}
TRANSFORMS: tuple[str, ...] = ("smoothquant", "awq")  # applied in quantize.layerwise


def register_quantizer(name: str, needs_hessian: bool = False):
    def add(fn):
        QUANTIZERS[name] = Quantizer(fn, needs_hessian)
        return fn

    return add


@register_quantizer("rtn")
def rtn(weight: torch.Tensor, args: QuantArgs, calibration: Optional[dict] = None) -> QuantizedWeight:
    """Round to nearest on the observer's range (min/max, or MSE-searched with ``observer="mse"``)."""
    scale, zero = numerics.compute_qparams(weight, args)
    return QuantizedWeight(numerics.quantize(weight, scale, zero, args), scale, zero, args)


@register_quantizer("gptq", needs_hessian=True)
def gptq(weight: torch.Tensor, args: QuantArgs, calibration: Optional[dict] = None) -> QuantizedWeight:
    """GPTQ with the Hessian in ``calibration["hessian"]`` and options in ``calibration["gptq"]``."""
    if not calibration or "hessian" not in calibration:
        raise MethodError("gptq needs calibration inputs (the layer's Hessian); run it through quantize_checkpoint")
    q, scale, zero, damp = gptq_quantize(weight, calibration["hessian"], args, calibration.get("gptq", GPTQConfig()))
    return QuantizedWeight(q, scale, zero, args, damp)


@register_quantizer("hqq")
def hqq(weight: torch.Tensor, args: QuantArgs, calibration: Optional[dict] = None) -> QuantizedWeight:
    """Half-quadratic quantization (``quantize.hqq``): no data, a robust fit of each group's scale."""
    if args.type != "int":
        raise MethodError("hqq fits integer grids; FP8 weights take rtn")
    scale, zero = hqq_qparams(weight, args)
    return QuantizedWeight(numerics.quantize(weight, scale, zero, args), scale, zero, args)


@dataclass(frozen=True)
class Recipe:
    """Transforms applied per decoder layer, then one quantizer per linear."""

    transforms: tuple[str, ...]
    quantizer: str

    @property
    def name(self) -> str:
        return "+".join((*self.transforms, self.quantizer))

    @property
    def needs_calibration(self) -> bool:
        return bool(self.transforms) or QUANTIZERS[self.quantizer].needs_hessian


def parse_recipe(name: str) -> Recipe:
    """``rtn``, ``gptq``, ``awq``, ``smoothquant``, or transforms joined with ``+`` before a quantizer."""
    parts = [p.strip().lower() for p in name.split("+") if p.strip()]
    known = sorted({*QUANTIZERS, *TRANSFORMS})
    bad = [p for p in parts if p not in QUANTIZERS and p not in TRANSFORMS]
    if not parts or bad:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(known)}, "
                          f"or transforms and a quantizer joined with '+' (e.g. smoothquant+gptq)")
    quantizers = [p for p in parts if p in QUANTIZERS]
    if len(quantizers) > 1 or (quantizers and parts[-1] != quantizers[0]):
        raise MethodError(f"{name!r}: a recipe ends with at most one quantizer ({', '.join(sorted(QUANTIZERS))})")
    return Recipe(tuple(p for p in parts if p in TRANSFORMS), quantizers[0] if quantizers else "rtn")


def quantize_weight(weight: torch.Tensor, args: QuantArgs, method: str = "rtn",
                    calibration: Optional[dict] = None) -> QuantizedWeight:
    """Quantizes one ``[out, in]`` weight with the named quantizer."""
    if method not in QUANTIZERS:
        raise MethodError(f"unknown quantizer {method!r}; choose one of: {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[method].fn(weight, args, calibration)


def parse_alpha(text: str) -> Optional[float]:
    """SmoothQuant's migration strength from the command line: a number in [0, 1], or ``auto`` (None: searched
    per layer and mapping on the calibration data)."""
    if text.strip().lower() == "auto":
        return None
    try:
        alpha = float(text)
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise MethodError(f"--smoothquant-alpha {text!r} is neither a number in [0, 1] (e.g. 0.5) nor 'auto'")
    return alpha
