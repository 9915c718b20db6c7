"""Decoding a compressed-tensors checkpoint back to float weights (the "fake-quant" view of it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

from exporters.compressed_tensors import scheme_from_config
from quantize.methods import QuantizedWeight
from quantize.schemes import QuantArgs, Scheme

# Tensors a quantized linear stores besides its weight scale; they are decoded, never copied as they are.
QUANT_SUFFIXES = (".weight_packed", ".weight_shape", ".weight_zero_point", ".input_scale", ".weight_scale")


def checkpoint_scheme(ckpt_dir: Path) -> Optional[Scheme]:
    """The scheme in ``config.json``'s compressed-tensors ``quantization_config``; None for a float checkpoint."""
    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    quant = config.get("quantization_config")
    if not quant or quant.get("quant_method") != "compressed-tensors":
        return None
    return scheme_from_config(quant)


def read_quantized(raw: dict[str, torch.Tensor], prefix: str, args: QuantArgs) -> QuantizedWeight:
    """Integers, scales and zero points of quantized linear ``prefix`` from its stored tensors."""
    scale = raw[f"{prefix}.weight_scale"]
    packed = f"{prefix}.weight_packed" in raw
    if packed:
        q = unpack_from_int32(raw[f"{prefix}.weight_packed"], args.num_bits,
                              torch.Size(raw[f"{prefix}.weight_shape"].tolist()))
    else:
        q = raw[f"{prefix}.weight"]
    zero = raw.get(f"{prefix}.weight_zero_point")
    if zero is None:
        zero = torch.zeros_like(scale, dtype=torch.int32)
    elif packed:
        zero = unpack_from_int32(zero, args.num_bits, scale.shape, packed_dim=0)
    return QuantizedWeight(q, scale.float(), zero.to(torch.int32), args, input_scale=raw.get(f"{prefix}.input_scale"))


def decode_layer(raw: dict[str, torch.Tensor], prefix: str, args: QuantArgs) -> torch.Tensor:
    """The float32 weight of quantized linear ``prefix`` from its stored tensors."""
    return read_quantized(raw, prefix, args).dequantize()


def read_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    raw: dict[str, torch.Tensor] = {}
    for path in sorted(Path(ckpt_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    return raw


def load_tensors(where: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, each read from the shard ``where`` maps it to (a layer may span shards)."""
    from safetensors import safe_open

    out = {}
    for key in keys:
        with safe_open(str(where[key]), framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def quantized_prefixes(keys: Iterator[str] | list[str]) -> list[str]:
    return [k.removesuffix(".weight_scale") for k in keys if k.endswith(".weight_scale")]


def dequantized_state_dict(ckpt_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, quantized linears decoded to ``dtype`` weights under their usual names."""
    scheme = checkpoint_scheme(ckpt_dir)
    raw = read_tensors(ckpt_dir)
    prefixes = quantized_prefixes(list(raw))
    if prefixes and scheme is None:
        raise ValueError(f"{ckpt_dir} stores quantized tensors but its config.json has no compressed-tensors "
                         f"quantization_config")
    out = {f"{p}.weight": decode_layer(raw, p, scheme.weights_for(p)).to(dtype) for p in prefixes}
    quantized = set(prefixes)
    for key, tensor in raw.items():
        owner = key.rsplit(".", 1)[0]
        if owner in quantized and (key.endswith(QUANT_SUFFIXES) or key.endswith(".weight")):
            continue
        out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out
