"""Integer quantization arithmetic, short enough to read on one screen.

Weights are ``[out_features, in_features]``. Scales and zero points have shape ``[out, n_groups]``
(``n_groups`` is 1 for per-channel, ``in/group_size`` for grouped, and scalars are ``[1, 1]``
for per-tensor) which is the layout compressed-tensors stores.
"""

from __future__ import annotations

from typing import Optional

import torch

from core.schemes import QuantArgs


def _grouped(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Views ``w`` as ``[out, n_groups, group_len]`` for the scheme's strategy."""
    out, cols = w.shape
    if args.strategy == "tensor":
        return w.reshape(1, 1, -1)
    if args.strategy == "channel":
        return w.reshape(out, 1, cols)
    if args.strategy == "group":
        if cols % args.group_size:
            raise ValueError(f"group_size {args.group_size} does not divide {cols} columns")
        return w.reshape(out, cols // args.group_size, args.group_size)
    raise ValueError(f"strategy {args.strategy!r} does not apply to weights")


def compute_qparams(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per channel or group (float32, int32 ``[out, n_groups]``) by the args' observer."""
    return OBSERVERS[args.observer](_grouped(w.float(), args), args)


def _range(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's range, widened to hold zero (the grid's zero must be a value)."""
    return g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)


def _minmax_qparams(g: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    return _range_qparams(*_range(g), args)


def _extreme_qparams(g: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's Q4_0 rule: the largest-magnitude value maps onto ``qmin`` exactly, so the scale carries its
    sign and the opposite side clips at ``qmax`` (a level more on the side that needs it than ``minmax``)."""
    extreme = g.gather(-1, g.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    scale = stored_scale(extreme / args.qmin, args.scale_dtype)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def stored_scale(scale: torch.Tensor, scale_dtype: Optional[str]) -> torch.Tensor:
    """``scale`` (float32) as the checkpoint will store it: rounded to ``scale_dtype`` within its normal range
    (so nothing becomes zero, subnormal or infinite there; a negative scale keeps its sign), returned as float32."""
    dtype = getattr(torch, scale_dtype) if scale_dtype else torch.float32
    info = torch.finfo(dtype)
    smallest = max(info.tiny, torch.finfo(torch.float32).tiny * 1e6)  # all-zero rows stay finite
    magnitude = scale.abs().clamp(min=smallest, max=info.max).to(dtype).float()
    return torch.where(scale < 0, -magnitude, magnitude)


def _range_qparams(lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to the stored dtype first) and zero point that map ``[lo, hi]`` onto the grid."""
    if args.symmetric:
        # Half the grid's width, not qmax: the convention of compressed-tensors and llm-compressor, which
        # uses the -2^(b-1) level (the positive extreme rounds to qmax, half a step short).
        scale = stored_scale(torch.maximum(-lo, hi) / ((args.qmax - args.qmin) / 2), args.scale_dtype)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    # int only (FP8 is symmetric); the zero point follows the scale as stored
    scale = stored_scale((hi - lo) / (args.qmax - args.qmin), args.scale_dtype)
    zero = (args.qmin - torch.round(lo / scale)).clamp(args.qmin, args.qmax).int()
    return scale, zero


def _mse_qparams(g: torch.Tensor, args: QuantArgs, steps: int = 50, max_shrink: float = 0.8,
                 norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrinks the range per channel/group while that lowers the ``|w - q(w)|^norm`` error (a clipping search)."""
    lo, hi = _range(g)
    best_err = torch.full(lo.shape, float("inf"), device=g.device)
    best_scale, best_zero = _range_qparams(lo, hi, args)
    for i in range(steps):
        shrink = 1.0 - max_shrink * i / steps
        scale, zero = _range_qparams(lo * shrink, hi * shrink, args)
        q = round_to_grid(g / scale.unsqueeze(-1) + zero.unsqueeze(-1), args)
        err = ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - g).abs().pow(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


# The observers of core.schemes.OBSERVERS: grouped weights ``[out, n_groups, group_len]`` -> scale, zero point
OBSERVERS = {"minmax": _minmax_qparams, "mse": _mse_qparams, "extreme": _extreme_qparams}


def round_to_grid(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Nearest grid value: an integer, or for FP8 the nearest E4M3 number (as float32)."""
    if args.type == "float":
        return x.clamp(args.qmin, args.qmax).to(torch.float8_e4m3fn).float()
    return torch.round(x).clamp(args.qmin, args.qmax)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Rounds ``w`` onto the grid: int8 integers in ``[qmin, qmax]``, or float8_e4m3fn for FP8."""
    g = _grouped(w.float(), args)
    q = round_to_grid(g / scale.unsqueeze(-1) + zero.unsqueeze(-1), args).reshape(w.shape)
    return q.to(torch.float8_e4m3fn if args.type == "float" else torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args: QuantArgs,
               g_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float32 weights that grid values ``q`` stand for; ``g_idx`` (the group of each input column, as
    act-order checkpoints store it) replaces contiguous groups."""
    values = q.float() if args.type == "float" else q.to(torch.int32)
    if g_idx is not None:
        groups = g_idx.long()
        return ((values - zero[:, groups]).float() * scale[:, groups].float())
    g = _grouped(values, args)
    return ((g - zero.unsqueeze(-1)).float() * scale.unsqueeze(-1)).reshape(q.shape)


def fake_quantize(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Round trip through the integer grid: what the engine computes with, in ``w``'s dtype."""
    scale, zero = compute_qparams(w, args)
    return dequantize(quantize(w, scale, zero, args), scale, zero, args).to(w.dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in decibels."""
    reference, approx = reference.detach().float(), approx.detach().float()
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise.clamp(min=1e-30)))
