"""Randomised Hadamard rotations applied as fast Walsh–Hadamard transforms (never a dense n x n matrix).

Widths n = 2^m use the Sylvester transform. Widths n = K * 2^m with a Paley Hadamard matrix of order K
(K - 1 prime, K - 1 = 3 mod 4: K = 12, 20, 24, 44, ...) use H_K ⊗ H_{2^m}: a K x K dense factor plus the FWHT,
so 96, 384 and 768 (= 12 * 2^m) get a full rotation. Any other width falls back to a block-diagonal rotation
with blocks of the largest power of two dividing n (documented weaker mixing); odd widths raise.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


def fwht(x: Tensor) -> Tensor:
    """Unnormalised Walsh–Hadamard transform along the last dim (a power of two): ``x @ H_n``."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two width, got {n}")
    lead = x.shape[:-1]
    y = x
    h = 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


@functools.cache
def paley_hadamard(order: int) -> Tensor:
    """Paley construction I Hadamard matrix of ``order`` = q + 1, q prime and q = 3 (mod 4); entries ±1."""
    q = order - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"no Paley-I Hadamard matrix of order {order}")
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    Q = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    S = torch.zeros(order, order, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    H = S + torch.eye(order, dtype=torch.float64)
    if not torch.equal(H @ H.T, order * torch.eye(order, dtype=torch.float64)):
        raise AssertionError(f"Paley construction failed for order {order}")
    return H


@dataclass(frozen=True)
class HadamardPlan:
    """How a width ``n`` is rotated: ``kind`` is 'pow2', 'paley' (K x 2^m) or 'blockdiag' (n/block blocks)."""

    n: int
    kind: str
    k: int = 1  # Paley factor order
    block: int = 0  # power-of-two FWHT size

    @staticmethod
    def for_width(n: int) -> HadamardPlan:
        """Pick the fullest available construction for width ``n``."""
        if n < 1:
            raise ValueError(f"invalid width {n}")
        if n & (n - 1) == 0:
            return HadamardPlan(n, "pow2", 1, n)
        m = n & -n  # largest power of two dividing n
        for k in range(4, min(n, 256) + 1, 4):  # smallest Paley order K with n / K a power of two
            if n % k == 0 and (n // k) & (n // k - 1) == 0 and _is_prime(k - 1) and (k - 1) % 4 == 3:
                return HadamardPlan(n, "paley", k, n // k)
        if m < 2:
            raise ValueError(
                f"width {n} is odd: no Hadamard rotation is available; exclude this layer from quantization"
            )
        return HadamardPlan(n, "blockdiag", n // m, m)


def hadamard_transform(x: Tensor, plan: HadamardPlan | None = None) -> Tensor:
    """Orthonormal Hadamard transform of the last dim: ``x @ H / sqrt(n)`` (structured per ``plan``)."""
    n = x.shape[-1]
    plan = plan or HadamardPlan.for_width(n)
    if plan.n != n:
        raise ValueError(f"plan is for width {plan.n}, tensor has {n}")
    if plan.kind == "pow2":
        return fwht(x) / math.sqrt(n)
    y = fwht(x.reshape(*x.shape[:-1], plan.k, plan.block))  # [..., k, block]
    if plan.kind == "paley":
        Hk = paley_hadamard(plan.k).to(device=x.device, dtype=x.dtype)
        y = torch.einsum("...kb,kl->...lb", y, Hk) / math.sqrt(n)
    else:
        y = y / math.sqrt(plan.block)
    return y.reshape(x.shape)


def random_signs(n: int, seed: int) -> Tensor:
    """Deterministic ±1 vector of length ``n`` from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g).mul(2).sub(1).to(torch.float32)


def rotate(x: Tensor, signs: Tensor, plan: HadamardPlan | None = None) -> Tensor:
    """``x @ R`` with ``R = diag(signs) H / sqrt(n)`` (orthogonal)."""
    return hadamard_transform(x * signs.to(x.dtype), plan)


def dense_rotation(signs: Tensor, plan: HadamardPlan | None = None) -> Tensor:
    """The dense ``R`` (tests and the reference-approach baseline only)."""
    n = signs.numel()
    return rotate(torch.eye(n, dtype=torch.float64), signs.double(), plan)
