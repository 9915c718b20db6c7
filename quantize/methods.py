"""Quantization methods, registered by name; ``quantize_weight`` is the one entry point.

A method maps a float weight (and, for calibrated methods, the statistics of its inputs) to integer
weights with their scales. RTN needs no calibration; GPTQ, AWQ and SmoothQuant plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from quantize import numerics
from quantize.schemes import QuantArgs


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer weights ``q`` with per-channel/group ``scale`` and ``zero`` (``[out, n_groups]``)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    args: QuantArgs

    def dequantize(self) -> torch.Tensor:
        return numerics.dequantize(self.q, self.scale, self.zero, self.args)


MethodFn = Callable[[torch.Tensor, QuantArgs, Optional[dict]], QuantizedWeight]
METHODS: dict[str, MethodFn] = {}


class MethodError(ValueError):
    """An unknown or inapplicable method; the message says what exists."""


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    def add(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn

    return add


@register_method("rtn")
def rtn(weight: torch.Tensor, args: QuantArgs, calibration: Optional[dict] = None) -> QuantizedWeight:
    """Round to nearest on a min/max range: the baseline every other method is judged against."""
    scale, zero = numerics.compute_qparams(weight, args)
    return QuantizedWeight(numerics.quantize(weight, scale, zero, args), scale, zero, args)


def check_method(name: str) -> MethodFn:
    """The registered method called ``name``, or a ``MethodError`` listing the ones that exist."""
    if name.lower() not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name.lower()]


def quantize_weight(weight: torch.Tensor, args: QuantArgs, method: str = "rtn",
                    calibration: Optional[dict] = None) -> QuantizedWeight:
    """Quantizes one ``[out, in]`` weight with the named method."""
    return check_method(method)(weight, args, calibration)
