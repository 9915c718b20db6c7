"""A Llama-style decoder layer calibrated stage by stage ("true sequential", as GPTQ's reference runs Llama).

The layer's linears fall into four groups that read the same tensor: q/k/v, o, gate/up, down. Each group
is calibrated on inputs made by the already-quantized groups before it, and each intermediate is computed
once: attention runs once per layer instead of twice (once float to calibrate, once quantized to make the
next layer's inputs), which is ~25 % of a GPTQ run on the demo model. Layers of other shapes take the
two-pass path in ``quantize.layerwise``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# decoder layers whose forward is exactly: x + attn(norm1(x)), then h + mlp(norm2(h)); Gemma's extra norms
# or Phi's parallel blocks would be computed wrongly by the staged passes, so they are not listed
STAGED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class _Stop(Exception):
    """Raised by a hook once the tensor a pass needs is recorded: the rest of the module is not needed."""


def staged(config: Any, layer: torch.nn.Module) -> bool:
    """Whether ``layer`` can be calibrated stage by stage: a known architecture with every grouped linear."""
    names = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    return getattr(config, "model_type", None) in STAGED_MODEL_TYPES and names == {n for g in GROUPS for n in g}


def _stop_at(module: torch.nn.Module, keep: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
    def hook(_module: torch.nn.Module, inputs: tuple) -> None:
        keep(inputs[0])
        raise _Stop

    return module.register_forward_pre_hook(hook)


def _input_of(module: torch.nn.Module, target: torch.nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """Runs ``run`` (a forward of ``module``) until ``target`` is called; returns what ``target`` received."""
    caught: list[torch.Tensor] = []
    handle = _stop_at(target, caught.append)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not caught:
        raise RuntimeError(f"{type(module).__name__} never called {type(target).__name__}")
    return caught[0]


@torch.no_grad()
def calibrate_staged(layer: torch.nn.Module, shell: Any, record: Callable[[str, torch.Tensor], None],
                     quantize_group: Callable[[tuple[str, ...]], None], propagate: bool) -> None:
    """Records each group's inputs with ``record(name, x)`` over every stored batch, then calls
    ``quantize_group``; replaces ``shell.inputs`` by the quantized layer's outputs when ``propagate``."""
    attn, mlp, dtype, store = layer.self_attn, layer.mlp, shell.dtype, shell.store_dtype

    def feed(group: tuple[str, ...], x: torch.Tensor) -> None:
        for name in group:
            record(name, x)

    for hidden, _ in shell.inputs:
        feed(GROUPS[0], layer.input_layernorm(hidden.to(dtype)))
    quantize_group(GROUPS[0])
    attn_out = []  # o_proj's inputs, kept (in the storage dtype) rather than running attention again
    for hidden, kwargs in shell.inputs:
        x = _input_of(attn, attn.o_proj, lambda: attn(hidden_states=layer.input_layernorm(hidden.to(dtype)), **kwargs))
        feed(GROUPS[1], x)
        attn_out.append(x.to(store))
    quantize_group(GROUPS[1])
    for i, (hidden, kwargs) in enumerate(shell.inputs):
        residual = hidden.to(dtype) + attn.o_proj(attn_out[i].to(dtype))
        attn_out[i] = None  # each batch's buffer goes as soon as it is used
        feed(GROUPS[2], layer.post_attention_layernorm(residual))
        shell.inputs[i] = (residual.to(store), kwargs)
    del attn_out
    quantize_group(GROUPS[2])
    for hidden, _ in shell.inputs:
        normed = layer.post_attention_layernorm(hidden.to(dtype))
        feed(GROUPS[3], _input_of(mlp, mlp.down_proj, lambda: mlp(normed)))
    quantize_group(GROUPS[3])
    if propagate:
        for i, (hidden, kwargs) in enumerate(shell.inputs):
            residual = hidden.to(dtype)
            shell.inputs[i] = ((residual + mlp(layer.post_attention_layernorm(residual))).to(store), kwargs)
