"""Alternating frame/global attention over the tokens of all frames (upstream ``Aggregator``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from quantvggt.lowbit.attention import check_attention_kind
from quantvggt.model.config import AggregatorConfig
from quantvggt.model.dinov2 import build_vit
from quantvggt.model.layers import Block, PatchEmbed, PositionGetter, RotaryPositionEmbedding2D, on_meta, randn_param

_RESNET_MEAN = (0.485, 0.456, 0.406)
_RESNET_STD = (0.229, 0.224, 0.225)


def slice_expand_and_flatten(token: Tensor, B: int, S: int) -> Tensor:
    """``[1, 2, X, C]`` -> ``[B*S, X, C]``: slot 0 for the first frame, slot 1 for the others."""
    first = token[:, 0:1].expand(B, 1, *token.shape[2:])
    others = token[:, 1:2].expand(B, S - 1, *token.shape[2:])
    return torch.cat([first, others], dim=1).reshape(B * S, *token.shape[2:])


class Aggregator(nn.Module):
    """Patch-embeds every frame, then alternates per-frame and cross-frame attention blocks."""

    def __init__(self, cfg: AggregatorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if "conv" in cfg.patch_embed:
            self.patch_embed: nn.Module = PatchEmbed(cfg.img_size, cfg.patch_size, 3, cfg.embed_dim)
        else:
            self.patch_embed = build_vit(cfg.patch_embed, cfg.img_size, cfg.patch_size, cfg.num_register_tokens)
        self.rope = RotaryPositionEmbedding2D(frequency=cfg.rope_freq) if cfg.rope_freq > 0 else None
        self.position_getter = PositionGetter() if self.rope is not None else None

        def make_block() -> Block:
            block = Block(
                cfg.embed_dim,
                cfg.num_heads,
                cfg.mlp_ratio,
                cfg.qkv_bias,
                cfg.proj_bias,
                cfg.ffn_bias,
                init_values=cfg.init_values,
                qk_norm=cfg.qk_norm,
                rope=self.rope,
            )
            block.attn.attention = cfg.attention  # frame/global blocks only (not the patch embed's or the heads')
            return block

        self.frame_blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        self.global_blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        self.camera_token = randn_param(1, 2, 1, cfg.embed_dim)
        self.register_token = randn_param(1, 2, cfg.num_register_tokens, cfg.embed_dim)
        if not on_meta():  # nothing to draw on meta (see randn_param)
            nn.init.normal_(self.camera_token, std=1e-6)
            nn.init.normal_(self.register_token, std=1e-6)
        self.patch_start_idx = 1 + cfg.num_register_tokens
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | None = None) -> None:
        """(Re)create the non-persistent normalisation buffers (needed after building on the meta device)."""
        if device is None:
            device = self.camera_token.device
            device = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer(
            "_resnet_mean", torch.tensor(_RESNET_MEAN, device=device).view(1, 1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "_resnet_std", torch.tensor(_RESNET_STD, device=device).view(1, 1, 3, 1, 1), persistent=False
        )

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[B, S, 3, H, W]`` -> tokens ``[B*S, P, C]`` and RoPE positions ``[B*S, P, 2]``."""
        B, S, C_in, H, W = images.shape
        if C_in != 3:
            raise ValueError(f"expected 3 input channels, got {C_in}")
        x = ((images.float() - self._resnet_mean.float()) / self._resnet_std.float()).reshape(B * S, C_in, H, W)
        x = x.to(self.camera_token.dtype)  # normalised in fp32, then the model's float dtype (a bf16 model: bf16)
        patch_tokens = self.patch_embed(x)
        camera = slice_expand_and_flatten(self.camera_token, B, S).to(patch_tokens.dtype)
        register = slice_expand_and_flatten(self.register_token, B, S).to(patch_tokens.dtype)
        tokens = torch.cat([camera, register, patch_tokens], dim=1)
        pos = None
        if self.position_getter is not None:
            pos = self.position_getter(B * S, H // self.cfg.patch_size, W // self.cfg.patch_size, images.device)
            # special tokens sit at position 0; patches start at 1
            pos = pos + 1
            special = torch.zeros(B * S, self.patch_start_idx, 2, device=images.device, dtype=pos.dtype)
            pos = torch.cat([special, pos], dim=1)
        return tokens, pos

    def forward(self, images: Tensor, keep_layers: Iterable[int] | None = None) -> tuple[list[Tensor | None], int]:
        """Return one ``[B, S, P, 2C]`` tensor (frame ‖ global output) per layer, and where patches start.

        ``keep_layers`` (indices, negatives allowed) limits which layers are kept; others are ``None``.
        """
        B, S = images.shape[:2]
        tokens, pos = self.embed(images)
        _, P, C = tokens.shape
        depth = self.cfg.depth
        keep = set(range(depth)) if keep_layers is None else {i % depth for i in keep_layers}
        pos_frame = pos
        pos_global = None if pos is None else pos.reshape(B, S * P, 2)
        outputs: list[Tensor | None] = []
        frame_idx = global_idx = 0
        for _ in range(depth // self.cfg.aa_block_size):
            frame_out: list[Tensor] = []
            global_out: list[Tensor] = []
            for attn_type in self.cfg.aa_order:
                for _ in range(self.cfg.aa_block_size):
                    if attn_type == "frame":
                        tokens = self.frame_blocks[frame_idx](tokens.reshape(B * S, P, C), pos=pos_frame)
                        frame_idx += 1
                        frame_out.append(tokens.reshape(B, S, P, C))
                    else:
                        tokens = self.global_blocks[global_idx](tokens.reshape(B, S * P, C), pos=pos_global)
                        global_idx += 1
                        global_out.append(tokens.reshape(B, S, P, C))
            for f, g in zip(frame_out, global_out):
                layer = len(outputs)
                outputs.append(torch.cat([f, g], dim=-1) if layer in keep else None)
        return outputs, self.patch_start_idx


def set_attention(model: nn.Module, kind: str | None) -> nn.Module:
    """Switch the frame/global attention of every aggregator in ``model`` to ``kind`` ("sdpa" | "int8"); returns it.

    The aggregator config is updated too, so ``model.config.to_dict()`` (and a quantized checkpoint saved afterwards)
    records the choice. ``None`` leaves the model as it is.
    """
    if kind is None:
        return model
    check_attention_kind(kind)
    found = False
    for module in model.modules():
        if isinstance(module, Aggregator):
            found = True
            module.cfg.attention = kind
            for block in (*module.frame_blocks, *module.global_blocks):
                block.attn.attention = kind
    if not found:
        raise ValueError(f"{type(model).__name__} has no aggregator whose attention could be set")
    return model
