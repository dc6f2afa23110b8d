"""DINOv2 ViT with register tokens, used by VGGT as its patch embedding (``aggregator.patch_embed``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantvggt.model.layers import Block, PatchEmbed, on_meta

# name -> (embed_dim, depth, num_heads)
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "dinov2_vits14_reg": (384, 12, 6),
    "dinov2_vitb14_reg": (768, 12, 12),
    "dinov2_vitl14_reg": (1024, 24, 16),
    # not a DINOv2 release: a 2-block ViT for small models trained from scratch. Unlike the conv patch embed it gives
    # every token an absolute position in its value vectors, which cross-frame matching needs to recover poses
    "vit_tiny14_reg": (128, 2, 4),
}


class DinoVisionTransformer(nn.Module):
    """DINOv2 encoder; ``forward`` returns the final-norm patch tokens ``[B, P, C]``."""

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        init_values: float = 1.0,
        interpolate_antialias: bool = True,
        interpolate_offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, init_values=init_values, norm_eps=1e-6) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        if not on_meta():  # nothing to draw when a checkpoint fills it (see layers.randn_param)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            if self.register_tokens is not None:
                nn.init.normal_(self.register_tokens, std=1e-6)

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Resample the square position table (bicubic, antialiased) to an ``h x w`` pixel input."""
        n_tok = x.shape[1] - 1
        n_tab = self.pos_embed.shape[1] - 1
        if n_tok == n_tab and h == w:
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, 0], pos[:, 1:]
        dim = x.shape[-1]
        h0, w0 = h // self.patch_size, w // self.patch_size
        side = int(math.sqrt(n_tab))
        if side * side != n_tab:
            raise ValueError(f"position table of {n_tab} entries is not square")
        kwargs: dict = {}
        if self.interpolate_offset:
            kwargs["scale_factor"] = (
                float(h0 + self.interpolate_offset) / side,
                float(w0 + self.interpolate_offset) / side,
            )
        else:
            kwargs["size"] = (h0, w0)
        patch_pos = F.interpolate(
            patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos.unsqueeze(0), patch_pos), dim=1).to(x.dtype)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """Patchify, add cls + position embedding, insert register tokens after cls."""
        _, _, h, w = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` (normalised) -> patch tokens ``[B, H/p * W/p, C]``."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, self.num_register_tokens + 1 :]


def build_vit(name: str, img_size: int, patch_size: int, num_register_tokens: int) -> DinoVisionTransformer:
    """Build the named DINOv2 variant with VGGT's settings (layer scale 1.0, antialiased pos-embed)."""
    if name not in VIT_SIZES:
        raise ValueError(f"unknown patch_embed {name!r}; expected 'conv' or one of {sorted(VIT_SIZES)}")
    embed_dim, depth, heads = VIT_SIZES[name]
    return DinoVisionTransformer(img_size, patch_size, embed_dim, depth, heads, 4.0, num_register_tokens)
