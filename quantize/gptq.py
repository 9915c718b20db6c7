"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

``H = 2/n * X^T X`` over calibration inputs ``X``. Groups take their scale from the weights as updated
when the group is reached, unless ``static_groups`` fixes them up front (which activation ordering
needs here, so that the export keeps the natural column order and needs no ``g_idx``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from core import numerics
from core.schemes import QuantArgs


@dataclass(frozen=True)
class GPTQConfig:
    block_size: int = 128
    dampening: float = 0.01
    actorder: bool = False
    static_groups: bool = False
    max_damp_retries: int = 6


def _inverse_hessian_chol(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp*mean(diag) I)^-1``; raises dampening tenfold until it factors."""
    mean_diag = torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(retries + 1):
        try:
            chol = torch.linalg.cholesky(h + damp * mean_diag * eye)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True), damp
        except torch.linalg.LinAlgError:
            damp = damp * 10 if damp > 0 else 1e-4
    raise torch.linalg.LinAlgError(f"not positive definite even with dampening {damp / 10:g}")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs,
                  config: GPTQConfig = GPTQConfig()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Returns integer weights, scales, zero points (natural column order) and the dampening used."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0  # inputs that were always zero: any value is exact
    h[dead, dead] = 1
    w[:, dead] = 0
    group = args.group_size if args.strategy == "group" else cols
    static = config.static_groups or config.actorder
    scale, zero = numerics.compute_qparams(w, args) if static else (None, None)
    perm = torch.argsort(torch.diag(h), descending=True) if config.actorder else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv, damp = _inverse_hessian_chol(h, config.dampening, config.max_damp_retries)
    if not static:
        scale = torch.zeros(rows, cols // group, device=w.device)
        zero = torch.zeros(rows, cols // group, dtype=torch.int32, device=w.device)
    # columns as rows (w transposed): every per-column vector op then reads contiguous memory, not a stride
    q = _quantize_columns(w.T.contiguous(), hinv, args, scale, zero, perm.tolist(), group, static, config.block_size)
    return q.to(torch.float8_e4m3fn if args.type == "float" else torch.int8), scale, zero, damp


def _quantize_columns(wt: torch.Tensor, hinv: torch.Tensor, args: QuantArgs, scale: torch.Tensor, zero: torch.Tensor,
                      perm: list[int], group: int, static: bool, block_size: int) -> torch.Tensor:
    """GPTQ's column loop on ``wt`` (``[cols, rows]``, permuted columns); fills ``scale``/``zero`` per group unless
    ``static``; returns the grid values as ``[rows, cols]`` in the natural column order."""
    cols, rows = wt.shape
    q = torch.zeros(cols, rows, dtype=torch.float32, device=wt.device)
    diag = torch.diag(hinv).tolist()
    g_now, s, z = -1, None, None
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        block, err = wt[b0:b1].clone(), torch.zeros(b1 - b0, rows, device=wt.device)
        for i in range(b1 - b0):
            g = perm[b0 + i] // group
            if not static and (b0 + i) % group == 0:  # as the reference: the group's weights before this block
                gs, gz = numerics.compute_qparams(wt[b0 + i:b0 + i + group].T, _channel(args))
                scale[:, g], zero[:, g] = gs[:, 0], gz[:, 0]
            if g != g_now:  # 1-D scale and zero of this column's group (float: cheap elementwise ops)
                g_now, s, z = g, scale[:, g].contiguous(), zero[:, g].float()
            column = block[i]
            qcol = numerics.round_to_grid(column / s + z, args)
            q[perm[b0 + i]] = qcol
            torch.div(column - (qcol - z) * s, diag[b0 + i], out=err[i])
            block[i:].addr_(hinv[b0 + i, b0 + i:b1], err[i], alpha=-1)  # push the error onto later columns
        wt[b1:] -= hinv[b0:b1, b1:].T @ err
    return q.T.contiguous()


def _channel(args: QuantArgs) -> QuantArgs:
    """The same args, per channel: a group's scale is computed on that group's columns alone."""
    return replace(args, strategy="channel", group_size=None)
