"""Training losses: pose-encoding L1 over refinement iterations, confidence-weighted regression with gradient terms."""

from __future__ import annotations

import torch
from torch import Tensor


def camera_loss(pose_list: list[Tensor], gt: Tensor, gamma: float = 0.6) -> Tensor:
    """Sum over refinement iterations (later ones weigh more) of L1 on translation, quaternion and FoV."""
    n = len(pose_list)
    total = gt.new_zeros(())
    for i, pred in enumerate(pose_list):
        w = gamma ** (n - i - 1)
        q_gt = gt[..., 3:7]
        q_err = torch.minimum((pred[..., 3:7] - q_gt).abs().sum(-1), (pred[..., 3:7] + q_gt).abs().sum(-1))  # q ~ -q
        total = (
            total
            + w
            * ((pred[..., :3] - gt[..., :3]).abs().sum(-1) + q_err + (pred[..., 7:] - gt[..., 7:]).abs().sum(-1)).mean()
        )
    return total


def _grad(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[..., :, 1:, :] - x[..., :, :-1, :], x[..., 1:, :, :] - x[..., :-1, :, :]


def conf_regression_loss(
    pred: Tensor, conf: Tensor, gt: Tensor, valid: Tensor, alpha: float = 0.2, grad_weight: float = 1.0
) -> Tensor:
    """``conf * |pred - gt| - alpha * log(conf)`` over valid pixels, plus a confidence-weighted gradient term.

    ``pred``/``gt``: ``[B, S, H, W, C]``; ``conf``, ``valid``: ``[B, S, H, W]``.
    """
    v = valid.float()
    n = v.sum().clamp(min=1)
    err = (pred - gt).abs().sum(-1)
    reg = ((conf * err - alpha * torch.log(conf)) * v).sum() / n
    gx_p, gy_p = _grad(pred)
    gx_g, gy_g = _grad(gt)
    vx = v[..., :, 1:] * v[..., :, :-1]
    vy = v[..., 1:, :] * v[..., :-1, :]
    cx = conf[..., :, 1:]
    cy = conf[..., 1:, :]
    g = ((gx_p - gx_g).abs().sum(-1) * cx * vx).sum() / vx.sum().clamp(min=1) + (
        (gy_p - gy_g).abs().sum(-1) * cy * vy
    ).sum() / vy.sum().clamp(min=1)
    return reg + grad_weight * g
