"""Camera geometry: pose encoding <-> OpenCV extrinsics/intrinsics, quaternions, SE(3) inverse, unprojection.

Extrinsics are camera-from-world ``[..., 3, 4]`` (OpenCV: x right, y down, z forward).
Quaternions are (x, y, z, w), scalar last, as upstream VGGT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def quat_to_mat(q: Tensor) -> Tensor:
    """Quaternion ``[..., 4]`` (xyzw, any norm) -> rotation ``[..., 3, 3]``."""
    i, j, k, r = torch.unbind(q, -1)
    two_s = 2.0 / (q * q).sum(-1)
    o = torch.stack(
        (
            1 - two_s * (j * j + k * k),
            two_s * (i * j - k * r),
            two_s * (i * k + j * r),
            two_s * (i * j + k * r),
            1 - two_s * (i * i + k * k),
            two_s * (j * k - i * r),
            two_s * (i * k - j * r),
            two_s * (j * k + i * r),
            1 - two_s * (i * i + j * j),
        ),
        -1,
    )
    return o.reshape((*q.shape[:-1], 3, 3))


def mat_to_quat(m: Tensor) -> Tensor:
    """Rotation ``[..., 3, 3]`` -> unit quaternion ``[..., 4]`` (xyzw, w >= 0)."""
    if m.shape[-2:] != (3, 3):
        raise ValueError(f"expected [..., 3, 3] rotations, got {tuple(m.shape)}")
    batch = m.shape[:-2]
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = torch.unbind(m.reshape((*batch, 9)), -1)
    q_abs = torch.sqrt(
        torch.clamp(
            torch.stack(
                [1.0 + m00 + m11 + m22, 1.0 + m00 - m11 - m22, 1.0 - m00 + m11 - m22, 1.0 - m00 - m11 + m22], -1
            ),
            min=0,
        )
    )
    cand = torch.stack(
        [
            torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
            torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], -1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], -1),
        ],
        -2,
    )  # rows are (w, x, y, z) candidates
    cand = cand / (2.0 * q_abs[..., None].clamp(min=0.1))
    best = F.one_hot(q_abs.argmax(-1), 4) > 0.5
    wxyz = cand[best].reshape((*batch, 4))
    xyzw = wxyz[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)


def extri_intri_to_pose_encoding(extrinsics: Tensor, intrinsics: Tensor, image_size_hw: tuple[int, int]) -> Tensor:
    """``[B,S,3,4]`` extrinsics + ``[B,S,3,3]`` intrinsics -> ``absT_quaR_FoV`` encoding ``[B,S,9]``."""
    R, T = extrinsics[..., :3, :3], extrinsics[..., :3, 3]
    H, W = image_size_hw
    fov_h = 2 * torch.atan(H / 2 / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan(W / 2 / intrinsics[..., 0, 0])
    return torch.cat([T, mat_to_quat(R), fov_h[..., None], fov_w[..., None]], -1).float()


def pose_encoding_to_extri_intri(pose_enc: Tensor, image_size_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``absT_quaR_FoV`` ``[...,9]`` -> extrinsics ``[...,3,4]``, intrinsics ``[...,3,3]`` (centred principal point)."""
    T, quat, fov_h, fov_w = pose_enc[..., :3], pose_enc[..., 3:7], pose_enc[..., 7], pose_enc[..., 8]
    extr = torch.cat([quat_to_mat(quat), T[..., None]], -1)
    H, W = image_size_hw
    K = torch.zeros((*pose_enc.shape[:-1], 3, 3), device=pose_enc.device, dtype=pose_enc.dtype)
    K[..., 0, 0] = W / 2.0 / torch.tan(fov_w / 2.0)
    K[..., 1, 1] = H / 2.0 / torch.tan(fov_h / 2.0)
    K[..., 0, 2] = W / 2
    K[..., 1, 2] = H / 2
    K[..., 2, 2] = 1.0
    return extr, K


def closed_form_inverse_se3(se3: Tensor) -> Tensor:
    """Invert rigid transforms ``[..., 3|4, 4]`` as ``[R^T, -R^T t]``; returns ``[..., 4, 4]``."""
    if se3.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"expected [..., 3|4, 4] transforms, got {tuple(se3.shape)}")
    R, t = se3[..., :3, :3], se3[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    out = torch.zeros((*se3.shape[:-2], 4, 4), dtype=se3.dtype, device=se3.device)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1
    return out


def pixel_grid(H: int, W: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixel coordinates ``[H, W, 2]`` (u, v) at integer positions, as upstream's unprojection uses."""
    v, u = torch.meshgrid(
        torch.arange(H, device=device, dtype=dtype), torch.arange(W, device=device, dtype=dtype), indexing="ij"
    )
    return torch.stack([u, v], -1)


def depth_to_cam_points(depth: Tensor, K: Tensor, pixel_offset: float = 0.0) -> Tensor:
    """Depth ``[..., H, W]`` + intrinsics ``[..., 3, 3]`` -> camera-frame points ``[..., H, W, 3]``.

    Pixel (i, j) sits at ``(j + pixel_offset, i + pixel_offset)``: 0 as upstream VGGT, 0.5 for pixel centres.
    """
    H, W = depth.shape[-2:]
    uv = pixel_grid(H, W, depth.device, depth.dtype) + pixel_offset
    fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]
    cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
    x = (uv[..., 0] - cx) * depth / fx
    y = (uv[..., 1] - cy) * depth / fy
    return torch.stack([x, y, depth], -1)


def cam_to_world(points: Tensor, extrinsics: Tensor) -> Tensor:
    """Camera-frame points ``[..., H, W, 3]`` -> world using camera-from-world extrinsics ``[..., 3, 4]``."""
    inv = closed_form_inverse_se3(extrinsics)
    R, t = inv[..., :3, :3], inv[..., :3, 3]
    return torch.einsum("...ij,...hwj->...hwi", R, points) + t[..., None, None, :]


def unproject_depth(depth: Tensor, extrinsics: Tensor, K: Tensor, pixel_offset: float = 0.0) -> Tensor:
    """Depth ``[..., H, W]`` (or ``[..., H, W, 1]``) -> world points ``[..., H, W, 3]``."""
    if depth.shape[-1] == 1 and depth.dim() >= 3:
        depth = depth[..., 0]
    return cam_to_world(depth_to_cam_points(depth, K, pixel_offset), extrinsics)
