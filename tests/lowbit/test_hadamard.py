"""Fast Walsh–Hadamard rotations."""

from __future__ import annotations

import pytest
import torch

from quantvggt.lowbit.hadamard import (
    HadamardPlan,
    dense_rotation,
    fwht,
    hadamard_transform,
    paley_hadamard,
    random_signs,
    rotate,
)


def sylvester(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
def test_fwht_equals_dense_product(n: int) -> None:
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ sylvester(n))


@pytest.mark.parametrize(
    "n,kind",
    [
        (1024, "pow2"),
        (2048, "pow2"),
        (4096, "pow2"),
        (96, "paley"),
        (384, "paley"),
        (768, "paley"),
        (40, "paley"),
        (80, "paley"),
        (56, "blockdiag"),
    ],
)
def test_rotation_is_orthogonal(n: int, kind: str) -> None:
    plan = HadamardPlan.for_width(n)
    assert plan.kind == kind
    R = dense_rotation(random_signs(n, 3), plan)
    torch.testing.assert_close(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)


def test_rotation_preserves_linear_output() -> None:
    n = 384
    x, W = torch.randn(7, n, dtype=torch.float64), torch.randn(11, n, dtype=torch.float64)
    s = random_signs(n, 0).double()
    torch.testing.assert_close(rotate(x, s) @ rotate(W, s).T, x @ W.T)


def test_structured_transform_matches_dense_matrix() -> None:
    n = 96
    s = random_signs(n, 1).double()
    x = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, s), x @ dense_rotation(s))


def test_paley_orders() -> None:
    for k in (4, 8, 12, 20, 24, 44):
        H = paley_hadamard(k)
        assert torch.equal(H @ H.T, k * torch.eye(k, dtype=torch.float64))
    with pytest.raises(ValueError):
        paley_hadamard(16)


def test_odd_width_raises_clearly() -> None:
    with pytest.raises(ValueError, match="odd"):
        HadamardPlan.for_width(9)


def test_signs_are_deterministic() -> None:
    assert torch.equal(random_signs(64, 5), random_signs(64, 5))
    assert not torch.equal(random_signs(64, 5), random_signs(64, 6))
    assert set(random_signs(64, 5).tolist()) == {-1.0, 1.0}


def test_rotation_spreads_an_outlier_channel() -> None:
    x = torch.randn(100, 1024) * 0.1
    x[:, 3] = 50.0
    r = hadamard_transform(x)
    assert r.abs().amax() < 5 * r.abs().mean(dim=-1).max()
