"""``inspect_checkpoint``: what a checkpoint holds, how many bits each weight costs, and whether it decodes."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from exporters.dequantize import checkpoint_layout, is_layer_tensor, load_tensors, quantized_prefixes
from exporters.layouts import Layout
from core.models import ModelError
from core.quantized import QuantizedWeight
from core.schemes import Scheme, SchemeError


@dataclass
class LayerGroup:
    """Quantized linears that share a module name (across decoder layers) and a scheme."""

    module: str
    scheme: str
    layers: int = 0
    weights: int = 0
    stored_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / max(self.weights, 1)


@dataclass
class Inspection:
    path: str
    format: str
    groups: list[LayerGroup] = field(default_factory=list)
    other_bytes: int = 0  # embeddings, norms, ignored layers
    total_bytes: int = 0
    bf16_bytes: int = 0  # the same parameters stored as bf16
    problems: list[str] = field(default_factory=list)
    kv_cache: Optional[str] = None  # e.g. "fp8 tensor scales in 30 attention layers"

    def to_dict(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "groups"},
                "groups": [dict(g.__dict__, bits_per_weight=round(g.bits_per_weight, 3)) for g in self.groups]}

    def markdown(self) -> str:
        lines = [f"{self.path}: {self.format}", "",
                 "| module | scheme | layers | weights | bits/weight (with scales) |", "|---|---|---|---|---|"]
        for g in self.groups:
            lines.append(f"| {g.module} | {g.scheme} | {g.layers} | {g.weights:,} | {g.bits_per_weight:.3f} |")
        q_weights = sum(g.weights for g in self.groups)
        q_bytes = sum(g.stored_bytes for g in self.groups)
        if q_weights:
            lines.append(f"| all quantized | | {sum(g.layers for g in self.groups)} | {q_weights:,} | "
                         f"{8 * q_bytes / q_weights:.3f} |")
        lines += ["", f"total {self.total_bytes / 2**20:.1f} MiB; as bf16 {self.bf16_bytes / 2**20:.1f} MiB "
                      f"({self.total_bytes / max(self.bf16_bytes, 1):.1%}); other tensors {self.other_bytes / 2**20:.1f} MiB",
                  *([f"KV cache: {self.kv_cache}"] if self.kv_cache else []),
                  "decode check: " + ("every quantized layer decodes to finite weights of its shape"
                                      if not self.problems else "; ".join(self.problems))]
        return "\n".join(lines)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _describe(args) -> str:
    kind = f"{args.type}{args.num_bits}"
    grouping = f"g{args.group_size}" if args.strategy == "group" else args.strategy
    return f"{kind} {grouping} {'sym' if args.symmetric else 'asym'}"


def inspect_checkpoint(ckpt_dir: Path) -> Inspection:
    """Reads every tensor once, groups quantized linears by module name and scheme, and decodes each (a .gguf
    file: its matrices by module and llama.cpp type)."""
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_file() and ckpt_dir.suffix == ".gguf":
        from exporters.inspect_gguf import inspect_gguf

        return inspect_gguf(ckpt_dir)
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not (ckpt_dir / "config.json").exists() or not files:
        raise ModelError(f"{ckpt_dir} is not a checkpoint: it needs config.json and *.safetensors files")
    name, layout, scheme = _layout_of(ckpt_dir)
    report = Inspection(str(ckpt_dir), name)
    groups: dict[tuple[str, str], LayerGroup] = {}
    where, sizes, numels, floating = {}, {}, {}, {}
    for path in files:  # metadata only: a layer's tensors may sit in different shards
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                dtype = _DTYPE_BYTES.get(piece.get_dtype(), 4)
                numels[key] = _numel(piece.get_shape())
                where[key], sizes[key] = path, numels[key] * dtype
                floating[key] = piece.get_dtype().startswith(("F", "BF"))
    prefixes = set(quantized_prefixes(list(where), layout)) if layout else set()
    owned: dict[str, int] = defaultdict(int)
    for key, nbytes in sizes.items():
        report.total_bytes += nbytes
        owner = key.rsplit(".", 1)[0]
        if layout and is_layer_tensor(key, prefixes, layout):
            owned[owner] += nbytes
        else:
            report.other_bytes += nbytes
            report.bf16_bytes += 2 * numels[key] if floating[key] else nbytes
    for prefix in sorted(prefixes):
        raw = load_tensors(where, [k for k in where if k.rsplit(".", 1)[0] == prefix])
        _check_layer(report, groups, raw, prefix, owned[prefix], lambda r, p: layout.read(r, p, scheme.weights_for(p)))
    report.groups = sorted(groups.values(), key=lambda g: (g.module, g.scheme))
    if scheme is not None and scheme.kv_cache is not None:
        layers = sum(k.endswith(".k_scale") for k in where)
        report.kv_cache = f"{_describe(scheme.kv_cache)} scales (k_scale, v_scale) in {layers} attention layers"
        if not layers or layers != sum(k.endswith(".v_scale") for k in where):
            report.problems.append("the config declares a quantized KV cache but k_scale/v_scale tensors are missing")
    return report


def _layout_of(ckpt_dir: Path) -> tuple[str, Optional[Layout], Optional[Scheme]]:
    """A name to print, the layout and the scheme of the checkpoint."""
    config = json.loads((ckpt_dir / "config.json").read_text())
    try:
        layout, scheme = checkpoint_layout(ckpt_dir)
    except SchemeError as exc:
        raise ModelError(str(exc)) from None
    if layout is None:
        return "float (no quantization_config)", None, None
    detail = config["quantization_config"].get("format") or config["quantization_config"].get("version")
    return (f"{layout.name} ({detail})" if detail else layout.name), layout, scheme


def _check_layer(report: Inspection, groups: dict, raw: dict, prefix: str, nbytes: int,
                 read: Callable[[dict, str], QuantizedWeight]) -> None:
    try:
        qw = read(raw, prefix)
        args, weight = qw.args, qw.dequantize()
    except Exception as exc:  # a broken layer is reported, the others still checked
        report.problems.append(f"{prefix}: does not decode ({exc})")
        return
    expected = raw.get(f"{prefix}.weight_shape")
    if expected is not None and list(weight.shape) != expected.tolist():
        report.problems.append(f"{prefix}: decodes to {list(weight.shape)}, weight_shape says {expected.tolist()}")
    if not torch.isfinite(weight).all():
        report.problems.append(f"{prefix}: decodes to non-finite values")
    module = re.sub(r"^.*?\.\d+\.", "", prefix)  # model.layers.3.mlp.down_proj -> mlp.down_proj
    group = groups.setdefault((module, _describe(args)), LayerGroup(module, _describe(args)))
    group.layers += 1
    group.weights += weight.numel()
    group.stored_bytes += nbytes
    report.bf16_bytes += weight.numel() * 2

