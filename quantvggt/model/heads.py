"""Prediction heads: camera (pose encoding), DPT (depth / point maps) and their activations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantvggt.model.config import CameraHeadConfig, DPTHeadConfig
from quantvggt.model.layers import Block, Mlp


def inverse_log_transform(y: Tensor) -> Tensor:
    """sign(y) * (exp(|y|) - 1)."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


def _act(x: Tensor, kind: str) -> Tensor:
    if kind == "linear":
        return x
    if kind == "inv_log":
        return inverse_log_transform(x)
    if kind == "exp":
        return torch.exp(x)
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {kind!r}")


def activate_pose(enc: Tensor, trans_act: str = "linear", quat_act: str = "linear", fl_act: str = "linear") -> Tensor:
    """Activate the translation / quaternion / field-of-view parts of a pose encoding ``[..., 9]``."""
    return torch.cat([_act(enc[..., :3], trans_act), _act(enc[..., 3:7], quat_act), _act(enc[..., 7:], fl_act)], dim=-1)


def activate_head(out: Tensor, activation: str, conf_activation: str) -> tuple[Tensor, Tensor]:
    """``[B, C, H, W]`` -> (values ``[B, H, W, C-1]``, confidence ``[B, H, W]``)."""
    fmap = out.permute(0, 2, 3, 1)
    xyz, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "norm_exp":
        d = xyz.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        pts = xyz / d * torch.expm1(d)
    elif activation == "norm":
        pts = xyz / xyz.norm(dim=-1, keepdim=True)
    elif activation == "sigmoid":
        pts = torch.sigmoid(xyz)
    elif activation == "xy_inv_log":
        xy, z = xyz.split([2, 1], dim=-1)
        z = inverse_log_transform(z)
        pts = torch.cat([xy * z, z], dim=-1)
    else:
        pts = _act(xyz, activation)
    if conf_activation == "expp1":
        conf = 1 + conf.exp()
    elif conf_activation == "expp0":
        conf = conf.exp()
    elif conf_activation == "sigmoid":
        conf = torch.sigmoid(conf)
    else:
        raise ValueError(f"unknown conf_activation {conf_activation!r}")
    return pts, conf


class CameraHead(nn.Module):
    """Refines a pose encoding from the camera token over ``num_iterations`` AdaLN-modulated trunk passes."""

    def __init__(self, cfg: CameraHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim_in
        self.target_dim = 9
        self.trunk = nn.Sequential(
            *[Block(dim, cfg.num_heads, cfg.mlp_ratio, init_values=cfg.init_values) for _ in range(cfg.trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim, bias=True))
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, self.target_dim)

    def forward(self, tokens_list: Sequence[Tensor | None], num_iterations: int = 4) -> list[Tensor]:
        """Last-layer tokens -> list of activated pose encodings ``[B, S, 9]``, one per iteration."""
        tokens = tokens_list[-1]
        assert tokens is not None, "camera head needs the last aggregator layer"
        pose_tokens = self.token_norm(tokens[:, :, 0])  # [B, S, C]
        B, S, _ = pose_tokens.shape
        enc: Tensor | None = None
        out = []
        for _ in range(num_iterations):
            if enc is None:
                module_input = self.embed_pose(self.empty_pose_tokens.expand(B, S, -1))
            else:
                module_input = self.embed_pose(enc.detach())
            shift, scale, gate = self.poseLN_modulation(module_input).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(pose_tokens) * (1 + scale) + shift) + pose_tokens
            x = self.trunk(x)
            delta = self.pose_branch(self.trunk_norm(x))
            enc = delta if enc is None else enc.detach() + delta
            out.append(activate_pose(enc, self.cfg.trans_act, self.cfg.quat_act, self.cfg.fl_act))
        return out


def make_sincos_pos_embed(embed_dim: int, pos: Tensor, omega_0: float = 100) -> Tensor:
    """1D sin/cos embedding of positions ``pos`` -> ``[M, embed_dim]``."""
    omega = torch.arange(
        embed_dim // 2, dtype=torch.float64 if pos.device.type != "mps" else torch.float32, device=pos.device
    )
    omega = 1.0 / omega_0 ** (omega / (embed_dim / 2.0))
    out = torch.einsum("m,d->md", pos.reshape(-1), omega)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def position_grid_to_embed(grid: Tensor, embed_dim: int, omega_0: float = 100) -> Tensor:
    """``[H, W, 2]`` grid -> ``[H, W, embed_dim]`` sin/cos embedding (x half, then y half)."""
    H, W, _ = grid.shape
    flat = grid.reshape(-1, 2)
    emb = torch.cat(
        [
            make_sincos_pos_embed(embed_dim // 2, flat[:, 0], omega_0),
            make_sincos_pos_embed(embed_dim // 2, flat[:, 1], omega_0),
        ],
        dim=-1,
    )
    return emb.view(H, W, embed_dim)


def create_uv_grid(width: int, height: int, aspect_ratio: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Normalised view-plane UV grid ``[H, W, 2]`` spanning the image diagonal."""
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    u = torch.linspace(
        -span_x * (width - 1) / width, span_x * (width - 1) / width, steps=width, dtype=dtype, device=device
    )
    v = torch.linspace(
        -span_y * (height - 1) / height, span_y * (height - 1) / height, steps=height, dtype=dtype, device=device
    )
    uu, vv = torch.meshgrid(u, v, indexing="xy")
    return torch.stack((uu, vv), dim=-1)


def _interp(x: Tensor, size: tuple[int, int]) -> Tensor:
    # upstream chunks very large inputs to stay under INT_MAX elements
    limit = 1610612736
    n = size[0] * size[1] * x.shape[0] * x.shape[1]
    if n > limit:
        parts = torch.chunk(x, n // limit + 1, dim=0)
        return torch.cat([F.interpolate(p, size=size, mode="bilinear", align_corners=True) for p in parts]).contiguous()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ResidualConvUnit(nn.Module):
    """relu -> conv -> relu -> conv, added to relu(x) (upstream's in-place ReLU makes the skip rectified)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """Residual refinement of a feature map."""
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    """Fuses a coarser path with a skip feature, upsamples, projects (DPT refinenet)."""

    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1, 1, 0, bias=True)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        """Fuse, refine, upsample to ``size`` (or 2x)."""
        if self.has_residual and skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            size = (int(x.shape[-2] * 2), int(x.shape[-1] * 2))
        return self.out_conv(_interp(x, size))


class DPTHead(nn.Module):
    """DPT dense head over four aggregator layers; outputs per-pixel values and confidence."""

    def __init__(self, cfg: DPTHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        oc = cfg.out_channels
        f = cfg.features
        self.norm = nn.LayerNorm(cfg.dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(cfg.dim_in, c, 1, 1, 0) for c in oc])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4, padding=0),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2, padding=0),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i in range(4):
            setattr(self.scratch, f"layer{i + 1}_rn", nn.Conv2d(oc[i], f, 3, 1, 1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(f)
        self.scratch.refinenet2 = FeatureFusionBlock(f)
        self.scratch.refinenet3 = FeatureFusionBlock(f)
        self.scratch.refinenet4 = FeatureFusionBlock(f, has_residual=False)
        if cfg.feature_only:
            self.scratch.output_conv1 = nn.Conv2d(f, f, 3, 1, 1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(f, f // 2, 3, 1, 1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(f // 2, 32, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(32, cfg.output_dim, 1, 1, 0)
            )

    def forward(
        self,
        tokens_list: Sequence[Tensor | None],
        images: Tensor,
        patch_start_idx: int,
        frames_chunk_size: int | None = 8,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Dense outputs for every frame, processed ``frames_chunk_size`` frames at a time to bound memory."""
        S = images.shape[1]
        if frames_chunk_size is None or frames_chunk_size >= S:
            return self._forward_impl(tokens_list, images, patch_start_idx, 0, S)
        chunks = [
            self._forward_impl(tokens_list, images, patch_start_idx, s, min(s + frames_chunk_size, S))
            for s in range(0, S, frames_chunk_size)
        ]
        if self.cfg.feature_only:
            return torch.cat(chunks, dim=1)  # type: ignore[arg-type]
        return torch.cat([c[0] for c in chunks], dim=1), torch.cat([c[1] for c in chunks], dim=1)

    def _pos_embed(self, x: Tensor, W: int, H: int, ratio: float = 0.1) -> Tensor:
        ph, pw = x.shape[-2:]
        grid = create_uv_grid(pw, ph, aspect_ratio=W / H, dtype=x.dtype, device=x.device)
        emb = (position_grid_to_embed(grid, x.shape[1]) * ratio).to(x.dtype)  # fp32 math, added in x's dtype (bf16)
        return x + emb.permute(2, 0, 1)[None].expand(x.shape[0], -1, -1, -1)

    def _forward_impl(
        self, tokens_list: Sequence[Tensor | None], images: Tensor, patch_start_idx: int, s0: int, s1: int
    ) -> Tensor | tuple[Tensor, Tensor]:
        B, _, _, H, W = images.shape
        S = s1 - s0
        p = self.cfg.patch_size
        ph, pw = H // p, W // p
        feats = []
        for i, layer in enumerate(self.cfg.intermediate_layer_idx):
            t = tokens_list[layer]
            assert t is not None, f"DPT head needs aggregator layer {layer}"
            x = t[:, s0:s1, patch_start_idx:]
            x = self.norm(x.reshape(B * S, -1, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(B * S, x.shape[-1], ph, pw)
            x = self.projects[i](x)
            if self.cfg.pos_embed:
                x = self._pos_embed(x, W, H)
            feats.append(self.resize_layers[i](x))
        l1 = self.scratch.layer1_rn(feats[0])
        l2 = self.scratch.layer2_rn(feats[1])
        l3 = self.scratch.layer3_rn(feats[2])
        l4 = self.scratch.layer4_rn(feats[3])
        out = self.scratch.refinenet4(l4, size=tuple(l3.shape[2:]))
        out = self.scratch.refinenet3(out, l3, size=tuple(l2.shape[2:]))
        out = self.scratch.refinenet2(out, l2, size=tuple(l1.shape[2:]))
        out = self.scratch.refinenet1(out, l1)
        out = self.scratch.output_conv1(out)
        d = self.cfg.down_ratio
        out = _interp(out, (int(ph * p / d), int(pw * p / d)))
        if self.cfg.pos_embed:
            out = self._pos_embed(out, W, H)
        if self.cfg.feature_only:
            return out.reshape(B, S, *out.shape[1:])
        out = self.scratch.output_conv2(out)
        preds, conf = activate_head(out, self.cfg.activation, self.cfg.conf_activation)
        return preds.reshape(B, S, *preds.shape[1:]), conf.reshape(B, S, *conf.shape[1:])
