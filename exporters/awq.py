"""AutoAWQ's GEMM layout, which vLLM's ``awq`` loaders (CPU included), AutoAWQ and transformers read.

Per linear: ``qweight`` int32 ``[in, out / 8]`` and ``qzeros`` int32 ``[groups, out / 8]``, both packed
along the *output* dimension in AutoAWQ's interleaved order (word nibble ``i`` holds column
``ORDER[i]`` of its eight), unsigned values with the zero point stored as it is (no v1 "minus one");
``scales`` fp16 ``[groups, out]``. The layout is 4-bit and grouped only; a symmetric scheme stores the
zero point 8.
"""

from __future__ import annotations

from typing import Any

import torch

from core.quantized import QuantizedWeight
from exporters.scales import exact_fp16
from core.schemes import QuantArgs, Scheme, SchemeError

BITS, PER_WORD = 4, 8
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack order: nibble i of a word holds column ORDER[i]
MARKER = ".qweight"
STORED_SUFFIXES = (".qweight", ".qzeros", ".scales")


def check_fits(scheme: Scheme) -> None:
    """Refuses schemes the layout cannot hold, before anything is written."""
    w, problems = scheme.weights, []
    if w.type != "int" or w.num_bits != BITS:
        problems.append(f"{w.type}{w.num_bits} weights (it holds int4 only)")
    if not scheme.weight_only:
        problems.append("quantized activations (it is weight-only)")
    if w.strategy != "group":
        problems.append(f"{w.strategy} weight scales (it holds per-group scales only, e.g. group 64 or 128)")
    if scheme.overrides:
        problems.append("per-layer overrides (one group size for all layers)")
    if problems:
        raise SchemeError(f"the AWQ layout cannot hold {'; '.join(problems)}; keep the compressed-tensors "
                          f"layout for this scheme")


def pack(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit ``[rows, cols]`` (cols a multiple of 8) packed along cols in AutoAWQ's order."""
    rows, cols = values.shape
    if cols % PER_WORD:
        raise SchemeError(f"the AWQ layout packs 8 output columns per word; {cols} outputs is not a multiple of 8")
    cells = values.to(torch.int32).reshape(rows, cols // PER_WORD, PER_WORD)[..., list(ORDER)]
    shifts = torch.arange(PER_WORD, dtype=torch.int32) * BITS
    return (cells << shifts).sum(dim=-1, dtype=torch.int32)  # disjoint bits: the sum is an OR (wraps like one)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack`: unsigned values ``[rows, words * 8]`` in column order."""
    shifts = torch.arange(PER_WORD, dtype=torch.int32) * BITS
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF                   # [rows, words, 8] in pack order
    columns = torch.empty_like(nibbles)
    columns[..., list(ORDER)] = nibbles
    return columns.reshape(packed.shape[0], -1)


def layer_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The three stored tensors of quantized linear ``prefix``."""
    offset = 2 ** (BITS - 1)
    zero = qw.zero if not qw.args.symmetric else torch.zeros_like(qw.zero)
    return {
        f"{prefix}.qweight": pack((qw.q.to(torch.int32) + offset).T.contiguous()),
        f"{prefix}.qzeros": pack((zero.to(torch.int32) + offset).T.contiguous()),
        f"{prefix}.scales": exact_fp16(prefix, qw.scale.T.contiguous(), "AWQ"),
    }


def quantization_config(scheme: Scheme) -> dict[str, Any]:
    return {"quant_method": "awq", "bits": BITS, "group_size": scheme.weights.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None}


def scheme_from_config(config: dict[str, Any], name: str = "awq") -> Scheme:
    bits, group = config.get("bits", config.get("w_bit")), config.get("group_size", config.get("q_group_size"))
    if bits != BITS or (config.get("version") or "gemm").lower() != "gemm":
        raise SchemeError(f"qserve reads AWQ GEMM checkpoints of 4 bits, not {config.get('version')} / {bits} bits")
    ignore = tuple(config.get("modules_to_not_convert") or ()) + ("lm_head",)
    # AWQ always stores zero points; they are read as asymmetric, which holds symmetric ones too
    return Scheme(name, QuantArgs(num_bits=BITS, symmetric=False, strategy="group", group_size=group), ignore=ignore)


def read_quantized(raw: dict[str, torch.Tensor], prefix: str, args: QuantArgs) -> QuantizedWeight:
    """An AWQ-layout linear as signed integers, scales and zero points (qserve's convention)."""
    offset = 2 ** (BITS - 1)
    q = unpack(raw[f"{prefix}.qweight"]).T.contiguous() - offset      # [out, in]
    zero = unpack(raw[f"{prefix}.qzeros"]).T.contiguous() - offset    # [out, groups]
    scale = raw[f"{prefix}.scales"].T.contiguous()
    return QuantizedWeight(q.to(torch.int8), scale, zero, args)
