"""Decoding a quantized checkpoint, in any layout qserve reads, back to float weights (its "fake-quant" view)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from exporters.layouts import Layout, layout_of_config
from core.schemes import Scheme


def checkpoint_layout(ckpt_dir: Path) -> tuple[Optional[Layout], Optional[Scheme]]:
    """The layout and scheme ``config.json`` declares; (None, None) for a float checkpoint."""
    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    layout = layout_of_config(config, str(ckpt_dir))
    return (layout, layout.scheme_of(config["quantization_config"])) if layout else (None, None)


def checkpoint_scheme(ckpt_dir: Path) -> Optional[Scheme]:
    """The scheme of a quantized checkpoint; None for a float checkpoint."""
    return checkpoint_layout(ckpt_dir)[1]


def tensor_locations(ckpt_dir: Path) -> dict[str, Path]:
    """Which shard holds each tensor (metadata only)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for path in sorted(Path(ckpt_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where.update({k: path for k in f.keys()})
    return where


def read_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint."""
    where = tensor_locations(ckpt_dir)
    return load_tensors(where, list(where))


def load_tensors(where: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, each read from the shard ``where`` maps it to (a layer may span shards)."""
    from safetensors import safe_open

    out = {}
    for key in keys:
        with safe_open(str(where[key]), framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def quantized_prefixes(keys: list[str], layout: Layout) -> list[str]:
    """The quantized linears among tensor names (without their suffix), sorted."""
    return sorted(k.removesuffix(layout.marker) for k in keys if k.endswith(layout.marker))


def is_layer_tensor(key: str, quantized: set[str], layout: Layout) -> bool:
    """Whether ``key`` is one of a quantized linear's stored tensors (decoded, never copied as it is)."""
    owner = key.rsplit(".", 1)[0]
    return owner in quantized and key.endswith(layout.suffixes)


def dequantized_state_dict(ckpt_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, quantized linears decoded to ``dtype`` weights under their usual names."""
    layout, scheme = checkpoint_layout(ckpt_dir)
    raw = read_tensors(ckpt_dir)
    if layout is None:
        return {k: t.to(dtype) if t.is_floating_point() else t for k, t in raw.items()}
    prefixes = quantized_prefixes(list(raw), layout)
    out = {f"{p}.weight": layout.read(raw, p, scheme.weights_for(p)).dequantize().to(dtype) for p in prefixes}
    quantized = set(prefixes)
    for key, tensor in raw.items():
        if not is_layer_tensor(key, quantized, layout):
            out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out
