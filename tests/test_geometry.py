"""Pose encoding round trips, quaternions, SE(3) inverse and unprojection."""

from __future__ import annotations

import math

import torch

from quantvggt import geometry as g


def _random_rotations(n: int) -> torch.Tensor:
    q = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return g.quat_to_mat(q)


def test_quaternion_round_trip() -> None:
    R = _random_rotations(64)
    torch.testing.assert_close(g.quat_to_mat(g.mat_to_quat(R)), R, atol=1e-10, rtol=0)
    q = g.mat_to_quat(R)
    assert torch.all(q[:, 3] >= 0)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(64, dtype=torch.float64))


def test_known_rotation() -> None:
    a = math.radians(30)
    R = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]], dtype=torch.float64)
    q = g.mat_to_quat(R)
    torch.testing.assert_close(q, torch.tensor([0, 0, math.sin(a / 2), math.cos(a / 2)], dtype=torch.float64))


def test_pose_encoding_round_trip() -> None:
    R = _random_rotations(6).reshape(2, 3, 3, 3)
    t = torch.randn(2, 3, 3, 1, dtype=torch.float64)
    extr = torch.cat([R, t], -1)
    H, W = 294, 518
    K = torch.zeros(2, 3, 3, 3, dtype=torch.float64)
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = 400.0, 420.0, W / 2, H / 2, 1
    enc = g.extri_intri_to_pose_encoding(extr, K, (H, W)).double()
    assert enc.shape == (2, 3, 9)
    e2, K2 = g.pose_encoding_to_extri_intri(enc, (H, W))
    torch.testing.assert_close(e2, extr, atol=1e-5, rtol=0)
    torch.testing.assert_close(K2, K, atol=1e-3, rtol=0)


def test_closed_form_inverse() -> None:
    R = _random_rotations(5)
    t = torch.randn(5, 3, 1, dtype=torch.float64)
    T = torch.cat([R, t], -1)
    inv = g.closed_form_inverse_se3(T)
    full = torch.cat([T, torch.tensor([[[0, 0, 0, 1.0]]], dtype=torch.float64).expand(5, 1, 4)], 1)
    torch.testing.assert_close(inv @ full, torch.eye(4, dtype=torch.float64).expand(5, 4, 4), atol=1e-12, rtol=0)
    torch.testing.assert_close(inv, torch.linalg.inv(full), atol=1e-12, rtol=0)


def test_unprojection_reprojects_to_pixels() -> None:
    H, W = 6, 8
    depth = 1 + torch.rand(2, H, W, dtype=torch.float64)
    K = torch.tensor([[10.0, 0, 4], [0, 11.0, 3], [0, 0, 1]], dtype=torch.float64).expand(2, 3, 3)
    extr = torch.cat([_random_rotations(2), torch.randn(2, 3, 1, dtype=torch.float64)], -1)
    world = g.unproject_depth(depth[..., None], extr, K)  # [2, H, W, 3]
    cam = torch.einsum("sij,shwj->shwi", extr[:, :, :3], world) + extr[:, None, None, :, 3]
    torch.testing.assert_close(cam[..., 2], depth, atol=1e-10, rtol=0)
    uv = torch.einsum("sij,shwj->shwi", K, cam)
    uv = uv[..., :2] / uv[..., 2:]
    torch.testing.assert_close(uv, g.pixel_grid(H, W, dtype=torch.float64).expand(2, H, W, 2), atol=1e-9, rtol=0)
