"""KV-cache quantization that no engine serves, simulated in transformers ("simulated, not served").

KIVI (Liu et al., 2024) quantizes keys per channel (min/max over groups of ``group`` consecutive tokens) and
values per token (groups of ``group`` channels), asymmetric, and keeps the most recent ``residual`` tokens in
full precision. Here, for a query at position t, keys and values at positions before ``t - residual`` are
read quantized and the rest in full precision: the cache a decoder holds after streaming t tokens, computed
for every position of a prefill window at once. The attention is registered with transformers' attention
interface, so any model that uses it runs unchanged.

KVQuant (Hooper et al., 2024) found that keys quantize better per channel *before* RoPE, which mixes channel
pairs by position. ``pre_rope`` methods do that: the post-RoPE keys the attention receives are rotated back
by their positions' angles (captured from the model's rotary embedding), quantized, and rotated again, which
equals quantizing the pre-RoPE key and applying RoPE. (KVQuant's non-uniform levels and sparse outliers are
not simulated.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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
    pre_rope: bool = False  # keys quantized before RoPE (KVQuant), through the inverse rotation

    def __post_init__(self) -> None:
        # a key group read quantized must lie wholly in the past of the query that reads it
        if self.residual < self.group - 1:
            raise ValueError(f"{self.name}: the residual window ({self.residual}) must cover a group ({self.group}) less one")


SIMULATED_KV: dict[str, KIVI] = {m.name: m for m in (KIVI("kivi4", 4), KIVI("kivi2", 2),
                                                       KIVI("prerope4", 4, pre_rope=True),
                                                       KIVI("prerope2", 2, pre_rope=True))}


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


def kivi_cache(key: torch.Tensor, value: torch.Tensor, method: KIVI,
               rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys quantized per channel over token groups, values per token over channel groups; ``[b, h, seq, d]``.
    With ``rope`` (cos, sin of the keys' positions, ``[b, seq, d]``) keys are quantized before RoPE."""
    if rope is None:
        return (fake_quant_groups(key, method.bits, dim=2, group=method.group),
                fake_quant_groups(value, method.bits, dim=3, group=method.group))
    cos, sin = (t[:, None, : key.shape[2]].to(key.dtype) for t in rope)
    # RoPE undone: the rotation by minus each position's angle; cos and sin carry the rotary embedding's
    # attention scaling (not 1 for YaRN / LongRoPE), which the division removes
    pre = (key * cos - _rotate_half(key) * sin) / (cos * cos + sin * sin)
    pre_q = fake_quant_groups(pre, method.bits, dim=2, group=method.group)
    return pre_q * cos + _rotate_half(pre_q) * sin, fake_quant_groups(value, method.bits, dim=3, group=method.group)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def simulated_attention(method: KIVI, rope: Optional[dict] = None):
    """An attention function (transformers' interface) that reads old positions from the quantized cache;
    ``rope`` holds the (cos, sin) the model's rotary embedding last returned, for ``pre_rope`` methods."""
    def attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, scaling: float, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        key_q, value_q = kivi_cache(key, value, method, rope["cos_sin"] if method.pre_rope else None)
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
    method, rope = SIMULATED_KV[name], {}
    previous = getattr(model, "_qserve_rope_hook", None)
    if previous is not None:  # one capture at a time, whatever was simulated before on this model
        previous.remove()
        model._qserve_rope_hook = None
    if method.pre_rope:
        problem = pre_rope_problem(model)
        if problem:
            raise ValueError(f"{name}: {problem}")
        model._qserve_rope_hook = _rotary(model).register_forward_hook(
            lambda _m, _args, out: rope.__setitem__("cos_sin", out))
    attention = f"{SIMULATED_ATTENTION}_{name}"
    AttentionInterface.register(attention, simulated_attention(method, rope))
    AttentionMaskInterface.register(attention, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the masks sdpa would get
    model.set_attn_implementation(attention)


def _rotary(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    return found[0] if len(found) == 1 else None


def pre_rope_problem(model: torch.nn.Module) -> Optional[str]:
    """Why keys cannot be quantized before RoPE in ``model`` (None when they can): it needs one rotary
    embedding over the whole head."""
    if _rotary(model) is None:
        return "quantizing keys before RoPE needs the model's one rotary embedding; use kivi4 or kivi2"
    if getattr(model.config, "partial_rotary_factor", 1.0) != 1.0:
        return "the model rotates part of each head only (partial_rotary_factor); use kivi4 or kivi2"
    return None
