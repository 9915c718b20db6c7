"""The GPTQ layout (AutoGPTQ "v1"), which vLLM's ``gptq`` loaders, AutoGPTQ and GPTQModel read.

Per linear: ``qweight`` int32 ``[in * bits / 32, out]`` (unsigned values packed along the input
dimension, low bits first), ``qzeros`` int32 ``[groups, out * bits / 32]`` (zero point minus one, the
v1 convention, packed along the output dimension), ``scales`` fp16 ``[groups, out]`` and ``g_idx`` int32
``[in]``. A symmetric scheme stores the zero point ``2^(bits-1)``. Packing reuses compressed-tensors'
``pack_to_int32``, whose bit order (low bits first, consecutive values) is GPTQ's.
"""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from quantize.methods import QuantizedWeight
from quantize.schemes import Scheme, SchemeError

LAYOUT = "gptq"
STORED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def check_fits(scheme: Scheme) -> None:
    """Refuses schemes the layout cannot hold, before anything is written."""
    w = scheme.weights
    problems = []
    if w.type != "int" or w.num_bits not in (4, 8):
        problems.append(f"{w.type}{w.num_bits} weights (it holds int4 and int8)")
    if not scheme.weight_only:
        problems.append("quantized activations (it is weight-only)")
    if w.strategy not in ("group", "channel"):
        problems.append(f"{w.strategy} weight scales (it holds per-group or per-channel scales)")
    if scheme.overrides:
        problems.append("per-layer overrides (one bit width and group size for all layers)")
    if problems:
        raise SchemeError(f"the GPTQ layout cannot hold {'; '.join(problems)}; keep the compressed-tensors "
                          f"layout for this scheme")


def layer_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The four stored tensors of quantized linear ``prefix``."""
    args = qw.args
    out_features, in_features = qw.q.shape
    group = args.group_size if args.strategy == "group" else in_features
    zero = qw.zero if not args.symmetric else torch.zeros_like(qw.zero)
    offset = 2 ** (args.num_bits - 1)
    stored_zero = torch.remainder(zero - 1 + offset, 2 * offset) - offset  # v1: zero - 1, wrapped like AutoGPTQ
    return {
        f"{prefix}.qweight": pack_to_int32(qw.q.to(torch.int8).T.contiguous(), args.num_bits, packed_dim=0),
        f"{prefix}.qzeros": pack_to_int32(stored_zero.to(torch.int8).T.contiguous(), args.num_bits, packed_dim=1),
        f"{prefix}.scales": qw.scale.T.contiguous().to(torch.float16),
        f"{prefix}.g_idx": torch.arange(in_features, dtype=torch.int32) // group,
    }


def quantization_config(scheme: Scheme) -> dict[str, Any]:
    w = scheme.weights
    return {"quant_method": "gptq", "bits": w.num_bits, "group_size": w.group_size if w.strategy == "group" else -1,
            "desc_act": False, "sym": w.symmetric, "lm_head": False, "checkpoint_format": "gptq"}


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned values packed low bits first along ``dim`` of an int32 tensor."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    if dim == 1:
        return _unpack(packed.T.contiguous(), bits, 0).T
    parts = [(packed >> (bits * j)) & mask for j in range(per_word)]
    return torch.stack(parts, dim=1).reshape(packed.shape[0] * per_word, *packed.shape[1:])


def read_quantized(raw: dict[str, torch.Tensor], prefix: str, config: dict[str, Any]) -> QuantizedWeight:
    """A GPTQ-layout linear as integers (signed, as qserve stores them), scales and zero points."""
    from quantize.schemes import QuantArgs

    bits, group = config["bits"], config.get("group_size", -1)
    if config.get("desc_act") and not torch.equal(raw[f"{prefix}.g_idx"],
                                                  torch.sort(raw[f"{prefix}.g_idx"]).values):
        raise SchemeError(f"{prefix}: act-order (desc_act) with permuted groups is not supported here")
    offset = 2 ** (bits - 1)
    q = _unpack(raw[f"{prefix}.qweight"], bits, 0).T.contiguous() - offset          # [out, in]
    scale = raw[f"{prefix}.scales"].float().T.contiguous()                           # [out, groups]
    zero = (_unpack(raw[f"{prefix}.qzeros"], bits, 1).T + 1) % (2 * offset) - offset  # v1: stored zero - 1
    sym = config.get("sym", True)
    strategy = "group" if group and group > 0 and group < q.shape[1] else "channel"
    args = QuantArgs(num_bits=bits, symmetric=sym, strategy=strategy,
                     group_size=group if strategy == "group" else None)
    zero = zero.to(torch.int32) if not sym else torch.zeros_like(zero, dtype=torch.int32)
    return QuantizedWeight(q.to(torch.int8), scale, zero.contiguous(), args)
