"""Transformer building blocks shared by the aggregator, the DINOv2 patch embed and the heads.

Module and parameter names mirror upstream VGGT so the official checkpoint loads strictly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantvggt.lowbit.attention import check_attention_kind, int8_attention_ref
from quantvggt.lowbit.registry import get_kernel


class Mlp(nn.Module):
    """Two-layer perceptron: fc1 -> GELU -> fc2."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to the last dimension."""
        return self.fc2(self.act(self.fc1(x)))


def on_meta() -> bool:
    """Whether modules are being built on the meta device (the checkpoint loaders do, then assign weights)."""
    return torch.get_default_device().type == "meta"


def randn_param(*shape: int) -> nn.Parameter:
    """``nn.Parameter(torch.randn(*shape))``, but undrawn on the meta device.

    There, random ops run as Python refs that import torch._dynamo and sympy (~150 MB in every process that loads a
    checkpoint); on a real device the random stream is upstream's.
    """
    return nn.Parameter(torch.empty(*shape) if on_meta() else torch.randn(*shape))


class LayerScale(nn.Module):
    """Per-channel residual scale (``gamma``)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))  # no scalar op: on meta it imports dynamo

    def forward(self, x: Tensor) -> Tensor:
        """Scale the channels of ``x``."""
        return x * self.gamma


class PositionGetter:
    """Caches (y, x) patch-grid coordinates per grid size."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def __call__(self, batch_size: int, height: int, width: int, device: torch.device) -> Tensor:
        """Return ``[batch_size, height*width, 2]`` integer (y, x) positions."""
        key = (height, width, torch.device(device))
        if torch.compiler.is_compiling():  # traced into the graph: a cache insertion would fail a guard next call
            grid = torch.cartesian_prod(torch.arange(height, device=device), torch.arange(width, device=device))
            return grid.view(1, height * width, 2).expand(batch_size, -1, -1).clone()
        if key not in self._cache:
            ys = torch.arange(height, device=device)
            xs = torch.arange(width, device=device)
            self._cache[key] = torch.cartesian_prod(ys, xs)
        return self._cache[key].view(1, height * width, 2).expand(batch_size, -1, -1).clone()


class RotaryPositionEmbedding2D(nn.Module):
    """2D RoPE: the first half of each head's features rotates with y, the second half with x.

    The cos/sin tables have a fixed length (``MAX_POSITIONS``, grids up to 57k px) instead of ``max(positions)``:
    reading the maximum would be a host sync and a ``torch.compile`` graph break in every block. Rows depend only
    on their own position, so the values are the same as a table cut at the maximum.
    """

    MAX_POSITIONS = 4096

    def __init__(self, frequency: float = 100.0, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.base_frequency = frequency
        self.scaling_factor = scaling_factor
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _components(self, dim: int, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (dim, seq_len, device, dtype)
        if key not in self._cache:
            exponents = torch.arange(0, dim, 2, device=device).float() / dim
            inv_freq = 1.0 / (self.base_frequency**exponents)
            positions = torch.arange(seq_len, device=device, dtype=inv_freq.dtype)
            # angles stay fp32 (a bf16 angle of 17 rad is off by up to 0.03): only cos/sin take ``dtype``
            angles = torch.einsum("i,j->ij", positions, inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            self._cache[key] = (angles.cos().to(dtype), angles.sin().to(dtype))
        return self._cache[key]

    def prefill(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        """Build the cos/sin table for ``(dim, device, dtype)`` now (a compiled graph then never sees it missing)."""
        self._components(dim, self.MAX_POSITIONS, device, dtype)

    @staticmethod
    def _rotate_half(x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def _rope_1d(self, x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cos = F.embedding(pos, cos)[:, None]  # [B, 1, N, D]
        sin = F.embedding(pos, sin)[:, None]
        return x * cos + self._rotate_half(x) * sin

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``tokens [B, heads, N, D]`` by ``positions [B, N, 2]`` (y, x)."""
        dim = tokens.size(-1) // 2
        cos, sin = self._components(dim, self.MAX_POSITIONS, tokens.device, tokens.dtype)
        y_feat, x_feat = tokens.chunk(2, dim=-1)
        y_feat = self._rope_1d(y_feat, positions[..., 0], cos, sin)
        x_feat = self._rope_1d(x_feat, positions[..., 1], cos, sin)
        return torch.cat((y_feat, x_feat), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention with optional QK LayerNorm and 2D RoPE.

    ``attention`` is ``"sdpa"`` (exact) or ``"int8"``: INT8 Q·K^T after QK-norm and RoPE, through the registry's
    ``attention_int8`` kernel for the device (the torch reference where none is registered).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope
        self.attention = check_attention_kind(attention)  # a plain attribute: not in the state dict

    @staticmethod
    def _int8_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """INT8 attention forward; where gradients are needed (calibration) they are exact attention's (STE)."""
        kernel = get_kernel("attention_int8", q.device.type)
        with torch.no_grad():  # the kernels are forward-only (rounding has no useful gradient)
            out = kernel(q, k, v) if kernel is not None else None
            if out is None:  # no kernel for this device or shape: the reference has the same numerics
                out = int8_attention_ref(q, k, v)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            exact = F.scaled_dot_product_attention(q, k, v)
            out = exact + (out.to(exact.dtype) - exact).detach()
        return out

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        """Attend over the token axis of ``x [B, N, C]``."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q = self.rope(q, pos)
            k = self.rope(k, pos)
        if self.attention == "int8":
            x = self._int8_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = None,
        qk_norm: bool = False,
        rope: RotaryPositionEmbedding2D | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        """Apply attention and MLP residual branches."""
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping conv patchifier: ``[B, 3, H, W] -> [B, H/p * W/p, C]``."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """Patchify and flatten to tokens."""
        _, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)
