"""KV-cache scales calibrated on what the attention really caches.

The engine stores keys after RoPE and values as ``v_proj`` made them, computed by the quantized q/k/v; so
the scales are observed there: an attention function registered with transformers (its extension point
for attention kernels) records each layer's key and value maxima, then runs the attention it replaced.
The layer-by-layer pipeline turns it on while a layer's quantized attention runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from core.numerics import stored_scale
from core.schemes import QuantArgs

OBSERVING_ATTENTION = "qserve_kv_observer"
_DELEGATE = "sdpa"  # the attention the observer runs after recording (what the shell would use otherwise)


@dataclass
class KVObserver:
    """Running absolute maxima of one layer's keys and values (per tensor, and per KV head for reports)."""

    key_absmax: Optional[torch.Tensor] = None  # [kv_heads]
    value_absmax: Optional[torch.Tensor] = None
    calls: int = field(default=0)

    def update(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """``key``/``value``: ``[batch, kv_heads, seq, head_dim]`` as the attention function receives them."""
        k = key.detach().abs().amax(dim=(0, 2, 3)).float()
        v = value.detach().abs().amax(dim=(0, 2, 3)).float()
        self.key_absmax = k if self.key_absmax is None else torch.maximum(self.key_absmax, k)
        self.value_absmax = v if self.value_absmax is None else torch.maximum(self.value_absmax, v)
        self.calls += 1

    def scales(self, args: QuantArgs) -> dict[str, torch.Tensor]:
        """``k_scale`` and ``v_scale`` (float32 scalars): the per-tensor maximum over the grid's half width,
        the multiplier the engine dequantizes the cache with."""
        if self.key_absmax is None:
            raise RuntimeError("no attention ran while the KV observer was on")
        half = (args.qmax - args.qmin) / 2
        return {name: stored_scale(absmax.max().clamp(min=1e-8) / half, "float32").reshape(1)
                for name, absmax in (("k_scale", self.key_absmax), ("v_scale", self.value_absmax))}


def _observing_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Any, **kwargs: Any) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    observer = getattr(module, "qserve_kv_observer", None)
    if observer is not None:
        observer.update(key, value)
    return ALL_ATTENTION_FUNCTIONS[_DELEGATE](module, query, key, value, attention_mask, **kwargs)


def use_observing_attention(model: torch.nn.Module) -> None:
    """Makes ``model``'s attention layers call the observer (which records only when one is attached)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(OBSERVING_ATTENTION, _observing_attention)
    # the masks sdpa gets (causal, sliding windows, padding); without this a new name gets none
    AttentionMaskInterface.register(OBSERVING_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS[_DELEGATE])
    model.set_attn_implementation(OBSERVING_ATTENTION)


@contextmanager
def observing(attention: torch.nn.Module) -> Iterator[KVObserver]:
    """Within the block, ``attention``'s calls record their keys and values into the yielded observer."""
    observer = KVObserver()
    attention.qserve_kv_observer = observer
    try:
        yield observer
    finally:
        del attention.qserve_kv_observer
