"""Decoding a compressed-tensors checkpoint back to float weights (the "fake-quant" view of it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from exporters.compressed_tensors import scheme_from_config
from quantize import numerics


def dequantized_state_dict(ckpt_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, quantized linears decoded to ``dtype`` weights under their usual names."""
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    scheme = scheme_from_config(config["quantization_config"])
    raw: dict[str, torch.Tensor] = {}
    for path in sorted(ckpt_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    out = {}
    for key, tensor in raw.items():
        if key.endswith(".weight_scale"):
            prefix = key.removesuffix(".weight_scale")
            args = scheme.weights_for(prefix)
            if f"{prefix}.weight_packed" in raw:
                shape = torch.Size(raw[f"{prefix}.weight_shape"].tolist())
                q = unpack_from_int32(raw[f"{prefix}.weight_packed"], args.num_bits, shape)
            else:
                q = raw[f"{prefix}.weight"]
            zero = raw.get(f"{prefix}.weight_zero_point", torch.zeros_like(tensor, dtype=torch.int32))
            if f"{prefix}.weight_packed" in raw and f"{prefix}.weight_zero_point" in raw:
                zero = unpack_from_int32(zero, args.num_bits, tensor.shape, packed_dim=0)
            out[f"{prefix}.weight"] = numerics.dequantize(q, tensor.float(), zero.to(torch.int32), args).to(dtype)
        elif not key.endswith((".weight_packed", ".weight_shape", ".weight_zero_point", ".input_scale")) and key not in out:
            if key.endswith(".weight") and f"{key}_scale" in raw:
                continue  # an int8 weight: decoded with its scale above
            out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out
