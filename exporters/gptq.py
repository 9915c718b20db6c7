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

from core.quantized import QuantizedWeight
from exporters.scales import exact_fp16
from core.schemes import QuantArgs, Scheme, SchemeError

MARKER = ".qweight"
STORED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def check_fits(scheme: Scheme) -> None:
    """Refuses schemes the layout cannot hold, before anything is written."""
    w = scheme.weights
    problems = []
    if w.type != "int" or w.num_bits not in (4, 8):
        problems.append(f"{w.type}{w.num_bits} weights (it holds int4 and int8)")
    if not scheme.weight_only:
        problems.append("quantized activations (it is weight-only)")
    if not w.symmetric:  # v1 stores zero - 1: an unsigned zero point of 0 reads back as 2^bits in the engines
        problems.append("asymmetric weights (v1, as vLLM and AutoGPTQ read it, stores zero points minus one, "
                        "so a zero point of 0 cannot be stored; use --layout awq for asymmetric int4)")
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
        f"{prefix}.scales": exact_fp16(prefix, qw.scale.T.contiguous(), "GPTQ"),
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


def scheme_from_config(config: dict[str, Any], name: str = "gptq") -> Scheme:
    """The scheme a GPTQ ``quantization_config`` describes (one for every quantized linear)."""
    bits, group = config.get("bits"), config.get("group_size", -1)
    if config.get("checkpoint_format", "gptq") != "gptq" or bits not in (4, 8):
        raise SchemeError(f"qserve reads GPTQ v1 checkpoints of 4 or 8 bits, not format "
                          f"{config.get('checkpoint_format')!r} with {bits} bits")
    grouped = bool(group) and group > 0
    weights = QuantArgs(num_bits=bits, symmetric=config.get("sym", True), strategy="group" if grouped else "channel",
                        group_size=group if grouped else None)
    return Scheme(name, weights)


def read_quantized(raw: dict[str, torch.Tensor], prefix: str, args: QuantArgs) -> QuantizedWeight:
    """A GPTQ-layout linear as integers (signed, as qserve stores them), scales and zero points."""
    g_idx = raw.get(f"{prefix}.g_idx")  # some writers leave it out when groups are in order
    if g_idx is not None and not torch.equal(g_idx, torch.sort(g_idx).values):
        raise SchemeError(f"{prefix}: act-order (desc_act) with permuted groups is not supported here")
    bits, offset = args.num_bits, 2 ** (args.num_bits - 1)
    q = _unpack(raw[f"{prefix}.qweight"], bits, 0).T.contiguous() - offset          # [out, in]
    scale = raw[f"{prefix}.scales"].T.contiguous()                                   # [out, groups]
    zero = (_unpack(raw[f"{prefix}.qzeros"], bits, 1).T + 1) % (2 * offset) - offset  # v1: stored zero - 1
    zero = zero[: scale.shape[0]].to(torch.int32)  # qzeros may pad the output dimension to whole words
    if args.symmetric:
        if zero.any():
            raise SchemeError(f"{prefix}: the config says sym=true but the stored zero points are not "
                              f"{offset}; the checkpoint is inconsistent")
        zero = torch.zeros_like(zero)
    return QuantizedWeight(q.to(torch.int8), scale, zero.contiguous(), args)
