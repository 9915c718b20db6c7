"""The registry of quantized checkpoint layouts: how each marks, writes and reads a quantized linear.

A layout is data (a frozen dataclass of functions); ``LAYOUTS`` maps its name to it and
``layout_of_config`` finds the one a ``config.json`` declares, so export, inspect and decoding work on
any of them without branching on names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from exporters import awq, gptq
from exporters import compressed_tensors as ct
from core.quantized import QuantizedWeight
from core.schemes import QuantArgs, Scheme, SchemeError


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout."""

    name: str
    quant_method: str  # the quantization_config's quant_method that declares it
    marker: str  # the tensor suffix that identifies a quantized linear
    suffixes: tuple[str, ...]  # the tensors a quantized linear owns
    check_fits: Callable[[Scheme], None]  # raises SchemeError naming the layout's limits
    write: Callable[[str, QuantizedWeight, Scheme], dict[str, torch.Tensor]]
    read: Callable[[dict[str, torch.Tensor], str, QuantArgs], QuantizedWeight]
    config_for: Callable[[Scheme], dict[str, Any]]
    scheme_of: Callable[[dict[str, Any]], Scheme]
    holds_kv_cache: bool = False  # whether its config can declare KV-cache scales (k_scale / v_scale)
    scales_transposed: bool = False  # scales stored [n_groups, out] (GPTQ, AWQ) rather than [out, n_groups]


LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (
        # conversions keep the scales' stored dtype (bf16 from qserve, fp16 from GPTQ/AWQ): nothing is rounded
        Layout("compressed-tensors", "compressed-tensors", ct.MARKER, ct.STORED_SUFFIXES, ct.check_fits,
               lambda p, qw, s: ct.layer_tensors(p, qw, s, qw.scale.dtype), ct.read_quantized,
               ct.quantization_config, ct.scheme_from_config, holds_kv_cache=True),
        Layout("gptq", "gptq", gptq.MARKER, gptq.STORED_SUFFIXES, gptq.check_fits,
               lambda p, qw, s: gptq.layer_tensors(p, qw), gptq.read_quantized,
               gptq.quantization_config, gptq.scheme_from_config, scales_transposed=True),
        Layout("awq", "awq", awq.MARKER, awq.STORED_SUFFIXES, awq.check_fits,
               lambda p, qw, s: awq.layer_tensors(p, qw), awq.read_quantized,
               awq.quantization_config, awq.scheme_from_config, scales_transposed=True),
    )
}


def layout_of_config(config: dict[str, Any], where: str = "checkpoint") -> Optional[Layout]:
    """The layout ``config.json`` declares; None for a float checkpoint (no quantization_config)."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if not method:
        return None
    for layout in LAYOUTS.values():
        if layout.quant_method == method:
            return layout
    known = ", ".join(sorted(LAYOUTS))
    raise SchemeError(f"{where}: quant_method {method!r} is not a layout qserve reads ({known})")


KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")
