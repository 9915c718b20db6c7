"""Orthogonal matrices for rotations: Hadamard matrices of the sizes real models use, and random ones.

A Hadamard matrix of order n has entries ±1 and ``H @ H.T == n * I``; one exists only for n = 1, 2 or a
multiple of 4. Sylvester's construction gives the powers of two; Paley's constructions give q + 1 (q a
prime, q = 3 mod 4) and 2(q + 1) (q a prime, q = 1 mod 4); Kronecker products multiply orders. That covers
576 = 12 x 12 x 4 (the demo model), 896 = 28 x 32, 1536 = 12 x 128, 3584 = 28 x 128 and 4864 = 76 x 64.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)``, chi the quadratic character mod the prime ``q`` (0 at 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley_kind(order: int) -> Optional[int]:
    """1 or 2 when Paley's first or second construction builds a Hadamard matrix of ``order``; else None."""
    if _is_prime(order - 1) and (order - 1) % 4 == 3:
        return 1
    q = order // 2 - 1
    return 2 if order % 2 == 0 and _is_prime(q) and q % 4 == 1 else None


def _paley(order: int) -> torch.Tensor:
    """Paley's Hadamard matrix of ``order`` (which ``_paley_kind`` accepts)."""
    if _paley_kind(order) == 1:  # Paley I: I + [[0, 1], [-1, Q]] (Q is skew)
        q = order - 1
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(order, dtype=torch.float64) + s
    q = order // 2 - 1  # Paley II: C x [[1,-1],[-1,-1]] + I x [[1,1],[1,-1]] (C symmetric)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _factors(n: int) -> Optional[list[int]]:
    """Orders whose Kronecker product is ``n``: Paley orders and one power of two; None when none is found."""
    if n & (n - 1) == 0:
        return [n]
    for d in range(12, n + 1, 4):
        if n % d == 0 and _paley_kind(d) is not None and (rest := _factors(n // d)) is not None:
            return [d] + rest
    return None


@lru_cache(maxsize=16)
def _hadamard_cached(n: int) -> Optional[torch.Tensor]:
    factors = _factors(n)
    if factors is None:
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        h = torch.kron(h, _sylvester(f) if f & (f - 1) == 0 else _paley(f))
    return h


def hadamard(n: int) -> Optional[torch.Tensor]:
    """A ±1 Hadamard matrix of order ``n`` (float64), or None when these constructions cannot build one."""
    h = _hadamard_cached(n)
    return None if h is None else h.clone()


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """``diag(±1) @ H / sqrt(n)``: orthogonal, every entry ±1/sqrt(n) (QuaRot's randomized Hadamard).
    Sizes with no Hadamard matrix here get a random orthogonal matrix instead (QR of a Gaussian)."""
    h = hadamard(n)
    if h is None:
        return random_orthogonal(n, generator)
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * h / n ** 0.5


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64): QR of a Gaussian, signs fixed by R's diagonal."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]
