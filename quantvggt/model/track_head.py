"""Point-tracking head (upstream ``TrackHead``): DPT features + an iterative correlation tracker."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantvggt.model.config import DPTHeadConfig, TrackHeadConfig
from quantvggt.model.heads import DPTHead
from quantvggt.model.layers import Mlp, randn_param


def bilinear_sampler(inp: Tensor, coords: Tensor, padding_mode: str = "border") -> Tensor:
    """Sample ``inp [B, C, H, W]`` at pixel ``coords [B, ..., 2]`` (x, y), align_corners=True."""
    H, W = inp.shape[2:]
    coords = coords.detach().to(inp.dtype).clone()
    scale = torch.tensor([2 / max(W - 1, 1), 2 / max(H - 1, 1)], device=coords.device, dtype=coords.dtype)
    coords = coords * scale - 1
    return F.grid_sample(inp, coords, align_corners=True, padding_mode=padding_mode)


def sample_features4d(inp: Tensor, coords: Tensor) -> Tensor:
    """``inp [B, C, H, W]``, ``coords [B, N, 2]`` -> ``[B, N, C]``."""
    B = inp.shape[0]
    feats = bilinear_sampler(inp, coords.unsqueeze(2))  # [B, C, N, 1]
    return feats.permute(0, 2, 1, 3).reshape(B, -1, feats.shape[1] * feats.shape[3])


def get_2d_embedding(xy: Tensor, C: int) -> Tensor:
    """Sin/cos embedding of 2D offsets ``[B, N, 2]`` -> ``[B, N, 2C]`` (interleaved sin, cos)."""
    B, N, _ = xy.shape
    div = (torch.arange(0, C, 2, device=xy.device, dtype=torch.float32) * (1000.0 / C)).reshape(1, 1, C // 2)
    out = []
    for d in range(2):
        pe = torch.zeros(B, N, C, device=xy.device, dtype=torch.float32)
        pe[:, :, 0::2] = torch.sin(xy[:, :, d : d + 1] * div)
        pe[:, :, 1::2] = torch.cos(xy[:, :, d : d + 1] * div)
        out.append(pe)
    return torch.cat(out, dim=2)


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64)
    omega = 1.0 / 10000 ** (omega / (dim / 2.0))
    out = torch.einsum("m,d->md", pos.reshape(-1).double(), omega)
    return torch.cat([out.sin(), out.cos()], dim=1)[None].float()


def get_2d_sincos_pos_embed(dim: int, grid_hw: tuple[int, int]) -> Tensor:
    """Fixed 2D sin/cos table ``[1, dim, H, W]`` (first half encodes x, second half y)."""
    h, w = grid_hw
    gx, gy = torch.meshgrid(torch.arange(w, dtype=torch.float), torch.arange(h, dtype=torch.float), indexing="xy")
    emb = torch.cat([_sincos_1d(dim // 2, gx), _sincos_1d(dim // 2, gy)], dim=2)
    return emb.reshape(1, h, w, -1).permute(0, 3, 1, 2)


class AttnBlock(nn.Module):
    """Self-attention block of the update transformer (note: the residual is the *normalised* input)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """Attend over axis 1 of ``x [B, N, C]``."""
        x = self.norm1(x)
        x = x + self.attn(x, x, x, need_weights=True)[0]
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention block: ``x`` queries ``context``."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.norm_context = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.cross_attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Attend from ``x [B, N, C]`` to ``context [B, M, C]``."""
        x = self.norm1(x)
        ctx = self.norm_context(context)
        x = x + self.cross_attn(x, ctx, ctx, need_weights=True)[0]
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Time attention per track, space attention through a set of virtual tracks."""

    def __init__(
        self,
        space_depth: int = 6,
        time_depth: int = 6,
        input_dim: int = 388,
        hidden_size: int = 384,
        num_heads: int = 8,
        output_dim: int = 130,
        mlp_ratio: float = 4.0,
        num_virtual_tracks: int = 64,
    ) -> None:
        super().__init__()
        self.num_virtual_tracks = num_virtual_tracks
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        self.virual_tracks = randn_param(1, num_virtual_tracks, 1, hidden_size)  # upstream spelling
        self.time_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(time_depth)])
        self.space_virtual_blocks = nn.ModuleList(
            [AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)]
        )
        self.space_point2virtual_blocks = nn.ModuleList(
            [CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)]
        )
        self.space_virtual2point_blocks = nn.ModuleList(
            [CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(space_depth)]
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, N, T, D_in]`` -> updates ``[B, N, T, D_out]``."""
        tokens = self.input_transform(self.input_norm(x))
        init_tokens = tokens
        B, _, T, _ = tokens.shape
        tokens = torch.cat([tokens, self.virual_tracks.repeat(B, 1, T, 1)], dim=1)
        N = tokens.shape[1]
        nv = self.num_virtual_tracks
        every = len(self.time_blocks) // len(self.space_virtual_blocks)
        j = 0
        for i, blk in enumerate(self.time_blocks):
            tokens = blk(tokens.contiguous().view(B * N, T, -1)).view(B, N, T, -1)
            if i % every == 0:
                space = tokens.permute(0, 2, 1, 3).contiguous().view(B * T, N, -1)
                point, virtual = space[:, : N - nv], space[:, N - nv :]
                virtual = self.space_virtual2point_blocks[j](virtual, point)
                virtual = self.space_virtual_blocks[j](virtual)
                point = self.space_point2virtual_blocks[j](point, virtual)
                tokens = torch.cat([point, virtual], dim=1).view(B, T, N, -1).permute(0, 2, 1, 3)
                j += 1
        tokens = tokens[:, : N - nv] + init_tokens
        return self.flow_head(self.output_norm(tokens))


class CorrBlock:
    """Multi-scale correlation volume between track features and feature maps."""

    def __init__(self, fmaps: Tensor, num_levels: int, radius: int) -> None:
        self.radius = radius
        self.pyramid = [fmaps]
        cur = fmaps
        for _ in range(num_levels - 1):
            B, S, C, H, W = cur.shape
            cur = F.avg_pool2d(cur.reshape(B * S, C, H, W), kernel_size=2, stride=2)
            cur = cur.reshape(B, S, C, *cur.shape[-2:])
            self.pyramid.append(cur)
        d = torch.linspace(-radius, radius, 2 * radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        self.delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1)

    def corr_sample(self, targets: Tensor, coords: Tensor) -> Tensor:
        """``targets [B, S, N, C]``, ``coords [B, S, N, 2]`` -> ``[B, S, N, levels*(2r+1)^2]``."""
        B, S, N, _ = targets.shape
        r = self.radius
        out = []
        for i, fmaps in enumerate(self.pyramid):
            _, _, C, H, W = fmaps.shape
            corrs = torch.matmul(targets, fmaps.view(B, S, C, H * W)) / math.sqrt(C)
            centroid = coords.reshape(B * S * N, 1, 1, 2) / 2**i
            pts = centroid + self.delta.to(coords).view(1, 2 * r + 1, 2 * r + 1, 2)
            sampled = bilinear_sampler(corrs.reshape(B * S * N, 1, H, W), pts, padding_mode="zeros")
            out.append(sampled.view(B, S, N, -1))
        return torch.cat(out, dim=-1).contiguous()


class BaseTrackerPredictor(nn.Module):
    """Iteratively refines query-point tracks across frames from correlation and feature updates."""

    def __init__(
        self,
        stride: int = 1,
        corr_levels: int = 5,
        corr_radius: int = 4,
        latent_dim: int = 128,
        hidden_size: int = 384,
        depth: int = 6,
        max_scale: int = 518,
        predict_conf: bool = True,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.latent_dim = latent_dim
        self.corr_levels = corr_levels
        self.corr_radius = corr_radius
        self.max_scale = max_scale
        self.predict_conf = predict_conf
        self.flows_emb_dim = latent_dim // 2
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        self.transformer_dim = 3 * latent_dim + 4
        self.query_ref_token = randn_param(1, 2, self.transformer_dim)
        self.updateformer = EfficientUpdateFormer(
            depth, depth, self.transformer_dim, hidden_size, output_dim=latent_dim + 2
        )
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        if predict_conf:
            self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))

    def forward(
        self, query_points: Tensor, fmaps: Tensor, iters: int = 4
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """``query_points [B, N, 2]`` in frame 0 pixels, ``fmaps [B, S, C, h, w]`` -> tracks, visibility, confidence."""
        B, N, _ = query_points.shape
        _, S, _, HH, WW = fmaps.shape
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        coords = (query_points / float(self.stride)).reshape(B, 1, N, 2).repeat(1, S, 1, 1)
        query_feat = sample_features4d(fmaps[:, 0], coords[:, 0])  # [B, N, C]
        track_feats = query_feat.unsqueeze(1).repeat(1, S, 1, 1)  # [B, S, N, C]
        coords_first = coords[:, 0].clone()
        corr = CorrBlock(fmaps, self.corr_levels, self.corr_radius)
        pos_embed = get_2d_sincos_pos_embed(self.transformer_dim, (HH, WW)).to(query_points.device)
        sampled_pos = sample_features4d(pos_embed.expand(B, -1, -1, -1), coords[:, 0]).reshape(B * N, -1).unsqueeze(1)
        ref = torch.cat([self.query_ref_token[:, 0:1], self.query_ref_token[:, 1:2].expand(-1, S - 1, -1)], dim=1)
        preds = []
        for _ in range(iters):
            coords = coords.detach()
            fcorr = corr.corr_sample(track_feats, coords)
            fcorr = self.corr_mlp(fcorr.permute(0, 2, 1, 3).reshape(B * N, S, -1))
            flows = (coords - coords[:, 0:1]).permute(0, 2, 1, 3).reshape(B * N, S, 2)
            flows_emb = torch.cat(
                [get_2d_embedding(flows, self.flows_emb_dim), flows / self.max_scale, flows / self.max_scale], dim=-1
            )
            feats_ = track_feats.permute(0, 2, 1, 3).reshape(B * N, S, self.latent_dim)
            x = torch.cat([flows_emb, fcorr, feats_], dim=2) + sampled_pos + ref.to(flows_emb.dtype)
            delta = self.updateformer(x.reshape(B, N, S, -1)).reshape(B * N, S, -1)
            d_coords, d_feats = delta[:, :, :2], delta[:, :, 2:]
            feats_ = feats_.reshape(B * N * S, self.latent_dim)
            feats_ = self.ffeat_updater(self.ffeat_norm(d_feats.reshape(B * N * S, self.latent_dim))) + feats_
            track_feats = feats_.reshape(B, N, S, self.latent_dim).permute(0, 2, 1, 3)
            coords = coords + d_coords.reshape(B, N, S, 2).permute(0, 2, 1, 3)
            coords[:, 0] = coords_first
            preds.append(coords * self.stride)
        flat = track_feats.reshape(B * S * N, self.latent_dim)
        vis = torch.sigmoid(self.vis_predictor(flat).reshape(B, S, N))
        conf = torch.sigmoid(self.conf_predictor(flat).reshape(B, S, N)) if self.predict_conf else None
        return preds, vis, conf


class TrackHead(nn.Module):
    """Tracks query points of the first frame through all frames."""

    def __init__(self, cfg: TrackHeadConfig, intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23)) -> None:
        super().__init__()
        self.cfg = cfg
        dpt_cfg = DPTHeadConfig(
            dim_in=cfg.dim_in,
            patch_size=cfg.patch_size,
            features=cfg.features,
            feature_only=True,
            down_ratio=2,
            pos_embed=cfg.pos_embed,  # adds a fixed sin/cos table, no parameters: old checkpoints load either way
            intermediate_layer_idx=list(intermediate_layer_idx),
        )
        self.feature_extractor = DPTHead(dpt_cfg)
        self.tracker = BaseTrackerPredictor(
            cfg.stride, cfg.corr_levels, cfg.corr_radius, cfg.features, cfg.hidden_size, predict_conf=cfg.predict_conf
        )

    def forward(
        self,
        tokens_list: Sequence[Tensor | None],
        images: Tensor,
        patch_start_idx: int,
        query_points: Tensor,
        iters: int | None = None,
    ) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """Track ``query_points [B, N, 2]`` (pixels of frame 0) through every frame."""
        fmaps = self.feature_extractor(tokens_list, images, patch_start_idx)
        return self.tracker(query_points, fmaps, iters or self.cfg.iters)
