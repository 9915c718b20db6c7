"""A Llama-style decoder layer calibrated stage by stage ("true sequential", as GPTQ's reference runs Llama).

The layer's linears fall into four groups that read the same tensor: q/k/v, o, gate/up, down. Each group
is calibrated on inputs made by the already-quantized groups before it, and each intermediate is computed
once: attention runs once per layer instead of twice (once float to calibrate, once quantized to make the
next layer's inputs), which is ~25 % of a GPTQ run on the demo model. Layers of other shapes take the
two-pass path in ``quantize.layerwise``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from quantize.capture import input_of
from quantize.moe import MOE_FAMILIES, is_sparse

GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# decoder layers whose forward is exactly: x + attn(norm1(x)), then h + mlp(norm2(h)) (mlp: dense, or a sparse
# block of quantize.moe); Gemma's extra norms or Phi's parallel blocks would be computed wrongly by the staged
# passes, so they are not listed
STAGED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", *MOE_FAMILIES})
# down_proj's inputs are kept for the propagation pass up to this size (the demo model's 128 x 512 calibration
# tokens take 192 MiB in bf16), which saves running gate/up twice: ~1/3 of the layer's matmuls
KEEP_MLP_INPUT_BYTES = 512 << 20


def staged(config: Any, layer: torch.nn.Module) -> bool:
    """Whether ``layer`` can be calibrated stage by stage: a known architecture with every grouped linear."""
    model_type = getattr(config, "model_type", None)
    names = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    if model_type in MOE_FAMILIES and is_sparse(layer, MOE_FAMILIES[model_type]):
        return {n for g in GROUPS[:2] for n in g} <= names
    return model_type in STAGED_MODEL_TYPES and names == {n for g in GROUPS for n in g}


def _mlp_input_kept(shell: Any, mlp: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether down_proj's inputs fit the budget for keeping them (saving gate/up's second run)."""
    tokens = sum(h.shape[0] * h.shape[1] for h, _ in shell.inputs)
    return tokens * mlp.down_proj.in_features * torch.finfo(dtype).bits // 8 <= KEEP_MLP_INPUT_BYTES


@torch.no_grad()
def calibrate_staged(layer: torch.nn.Module, shell: Any, record: Callable[[str, torch.Tensor], None],
                     quantize_group: Callable[[tuple[str, ...]], None], propagate: bool,
                     sparse: Optional[Callable[[list[torch.Tensor]], None]] = None) -> None:
    """Records each group's inputs with ``record(name, x)`` over every stored batch, then calls
    ``quantize_group``; replaces ``shell.inputs`` by the quantized layer's outputs when ``propagate``.
    Each group's input is computed once and kept (in the compute dtype) until the next group needs it;
    down_proj's input too, within ``KEEP_MLP_INPUT_BYTES``, else gate/up run again to propagate. A sparse
    (MoE) block is quantized by ``sparse(inputs per batch)`` instead of the gate/up and down groups."""
    attn, mlp, dtype, store = layer.self_attn, layer.mlp, shell.dtype, shell.store_dtype

    def feed(group: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        for name in group:
            record(name, x)
        return x

    kept = [feed(GROUPS[0], layer.input_layernorm(hidden.to(dtype))) for hidden, _ in shell.inputs]
    quantize_group(GROUPS[0])
    for i, (_, kwargs) in enumerate(shell.inputs):  # o_proj's inputs replace the normed inputs
        kept[i] = feed(GROUPS[1], input_of(attn.o_proj, lambda: attn(hidden_states=kept[i], **kwargs)))
    quantize_group(GROUPS[1])
    for i, (hidden, kwargs) in enumerate(shell.inputs):
        residual = hidden.to(dtype) + attn.o_proj(kept[i])
        kept[i] = layer.post_attention_layernorm(residual)
        shell.inputs[i] = (residual.to(store), kwargs)
    if sparse is not None:
        sparse(kept)
        if propagate:
            for i, (hidden, kwargs) in enumerate(shell.inputs):
                out, kept[i] = mlp(kept[i]), None
                shell.inputs[i] = ((hidden.to(dtype) + (out[0] if isinstance(out, tuple) else out)).to(store), kwargs)
        return
    for x in kept:
        feed(GROUPS[2], x)
    quantize_group(GROUPS[2])
    keep_mlp_input = propagate and _mlp_input_kept(shell, mlp, dtype)
    for i, normed in enumerate(kept):
        down_in = feed(GROUPS[3], input_of(mlp.down_proj, lambda: mlp(normed)))
        kept[i] = down_in if keep_mlp_input else None
    quantize_group(GROUPS[3])
    if propagate:
        for i, (hidden, kwargs) in enumerate(shell.inputs):
            residual = hidden.to(dtype)
            out = mlp.down_proj(kept[i]) if keep_mlp_input else mlp(layer.post_attention_layernorm(residual))
            kept[i] = None
            shell.inputs[i] = ((residual + out).to(store), kwargs)
