"""The VGGT model: aggregator plus camera, depth, point and track heads."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from quantvggt.model.aggregator import Aggregator
from quantvggt.model.config import VGGTConfig
from quantvggt.model.heads import CameraHead, DPTHead
from quantvggt.model.track_head import TrackHead

TRACK_LAYERS = (4, 11, 17, 23)  # upstream's TrackHead always reads these aggregator layers


class VGGT(nn.Module):
    """Feed-forward multi-view geometry: poses, depth, point maps (and tracks) for a set of frames."""

    def __init__(self, config: VGGTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VGGTConfig()
        self.aggregator = Aggregator(config.aggregator)
        self.camera_head = CameraHead(config.camera_head) if config.camera_head else None
        self.depth_head = DPTHead(config.depth_head) if config.depth_head else None
        self.point_head = DPTHead(config.point_head) if config.point_head else None
        if config.track_head is not None and config.aggregator.depth <= max(TRACK_LAYERS):
            raise ValueError(
                f"the track head reads aggregator layers {TRACK_LAYERS}; depth {config.aggregator.depth} is too shallow"
            )
        self.track_head = TrackHead(config.track_head, TRACK_LAYERS) if config.track_head else None
        self.autocast_cuda = True
        # upstream runs the heads in fp32; "bf16" runs them under bf16 autocast (CUDA, or CPU for accuracy checks)
        self.heads_precision = "fp32"
        self.source: str | None = None  # where the weights came from (set by the loaders)
        self.quant_meta: dict[str, Any] | None = None  # set by quantize_ / load_quantized

    def compile_(self, backend: str = "inductor", dynamic: bool | None = None) -> VGGT:
        """``torch.compile`` this model in place, by region: the aggregator, the camera head, and each DPT head's
        per-chunk body (zero graph breaks; quantized layers run as custom ops).

        Regions rather than the whole forward because the DPT heads walk the frames in chunks of 8 in Python: a
        whole-model graph specialises on that loop, so every new frame count recompiled (and after 8 of them Dynamo
        silently fell back to eager). Per region, a second frame count (or chunk position) marks that axis dynamic
        and later scenes reuse the graph.
        """
        # RoPE tables are built on first use; inside a compiled region that insertion fails a guard and recompiles
        # the whole aggregator on the second call, so build them for this model's dtype and device first
        ref = self.aggregator.camera_token
        for m in self.modules():
            rope = getattr(m, "rope", None)
            if rope is not None and hasattr(rope, "prefill") and hasattr(m, "head_dim"):
                rope.prefill(m.head_dim // 2, ref.device, ref.dtype)
        for part in (self.aggregator, self.camera_head):
            if part is not None:
                part.compile(backend=backend, dynamic=dynamic)
        for head in (self.depth_head, self.point_head):
            if head is not None:
                head._forward_impl = torch.compile(head._forward_impl, backend=backend, dynamic=dynamic)
        return self

    @property
    def image_size(self) -> int:
        """Preprocessing target width the model expects (``config.image_size``)."""
        return self.config.image_size

    def needed_layers(self, with_track: bool) -> set[int]:
        """Aggregator layers that the enabled heads read (so the others need not be kept)."""
        depth = self.config.aggregator.depth
        need: set[int] = set()
        if self.camera_head is not None:
            need.add(depth - 1)
        for head in (self.depth_head, self.point_head):
            if head is not None:
                need.update(i % depth for i in head.cfg.intermediate_layer_idx)
        if with_track and self.track_head is not None:
            need.update(TRACK_LAYERS)
        return need

    def forward(self, images: Tensor, query_points: Tensor | None = None) -> dict[str, Tensor]:
        """Images ``[S,3,H,W]`` or ``[B,S,3,H,W]`` in [0, 1] -> upstream prediction dict."""
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5:
            raise ValueError(f"images must be [S,3,H,W] or [B,S,3,H,W], got shape {tuple(images.shape)}")
        if query_points is not None and query_points.dim() == 2:
            query_points = query_points.unsqueeze(0)
        on_cuda = images.is_cuda and self.autocast_cuda
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        with amp:
            tokens, psi = self.aggregator(images, keep_layers=self.needed_layers(query_points is not None))
        if on_cuda:
            tokens = [None if t is None else t.float() for t in tokens]
        preds: dict[str, Tensor] = {}
        if self.heads_precision == "bf16":
            heads_ctx: contextlib.AbstractContextManager = torch.autocast(images.device.type, dtype=torch.bfloat16)
        elif self.heads_precision == "fp32":
            heads_ctx = torch.autocast("cuda", enabled=False) if on_cuda else contextlib.nullcontext()
        else:
            raise ValueError(f"heads_precision must be 'fp32' or 'bf16', got {self.heads_precision!r}")
        with heads_ctx:
            if self.camera_head is not None:
                preds["pose_enc"] = self.camera_head(tokens)[-1]
            if self.depth_head is not None:
                preds["depth"], preds["depth_conf"] = self.depth_head(tokens, images, psi)
            if self.point_head is not None:
                preds["world_points"], preds["world_points_conf"] = self.point_head(tokens, images, psi)
            if self.track_head is not None and query_points is not None:
                tracks, vis, conf = self.track_head(tokens, images, psi, query_points)
                preds["track"], preds["vis"] = tracks[-1], vis
                if conf is not None:
                    preds["conf"] = conf
        preds = {k: v.float() if v.is_floating_point() else v for k, v in preds.items()}
        preds["images"] = images
        return preds
