"""Calibration: activation statistics and block-wise reconstruction over the aggregator's blocks."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantvggt.lowbit.hadamard import HadamardPlan, rotate
from quantvggt.quant.linear import FakeQuantLinear

log = logging.getLogger(__name__)


def as_batch(images: Tensor) -> Tensor:
    """Calibration item ``[S,3,H,W]`` or ``[B,S,3,H,W]`` -> ``[B,S,3,H,W]``."""
    if images.dim() == 4:
        images = images.unsqueeze(0)
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"calibration images must be [S,3,H,W] or [B,S,3,H,W], got {tuple(images.shape)}")
    return images


@torch.no_grad()
def collect_input_absmax(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    signs: dict[str, Tensor | None],
    batches: list[Tensor],
    keep_tokens: int = 0,
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-input-channel max |X R| (R = rotation when the layer has signs) over all batches.

    Also returns up to ``keep_tokens`` randomly sampled raw input rows per layer (for per-layer searches).
    """
    stats: dict[str, Tensor] = {}
    samples: dict[str, list[Tensor]] = {n: [] for n in layers}
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, keep_tokens // max(len(batches), 1)) if keep_tokens else 0
    handles = []

    def make_hook(name: str) -> Callable:
        plan = HadamardPlan.for_width(layers[name].in_features) if signs[name] is not None else None

        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if per_batch:
                idx = torch.randperm(x.shape[0], generator=gen)[:per_batch].to(x.device)
                samples[name].append(x[idx])
            if signs[name] is not None:
                x = rotate(x, signs[name].to(x.device), plan)
            m = x.abs().amax(dim=0)
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)

        return hook

    for name, lin in layers.items():
        handles.append(lin.register_forward_pre_hook(make_hook(name)))
    try:
        for images in batches:
            model(images)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in stats]
    if missing:
        raise RuntimeError(f"calibration never reached layers {missing[:5]}; is the scope right for this model?")
    return stats, {n: torch.cat(v) for n, v in samples.items() if v}


def smoothing_scales(act_absmax: Tensor, w_rot: Tensor, alpha: float) -> Tensor:
    """``s_j = max|XR|_j^alpha / max|WR|_j^(1-alpha)`` (clamped to a sane range)."""
    w_absmax = w_rot.abs().amax(dim=0).clamp(min=1e-5)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp(min=1e-4, max=1e4)


def execution_order(aggregator: nn.Module) -> Iterator[tuple[str, int]]:
    """Yield ("frame"|"global", index) in the order the aggregator runs its blocks."""
    cfg = aggregator.cfg
    counters = {"frame": 0, "global": 0}
    for _ in range(cfg.depth // cfg.aa_block_size):
        for kind in cfg.aa_order:
            for _ in range(cfg.aa_block_size):
                yield kind, counters[kind]
                counters[kind] += 1


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``root`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


_set_module = set_module  # older name, kept for callers outside the package


def _block_inputs(agg: nn.Module, batches: list[Tensor]) -> list[dict]:
    """Full-precision token states after the patch embed, per batch: ``x [B, S, P, C]`` and positions."""
    states = []
    with torch.no_grad():
        for images in batches:
            tokens, pos = agg.embed(images)
            B, S = images.shape[:2]
            P, C = tokens.shape[1:]
            states.append({"x": tokens.reshape(B, S, P, C), "pos": pos})
    return states


def block_layout(kind: str, state: dict) -> tuple[Tensor, Tensor | None]:
    """A block's real token layout: frame blocks ``(B*S, P, C)``, global blocks ``(B, S*P, C)``."""
    B, S, P, C = state["x"].shape
    if kind == "frame":
        return state["x"].reshape(B * S, P, C), state["pos"]
    pos = None if state["pos"] is None else state["pos"].reshape(B, S * P, 2)
    return state["x"].reshape(B, S * P, C), pos


def _block_mse(block: nn.Module, kind: str, states: list[dict], targets: list[Tensor]) -> float:
    with torch.no_grad():
        total = sum(F.mse_loss(block(*block_layout(kind, st)), t) for st, t in zip(states, targets))
    return float(total / len(states))


def _fit_block(
    block: nn.Module,
    kind: str,
    fakes: list[FakeQuantLinear],
    states: list[dict],
    targets: list[Tensor],
    epochs: int,
    lr_scale: float,
    lr_clip: float,
    weight_decay: float,
) -> None:
    """AdamW with a cosine schedule over the block's smoothing and clipping parameters, MSE to full precision."""
    scale_p = [p for m in fakes for p in m.scale_params()]
    clip_p = [p for m in fakes for p in m.clip_params()]
    groups = [g for g in ({"params": scale_p, "lr": lr_scale}, {"params": clip_p, "lr": lr_clip}) if g["params"]]
    if not groups or epochs <= 0:
        return
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    total = epochs * len(states)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    with torch.enable_grad():
        for _ in range(epochs):
            for st, tgt in zip(states, targets):
                x, pos = block_layout(kind, st)
                loss = F.mse_loss(block(x, pos=pos), tgt)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()


def reconstruct_aggregator(
    model: nn.Module,
    fakes: dict[str, FakeQuantLinear],
    batches: list[Tensor],
    epochs: int,
    lr_scale: float,
    lr_clip: float,
    weight_decay: float,
    on_block: Callable[[str, int, int], None] | None = None,
) -> dict[str, tuple[float, float]]:
    """Fit each aggregator block's fake-quant layers so the block output matches full precision.

    Blocks run in execution order (frame 0, global 0, frame 1, ...). Each block sees full-precision inputs in
    its real token layout: frame blocks ``(B*S, P, C)``, global blocks ``(B, S*P, C)``. Returns per-block
    (MSE before, MSE after) and leaves the fitted :class:`FakeQuantLinear` modules installed. ``on_block(prefix,
    done, total)`` is called after each block.
    """
    agg = model.aggregator
    states = _block_inputs(agg, batches)
    losses: dict[str, tuple[float, float]] = {}
    order = list(execution_order(agg))
    for done, (kind, idx) in enumerate(order, 1):
        prefix = f"aggregator.{kind}_blocks.{idx}"
        block = agg.get_submodule(f"{kind}_blocks.{idx}")
        with torch.no_grad():
            targets = [block(*block_layout(kind, st)).detach() for st in states]  # full-precision outputs
        mine = {n: m for n, m in fakes.items() if n.startswith(prefix + ".")}
        for n, m in mine.items():
            set_module(model, n, m)
        before = _block_mse(block, kind, states, targets)
        _fit_block(block, kind, list(mine.values()), states, targets, epochs, lr_scale, lr_clip, weight_decay)
        after = _block_mse(block, kind, states, targets)
        losses[prefix] = (before, after)
        log.debug("%s: block MSE %.3e -> %.3e", prefix, before, after)
        for st, t in zip(states, targets):
            st["x"] = t.reshape(st["x"].shape)  # next block sees full-precision inputs
        if on_block is not None:
            on_block(prefix, done, len(order))
    return losses
