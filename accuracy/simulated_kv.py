"""KV-cache quantization that no engine serves, simulated in transformers ("simulated, not served").

KIVI (Liu et al., 2024) quantizes keys per channel (min/max over groups of ``group`` consecutive tokens) and
values per token (groups of ``group`` channels), asymmetric, and keeps the most recent ``residual`` tokens in
full precision. Here, for a query at position t, keys and values at positions before ``t - residual`` are
read quantized and the rest in full precision: the cache a decoder holds after streaming t tokens, computed
for every position of a prefill window at once. The attention is registered with transformers' attention
interface, so any model that uses it runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SIMULATED_ATTENTION = "qserve_simulated_kv"


@dataclass(frozen=True)
class KIVI:
    """One simulated KV-cache method: ``bits`` per element, quantization groups of ``group``, a full-precision
    window of the ``residual`` most recent tokens."""

    name: str
    bits: int
    group: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        # a key group read quantized must lie wholly in the past of the query that reads it
        if self.residual < self.group - 1:
            raise ValueError(f"{self.name}: the residual window ({self.residual}) must cover a group ({self.group}) less one")


SIMULATED_KV: dict[str, KIVI] = {m.name: m for m in (KIVI("kivi4", 4), KIVI("kivi2", 2))}


def fake_quant_groups(x: torch.Tensor, bits: int, dim: int, group: int) -> torch.Tensor:
    """Asymmetric min/max round trip of ``x`` in groups of ``group`` along ``dim`` (a ragged last group
    is its own group)."""
    moved = x.float().movedim(dim, -1)
    out = torch.empty_like(moved)
    levels = 2 ** bits - 1
    for start in range(0, moved.shape[-1], group):
        chunk = moved[..., start:start + group]
        lo, hi = chunk.amin(-1, keepdim=True), chunk.amax(-1, keepdim=True)
        scale = ((hi - lo) / levels).clamp(min=1e-8)
        out[..., start:start + group] = torch.round((chunk - lo) / scale).clamp(0, levels) * scale + lo
    return out.movedim(-1, dim).to(x.dtype)


def kivi_cache(key: torch.Tensor, value: torch.Tensor, method: KIVI) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys quantized per channel over token groups, values per token over channel groups; ``[b, h, seq, d]``."""
    return (fake_quant_groups(key, method.bits, dim=2, group=method.group),
            fake_quant_groups(value, method.bits, dim=3, group=method.group))


def simulated_attention(method: KIVI):
    """An attention function (transformers' interface) that reads old positions from the quantized cache."""
    def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, scaling: float, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        key_q, value_q = kivi_cache(key, value, method)
        q_len, k_len = query.shape[2], key.shape[2]
        pos_q = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
        pos_k = torch.arange(k_len, device=query.device)[None, :]
        recent = pos_k > pos_q - method.residual  # the `residual` most recent positions, read in full precision
        scores = torch.where(recent, query @ key.transpose(-1, -2), query @ key_q.transpose(-1, -2)) * scaling
        scores = scores.float().masked_fill(pos_k > pos_q, float("-inf"))
        if attention_mask is not None:  # the model's own mask as sdpa gets it (sliding windows, padding)
            allowed = attention_mask[..., :k_len].bool() if attention_mask.dtype == torch.bool else None
            scores = (scores.masked_fill(~allowed, float("-inf")) if allowed is not None
                      else scores + attention_mask[..., :k_len].float())
        probs = torch.softmax(scores, dim=-1).to(query.dtype)
        out = (probs * recent) @ value + (probs * ~recent) @ value_q
        return out.transpose(1, 2).contiguous(), None

    return attend


def use_simulated_kv(model: torch.nn.Module, name: str) -> None:
    """Makes ``model`` attend through the simulated cache of ``SIMULATED_KV[name]``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if name not in SIMULATED_KV:
        raise ValueError(f"unknown simulated KV method {name!r}; use one of: {', '.join(SIMULATED_KV)}")
    attention = f"{SIMULATED_ATTENTION}_{name}"
    AttentionInterface.register(attention, simulated_attention(SIMULATED_KV[name]))
    AttentionMaskInterface.register(attention, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the masks sdpa would get
    model.set_attn_implementation(attention)
