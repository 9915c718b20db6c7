"""The quantized-weight type every package passes around: integers, scales, zero points and their args."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from core import numerics
from core.schemes import QuantArgs


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer weights ``q`` with per-channel/group ``scale`` and ``zero`` (``[out, n_groups]``)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    args: QuantArgs
    dampening: Optional[float] = None
    input_scale: Optional[torch.Tensor] = None  # static activation scale, shape [1]
    g_idx: Optional[torch.Tensor] = None  # group of each input column, when groups are not contiguous

    def dequantize(self) -> torch.Tensor:
        return numerics.dequantize(self.q, self.scale, self.zero, self.args, self.g_idx)

    def to_cpu(self, input_scale: Optional[torch.Tensor] = None) -> "QuantizedWeight":
        """The same weight with its tensors on the CPU (where they are written), plus a static input scale."""
        scale = input_scale.cpu() if input_scale is not None else self.input_scale
        return replace(self, q=self.q.cpu(), scale=self.scale.cpu(), zero=self.zero.cpu(), input_scale=scale)
