"""Equivalence transforms that make a layer easier to quantize: SmoothQuant and AWQ.

Both rescale input channels: a linear's columns are multiplied by ``s`` and the operation that
produces its input (an RMSNorm's weight, or the rows of a preceding linear) is divided by ``s``,
so the float model computes the same function.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from core import numerics
from core.schemes import QuantArgs


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``: migrates activation outliers into the weights."""
    w_absmax = torch.cat([w.float() for w in weights]).abs().amax(dim=0)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


SMOOTHQUANT_ALPHAS = tuple(i / 20 for i in range(2, 19))  # 0.1 .. 0.9, searched with --smoothquant-alpha auto


def smoothquant_search(x: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor], weight_args: QuantArgs,
                       act_args: Optional[QuantArgs], alphas: tuple[float, ...] = SMOOTHQUANT_ALPHAS
                       ) -> tuple[torch.Tensor, float]:
    """The migration strength (and its scales) whose smoothed and quantized outputs come closest to the float
    outputs on ``x``: weights rounded to nearest, activations quantized as the scheme does (per token or
    per tensor); the balance layers' outputs are stacked. As Intel Neural Compressor's ``alpha="auto"``."""
    x, w = x.float(), torch.cat([w.float() for w in weights])
    reference = x @ w.T
    act = replace(act_args, strategy="channel" if act_args.strategy == "token" else "tensor") if act_args else None
    best_err, best = float("inf"), (torch.ones_like(act_absmax, dtype=torch.float32), 0.0)
    for alpha in alphas:
        s = smoothquant_scales(act_absmax, weights, alpha)
        xs = x / s
        out = (numerics.fake_quantize(xs, act) if act else xs) @ numerics.fake_quantize(w * s, weight_args).T
        err = float((out - reference).pow(2).sum())
        if err < best_err:
            best_err, best = err, (s, alpha)
    return best


def awq_scales(x: torch.Tensor, weights: list[torch.Tensor], args: QuantArgs, grid: int = 20) -> torch.Tensor:
    """Grid search of ``s = mean|X|^r`` (r in [0, 1)) minimising the quantized outputs' squared error.

    The error ``||X (Q(W s)/s - W)^T||^2`` is computed through the Gram matrix ``X^T X`` (in x in), which is
    cheaper than the outputs themselves when there are more tokens than input channels. The balance
    layers read the same input, so their rows are stacked (quantization is per row or per row-group).
    """
    x = x.float()
    gram = x.T @ x
    w = torch.cat([w.float() for w in weights])
    x_mean = x.abs().mean(dim=0)
    best_err, best = float("inf"), torch.ones_like(x_mean)
    for r in range(grid):
        s = x_mean.pow(r / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        delta = numerics.fake_quantize(w * s, args) / s - w
        err = float(((delta @ gram) * delta).sum())
        if err < best_err:
            best_err, best = err, s
    return best


def awq_clip(x: torch.Tensor, weight: torch.Tensor, args: QuantArgs, grid: int = 20,
             max_shrink: float = 0.5) -> torch.Tensor:
    """Clips each group's range where that lowers the group's output error on ``x``; returns clipped weights.

    The search shrinks ``[min, max]`` (asymmetric) or ``[-absmax, absmax]`` (symmetric) alike, so the
    clipping matches the quantizer's symmetry. A group's error is ``d G d^T`` with ``d`` its weight error
    and ``G`` the group's block of ``X^T X``.
    """
    w = weight.float()
    out, cols = w.shape
    group = args.group_size if args.strategy == "group" else cols
    n_groups = cols // group
    xg = x.float().reshape(x.shape[0], n_groups, group)
    gram = torch.einsum("ngk,ngl->gkl", xg, xg)                         # [G, g, g]
    wg = w.reshape(out, n_groups, group)                               # [out, G, g]
    lo, hi = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
    if args.symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    best_err = torch.full((out, n_groups), float("inf"), device=w.device)
    best = wg.clone()
    for i in range(int(grid * max_shrink) + 1):
        shrink = 1 - i / grid
        clipped = torch.clamp(wg, lo * shrink, hi * shrink).reshape(out, cols)
        q = numerics.fake_quantize(clipped, args).reshape(out, n_groups, group)
        d = q - wg
        err = torch.einsum("ogk,gkl,ogl->og", d, gram, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), clipped.reshape(out, n_groups, group), best)
    return best.reshape(out, cols).to(weight.dtype)


@torch.no_grad()
def fold_scales(smooth: torch.nn.Module, balance: list[torch.nn.Linear], s: torch.Tensor,
                norm_offset: float = 0.0) -> None:
    """Divides ``smooth``'s output channels by ``s`` and multiplies the balance layers' inputs by ``s``. A norm
    scales by ``offset + w`` (offset 0 for Llama's RMSNorm, 1 for Gemma's), so its ``w`` becomes
    ``(offset + w) / s - offset``."""
    if isinstance(smooth, torch.nn.Linear):
        smooth.weight.div_(s.unsqueeze(1).to(smooth.weight.dtype))
    else:  # a norm with a per-channel weight, computed in float32 before it is stored back
        w = smooth.weight.float()
        smooth.weight.copy_(((norm_offset + w) / s - norm_offset).to(smooth.weight.dtype))
    if getattr(smooth, "bias", None) is not None:
        smooth.bias.div_(s.to(smooth.bias.dtype))
    for linear in balance:
        linear.weight.mul_(s.unsqueeze(0).to(linear.weight.dtype))
