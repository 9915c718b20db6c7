"""The compressed-tensors layout that vLLM loads natively.

``int-quantized`` stores 8-bit weights as int8 (W8A8); ``pack-quantized`` packs 4- or 8-bit weights
into int32 words, low bits first, with ``weight_shape`` beside them (weight-only schemes). Packing is
the compressed-tensors library's own, so the bytes are what vLLM's loader expects.
"""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from quantize.methods import QuantizedWeight
from quantize.schemes import QuantArgs, Scheme


def format_for(scheme: Scheme) -> str:
    """The compressed-tensors format name vLLM dispatches on for this scheme."""
    return "pack-quantized" if scheme.weight_only else "int-quantized"


def layer_tensors(prefix: str, qw: QuantizedWeight, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized linear layer named ``prefix`` (without ``.weight``)."""
    args = qw.args
    out: dict[str, torch.Tensor] = {f"{prefix}.weight_scale": qw.scale.to(dtype)}
    packed = format_for(scheme) == "pack-quantized"
    if not args.symmetric:  # pack-quantized packs zero points too, along the output dimension
        zero = qw.zero.to(torch.int8)
        out[f"{prefix}.weight_zero_point"] = pack_to_int32(zero, args.num_bits, packed_dim=0) if packed else zero
    if not packed:
        out[f"{prefix}.weight"] = qw.q.to(torch.int8)
    else:
        out[f"{prefix}.weight_packed"] = pack_to_int32(qw.q.to(torch.int8), args.num_bits)
        out[f"{prefix}.weight_shape"] = torch.tensor(list(qw.q.shape), dtype=torch.int64)
    return out


def _args_config(args: QuantArgs) -> dict[str, Any]:
    cfg = args.to_dict()
    cfg.update(observer=None if args.dynamic else "minmax", actorder=None, block_structure=None)
    return cfg


def quantization_config(scheme: Scheme) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``."""
    group = {
        "targets": list(scheme.targets),
        "weights": _args_config(scheme.weights),
        "input_activations": _args_config(scheme.input_activations) if scheme.input_activations else None,
        "output_activations": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": format_for(scheme),
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": list(scheme.ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }
