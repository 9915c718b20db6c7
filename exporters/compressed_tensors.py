"""The compressed-tensors layout that vLLM loads natively.

``int-quantized`` stores 8-bit weights as int8 (W8A8); ``pack-quantized`` packs 4- or 8-bit weights
into int32 words, low bits first, with ``weight_shape`` beside them (weight-only schemes);
``float-quantized`` stores FP8 E4M3 weights. Packing is the compressed-tensors library's own, so the
bytes are what vLLM's loader expects. Per-layer overrides become extra config groups whose targets
are name patterns, which vLLM matches before the class-name group.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from core.quantized import QuantizedWeight
from core.schemes import Override, QuantArgs, Scheme, SchemeError


MARKER = ".weight_scale"
# Tensors a quantized linear stores; they are decoded or rewritten, never copied as they are.
STORED_SUFFIXES = (".weight_packed", ".weight_shape", ".weight_zero_point", ".input_scale", ".weight_scale",
                   ".weight_g_idx", ".weight")


def _weight_problem(weights: QuantArgs, acts: Optional[QuantArgs]) -> Optional[str]:
    """Why vLLM's compressed-tensors kernels cannot load these weights beside these activations (None: they can).
    W8A8 (int8 or FP8) kernels take symmetric per-channel or per-tensor weights of the activations' type;
    weight-only (WNA16) kernels take per-channel or per-group weights."""
    if acts is None:
        return None if weights.strategy in ("channel", "group") else f"{weights.strategy} weight scales"
    if weights.type != acts.type or weights.num_bits != 8:
        return f"{weights.type}{weights.num_bits} weights beside {acts.type}{acts.num_bits} activations"
    if not weights.symmetric:
        return "asymmetric weights with quantized activations (drop --asym, or use w8a16/w4a16 weight-only)"
    if weights.strategy not in ("channel", "tensor"):
        return (f"{weights.strategy} weight scales with quantized activations (drop --group-size, or use "
                f"w8a16/w4a16 weight-only)")
    return None


def check_fits(scheme: Scheme) -> None:
    """Refuses, before any work, schemes whose checkpoint vLLM's compressed-tensors loader would reject."""
    problems = [f"{p}" for p in [_weight_problem(scheme.weights, scheme.input_activations)] if p]
    problems += [f"{p} in override {list(o.targets)}" for o in scheme.overrides
                 for p in [_weight_problem(o.weights, scheme.input_activations)] if p]
    if problems:
        raise SchemeError(f"vLLM cannot load {scheme.name} as written: {'; '.join(problems)}")


def format_for(scheme: Scheme) -> str:
    """The compressed-tensors format name vLLM dispatches on for this scheme."""
    if scheme.weights.type == "float":
        return "float-quantized"
    return "pack-quantized" if scheme.weight_only else "int-quantized"


def layer_tensors(prefix: str, qw: QuantizedWeight, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized linear layer named ``prefix`` (without ``.weight``)."""
    args = qw.args
    # scales were rounded to args.scale_dtype when computed: the cast is exact
    scale_dtype = getattr(torch, args.scale_dtype) if args.scale_dtype else dtype
    out: dict[str, torch.Tensor] = {f"{prefix}.weight_scale": qw.scale.to(scale_dtype)}
    packed = format_for(scheme) == "pack-quantized"
    if not args.symmetric:  # pack-quantized packs zero points too, along the output dimension
        zero = qw.zero.to(torch.int8)
        out[f"{prefix}.weight_zero_point"] = pack_to_int32(zero, args.num_bits, packed_dim=0) if packed else zero
    if qw.input_scale is not None:
        out[f"{prefix}.input_scale"] = qw.input_scale.reshape(1).float()
    if not packed:
        out[f"{prefix}.weight"] = qw.q if args.type == "float" else qw.q.to(torch.int8)
    else:
        out[f"{prefix}.weight_packed"] = pack_to_int32(qw.q.to(torch.int8), args.num_bits)
        out[f"{prefix}.weight_shape"] = torch.tensor(list(qw.q.shape), dtype=torch.int64)
    return out


def _args_config(args: QuantArgs) -> dict[str, Any]:
    cfg = args.to_dict()
    # scale_dtype stays out: the stored tensors say it, and vLLM reads the field only for MX formats
    cfg.update(observer=None if args.dynamic else "minmax", actorder=None, block_structure=None, scale_dtype=None)
    return cfg


def _group(targets: tuple[str, ...], weights: QuantArgs, scheme: Scheme) -> dict[str, Any]:
    return {
        "targets": list(targets),
        "weights": _args_config(weights),
        "input_activations": _args_config(scheme.input_activations) if scheme.input_activations else None,
        "output_activations": None,
    }


def quantization_config(scheme: Scheme) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``: one config group, plus one per override."""
    groups = {"group_0": _group(scheme.targets, scheme.weights, scheme)} if scheme.quantizes_weights else {}
    for i, override in enumerate(scheme.overrides, start=1):
        groups[f"group_{i}"] = _group(override.targets, override.weights, scheme)
    return {
        "quant_method": "compressed-tensors",
        # a KV-cache-only checkpoint keeps its linears dense, as llm-compressor writes one
        "format": format_for(scheme) if groups else "dense",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": list(scheme.ignore),
        "kv_cache_scheme": _args_config(scheme.kv_cache) if scheme.kv_cache else None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def _args_from_config(cfg: dict[str, Any]) -> QuantArgs:
    return QuantArgs(**{k: cfg[k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")})


def scheme_from_config(quant_config: dict[str, Any], name: str = "checkpoint") -> Scheme:
    """The scheme a ``quantization_config`` describes: the ``Linear`` group as the default, other groups
    (name patterns) as overrides."""
    groups = list(quant_config["config_groups"].values())
    kv = quant_config.get("kv_cache_scheme")
    if not groups:  # only the KV cache is quantized
        return Scheme(name=name, weights=QuantArgs(), targets=(), ignore=tuple(quant_config.get("ignore", ())),
                      kv_cache=_args_from_config(kv) if kv else None)
    default = next((g for g in groups if "Linear" in g["targets"]), groups[0])
    acts = default.get("input_activations")
    overrides = tuple(Override(tuple(g["targets"]), _args_from_config(g["weights"])) for g in groups if g is not default)
    return Scheme(name=name, weights=_args_from_config(default["weights"]),
                  input_activations=_args_from_config(acts) if acts else None,
                  targets=tuple(default["targets"]), ignore=tuple(quant_config.get("ignore", ())), overrides=overrides,
                  kv_cache=_args_from_config(kv) if kv else None)


def read_quantized(raw: dict[str, torch.Tensor], prefix: str, args: QuantArgs) -> QuantizedWeight:
    """Integers, scales (in their stored dtype) and zero points of quantized linear ``prefix``."""
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
    return QuantizedWeight(q, scale, zero.to(torch.int32), args, input_scale=raw.get(f"{prefix}.input_scale"),
                           g_idx=_group_index(raw.get(f"{prefix}.weight_g_idx"), args, q.shape[1]))


def _group_index(g_idx: Optional[torch.Tensor], args: QuantArgs, columns: int) -> Optional[torch.Tensor]:
    """The group of each input column as stored (``actorder: group``), or None when groups are contiguous."""
    if g_idx is None or args.strategy != "group":
        return None
    g_idx = g_idx.to(torch.int64)
    return None if torch.equal(g_idx, torch.arange(columns) // args.group_size) else g_idx


def has_group_index(quant_config: dict[str, Any]) -> bool:
    """Whether the config declares act-order groups (``actorder: group``): linears carry ``weight_g_idx``."""
    return any((g.get("weights") or {}).get("actorder") == "group" for g in quant_config.get("config_groups", {}).values())
