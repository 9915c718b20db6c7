"""Mixture-of-Experts blocks: which linears the experts are, and how they are calibrated one expert at a time.

transformers (5.x) holds a block's routed experts as two 3-D parameters (``gate_up_proj``, ``down_proj``) and
converts the per-expert tensors of a checkpoint at load time; checkpoints, compressed-tensors and vLLM name
each expert's linears on their own (``mlp.experts.3.gate_proj``, Mixtral ``block_sparse_moe.experts.3.w1``).
For calibration the fused module is replaced by ``RoutedExperts``, one ``nn.Linear`` per expert projection
under the checkpoint's names, computing the same function. Calibration routes tokens as the model does; each
expert's Hessians are accumulated, used and freed before the next expert's (memory: the layer's weights plus
one expert's statistics, whatever the number of experts). An expert that received fewer than
``min_tokens`` calibration tokens is rounded to nearest instead, and the report says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from quantize.capture import StopForward
from quantize.methods import MethodError
from quantize.report import REPORT_TOKENS
from quantize.stats import Stats

MIN_EXPERT_TOKENS = 128  # below this many routed calibration tokens an expert's Hessian is too thin for GPTQ
# Experts see token counts of every size; each new matmul shape costs oneDNN a cached primitive, and a layer's
# worth of them grew memory by ~67 MiB per layer (benchmarks/moe_memory.py). Calibration works on an expert's
# tokens in chunks of CHUNK_ROWS rows, and routed forwards pad to a multiple of PAD_ROWS, so shapes stay few.
CHUNK_ROWS = 256
PAD_ROWS = 64
# quantizes layer-relative linears from these statistics; True: round to nearest (an expert short of tokens)
Quantize = Callable[[tuple[str, ...], Stats, bool], None]


@dataclass(frozen=True)
class MoEFamily:
    """Where a model type keeps its sparse blocks and what their parts are called."""

    block: str  # the sparse block's attribute on a decoder layer in transformers ("mlp")
    stored_block: str  # its name in checkpoints ("block_sparse_moe" for Mixtral)
    num_experts: str  # the config field with the number of routed experts
    projections: tuple[str, str, str]  # an expert's gate, up and down projections as checkpoints name them
    # kept in the checkpoint's precision by default, as llm-compressor's MoE recipes do: the router (a small
    # matrix whose rounding moves tokens between experts) and Qwen2-MoE's shared-expert gate
    keep_float: tuple[str, ...]
    shared: tuple[str, ...] = ()  # dense experts every token passes through (Qwen2-MoE's shared_expert)

    def stored_name(self, name: str) -> str:
        """A layer-relative module name as checkpoints spell it."""
        return self._swap(name, self.block, self.stored_block)

    def module_name(self, name: str) -> str:
        """A layer-relative checkpoint name as the transformers module tree spells it."""
        return self._swap(name, self.stored_block, self.block)

    @staticmethod
    def _swap(name: str, old: str, new: str) -> str:
        return new + name[len(old):] if name == old or name.startswith(old + ".") else name


_QWEN = ("gate_proj", "up_proj", "down_proj")
MOE_FAMILIES: dict[str, MoEFamily] = {
    "mixtral": MoEFamily("mlp", "block_sparse_moe", "num_local_experts", ("w1", "w3", "w2"),
                         ("re:.*block_sparse_moe\\.gate$",)),
    "qwen2_moe": MoEFamily("mlp", "mlp", "num_experts", _QWEN,
                           ("re:.*mlp\\.gate$", "re:.*mlp\\.shared_expert_gate$"), shared=("shared_expert",)),
    "qwen3_moe": MoEFamily("mlp", "mlp", "num_experts", _QWEN, ("re:.*mlp\\.gate$",)),
}


class MoEError(MethodError):
    """A Mixture-of-Experts model the pipeline cannot quantize as asked; the message says what to do."""


def moe_family(config: Any) -> Optional[MoEFamily]:
    """The model type's MoE family (None for dense models); an MoE config without experts is refused."""
    family = MOE_FAMILIES.get(getattr(config, "model_type", None))
    if family is not None and not getattr(config, family.num_experts, 0):
        raise MoEError(f"{config.model_type} config has {family.num_experts}="
                       f"{getattr(config, family.num_experts, None)!r}: a Mixture-of-Experts model needs at least one "
                       f"expert per sparse layer; fix config.json")
    return family


def is_sparse(layer: nn.Module, family: MoEFamily) -> bool:
    """Whether this decoder layer's block holds routed experts (Qwen MoE models may keep some layers dense)."""
    return hasattr(getattr(layer, family.block, None), "experts")


def expert_linears(model: nn.Module) -> list[str]:
    """Every routed expert projection of ``model`` (a meta-device model) under its checkpoint name."""
    family = moe_family(model.config)
    if family is None:
        return []
    count = getattr(model.config, family.num_experts)
    return [f"model.layers.{i}.{family.stored_block}.experts.{e}.{p}"
            for i, layer in enumerate(model.model.layers) if is_sparse(layer, family)
            for e in range(count) for p in family.projections]


class ExpertMLP(nn.Module):
    """One routed expert as checkpoints store it: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act: Callable) -> None:
        super().__init__()
        self.names, self.act = names, act
        for name, (n_in, n_out) in zip(names, ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))):
            self.add_module(name, nn.Linear(n_in, n_out, bias=False))

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, _ = (getattr(self, n) for n in self.names)
        return self.act(gate(x)) * up(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.names[2])(self.intermediate(x))


class RoutedExperts(nn.ModuleList):
    """The experts of a sparse block, one ``ExpertMLP`` each, called as transformers calls its fused experts
    module: ``(hidden_states [tokens, hidden], top_k_index, top_k_weights) -> [tokens, hidden]``."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if len(token):
                y = expert(_pad_rows(hidden_states[token], PAD_ROWS))[:len(token)] * top_k_weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def _pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` with zero rows appended up to a multiple of ``multiple`` rows."""
    missing = -len(x) % multiple
    return torch.nn.functional.pad(x, (0, 0, 0, missing)) if missing else x


def unfuse_experts(layer: nn.Module, family: MoEFamily) -> None:
    """Replaces the fused experts of ``layer``'s sparse block by ``RoutedExperts`` (on the meta device, with
    the checkpoint's parameter names), so each expert projection is an ``nn.Linear`` of its own."""
    block = getattr(layer, family.block)
    fused = block.experts
    count, inter, hidden = fused.down_proj.shape[0], fused.down_proj.shape[2], fused.down_proj.shape[1]
    with torch.device("meta"):
        experts = RoutedExperts(ExpertMLP(family.projections, hidden, inter, fused.act_fn) for _ in range(count))
    block.experts = experts.to(fused.down_proj.dtype)


@torch.no_grad()
def route(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the block's router sends to its experts for inputs ``x``: flat hidden states, top-k expert indices
    and weights, taken at the experts' call (so the routing is the model's own, whatever its router does)."""
    seen: list[tuple] = []

    def catch(_module: nn.Module, args: tuple) -> None:
        seen.append(args)
        raise StopForward

    handle = block.experts.register_forward_pre_hook(catch)
    try:
        block(x)
    except StopForward:
        pass
    finally:
        handle.remove()
    return seen[0][0], seen[0][1], seen[0][2]


@dataclass
class ExpertCalibration:
    """Per routed expert of one layer: calibration tokens it received and whether it fell back to RTN."""

    tokens: list[int]
    fallback: list[int]


@torch.no_grad()
def calibrate_sparse_block(block: nn.Module, prefix: str, inputs: list[torch.Tensor], quantize: Quantize,
                           family: MoEFamily, min_tokens: int) -> ExpertCalibration:
    """Quantizes a sparse block's experts one at a time on the tokens routed to each (``inputs``: the block's
    inputs per batch; ``prefix``: the block's layer-relative name). Shared experts see every token."""
    routes = [route(block, x)[1] for x in inputs]
    flat = [x.reshape(-1, x.shape[-1]) for x in inputs]
    for shared in family.shared:
        every = [torch.arange(len(x), device=x.device) for x in flat]
        _calibrate_expert(getattr(block, shared), f"{prefix}.{shared}", flat, every, quantize, fallback=False)
    result = ExpertCalibration([], [])
    for e, expert in enumerate(block.experts):
        rows = [torch.where((index == e).any(dim=-1))[0] for index in routes]
        result.tokens.append(sum(len(r) for r in rows))
        if result.tokens[-1] < min_tokens:
            result.fallback.append(e)
        _calibrate_expert(expert, f"{prefix}.experts.{e}", flat, rows, quantize, fallback=e in result.fallback)
    return result


def _calibrate_expert(expert: nn.Module, prefix: str, flat: list[torch.Tensor], rows: list[torch.Tensor],
                      quantize: Quantize, fallback: bool) -> None:
    """GPTQ's order inside one expert: gate/up on its tokens, then down on what the quantized gate/up make
    (with ``fallback``, round to nearest; the tokens it has still feed the report). The tokens are gathered
    and taken ``CHUNK_ROWS`` at a time, the last chunk zero-padded (zeros add nothing to a Hessian, and the
    activation of a zero row is zero)."""
    gate, up, down = (f"{prefix}.{n}" for n in _projection_names(expert))
    tokens = torch.cat([x[r] for x, r in zip(flat, rows)]) if rows else flat[0][:0]
    stats = Stats(hessian=not fallback, absmax=False, sample_tokens=max(1, min(REPORT_TOKENS, len(tokens))),
                  total_tokens=max(1, len(tokens)))
    stats.share(((gate, up), (down,)))
    chunks = [(_pad_rows(tokens[i:i + CHUNK_ROWS], CHUNK_ROWS), min(CHUNK_ROWS, len(tokens) - i))
              for i in range(0, len(tokens), CHUNK_ROWS)]
    for chunk, valid in chunks:
        stats.record(gate, chunk, valid)
        stats.record(up, chunk, valid)
    quantize((gate, up), stats, fallback)
    for chunk, valid in chunks:
        stats.record(down, _intermediate(expert, chunk), valid)
    quantize((down,), stats, fallback)


def _projection_names(expert: nn.Module) -> tuple[str, str, str]:
    return getattr(expert, "names", ("gate_proj", "up_proj", "down_proj"))  # a dense MLP (shared expert)


def _intermediate(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(expert, ExpertMLP):
        return expert.intermediate(x)
    return expert.act_fn(expert.gate_proj(x)) * expert.up_proj(x)

