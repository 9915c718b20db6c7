"""Half-quadratic quantization (HQQ, Badri & Shaji 2023): calibration-free, a robust fit of each group's grid.

HQQ fits the grid to the weights under an ``|W - W_r|^p`` error with ``p < 1``, which lets a few outliers
stay off the grid instead of stretching it for everyone. Half-quadratic splitting alternates a shrinkage
step (the outliers' part of the error, ``W_e``) with a closed-form update of the grid. HQQ updates a float
zero point; the engines' kernels take integer zero points, so here the zero point stays the integer the
min/max range gives and the closed-form update is the scale's (a least-squares fit of ``(q - z) * s`` to
``W - W_e``), which works for symmetric grids too. The best scale per group by the robust error is kept.
"""

from __future__ import annotations

import torch

from core import numerics
from core.schemes import QuantArgs


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal operator of ``|x|^p / beta``: generalised soft thresholding."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp(min=1e-8).pow(p - 1) / beta)


def hqq_qparams(w: torch.Tensor, args: QuantArgs, iters: int = 20, p: float = 0.7, beta: float = 10.0,
                kappa: float = 1.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points ``[out, n_groups]`` fitted by HQQ's half-quadratic iterations."""
    g = numerics._grouped(w.float(), args)
    scale, zero = numerics.compute_qparams(w, args)
    z = zero.unsqueeze(-1).float()
    best_scale, best_err = scale, torch.full_like(scale, float("inf"))
    for _ in range(iters):
        s = scale.unsqueeze(-1)
        q = numerics.round_to_grid(g / s + z, args)
        err = ((q - z) * s - g).abs().pow(p).mean(dim=-1)
        better = err < best_err
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
        target = g - _shrink(g - (q - z) * s, beta, p)
        fitted = ((q - z) * target).sum(-1) / (q - z).pow(2).sum(-1).clamp(min=1e-12)
        # a fit that would flip the scale's sign (negative scales: observer 'extreme') keeps the old one
        scale = numerics.stored_scale(torch.where(fitted * scale > 0, fitted, scale), args.scale_dtype)
        beta *= kappa
    return best_scale, zero
