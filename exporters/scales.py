"""Scales in the dtype a layout stores them in, converted only when nothing is lost."""

from __future__ import annotations

import torch

from core.schemes import SchemeError


def exact_fp16(prefix: str, scale: torch.Tensor, layout: str) -> torch.Tensor:
    """``scale`` as float16 (what the GPTQ and AWQ layouts store), refused when a value would change: fp16
    holds bf16 values exactly only between its smallest normal (6.1e-05) and 65504."""
    converted = scale.to(torch.float16)
    changed = converted.to(scale.dtype) != scale
    if changed.any():
        worst = scale[changed].float().abs()
        value = float(worst.min() if float(worst.min()) < 6.2e-5 else worst.max())
        raise SchemeError(f"{prefix}: a scale of {value:.3g} cannot be stored exactly as float16, the {layout} "
                          f"layout's scale dtype (exact from 6.1e-05 to 65504); keep the compressed-tensors layout")
    return converted
