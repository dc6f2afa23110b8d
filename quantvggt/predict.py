"""A scene folder's frames through the model: scan the readable images, choose the frame limits and chunks, predict.

The primitives of the one scene path (:mod:`quantvggt.reconstruct`): they read local files and return arrays.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from quantvggt.geometry import pose_encoding_to_extri_intri
from quantvggt.images import ImageLoadError, load_and_preprocess, readable_images, reference_first
from quantvggt.options import ReconstructionOptions
from quantvggt.prediction import SceneError, ScenePrediction

log = logging.getLogger(__name__)


def scan_scene(scene: str | Path) -> tuple[list[Path], list[dict]]:
    """Every readable image (the first non-blank one first) and the skipped files with reasons."""
    scene = Path(scene)
    if not scene.is_dir():
        raise SceneError(f"{scene}: not a folder")
    good, skipped = readable_images(scene)
    if len(good) < 2:
        # which files could not be read, and why, in the error itself: it is what reaches the manifest, the flow's
        # logs and artifacts (the per-file warnings stay in the log of whichever worker read them)
        shown = "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:5])
        more = f"; {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise SceneError(
            f"{scene}: needs at least 2 usable images, found {len(good)}"
            + (f" ({len(skipped)} unreadable: {shown}{more})" if skipped else "")
        )
    try:
        paths = reference_first(good)  # VGGT's world frame is frame 0: never a blank one
    except ImageLoadError as e:
        raise SceneError(f"{scene}: {e}") from e
    return paths, skipped


class OneForwardAtATime(torch.nn.Module):
    """A model shared by threads whose forward passes run one at a time: calls in flight on one worker share its
    CPUs and memory, and overlap only their I/O.

    Everything else (``image_size``, ``aggregator``...) reads through to the wrapped model. The time the calling
    thread last waited for the other's pass is :attr:`waited_s` (predictions report it as ``wait``, not ``model``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model
        self._forward_lock = threading.Lock()
        self._local = threading.local()

    @property
    def waited_s(self) -> float:
        """Seconds this thread's last forward waited for the lock."""
        return getattr(self._local, "waited_s", 0.0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, under the lock."""
        t0 = time.perf_counter()
        with self._forward_lock:
            self._local.waited_s = time.perf_counter() - t0
            return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def predict_frames(
    model: torch.nn.Module, paths: list[Path], options: ReconstructionOptions, scene: str = ""
) -> ScenePrediction:
    """One forward pass over ``paths`` (the first is the reference frame); ``report`` holds its timings."""
    t0 = time.perf_counter()
    size = options.image_size or model.image_size
    batch = load_and_preprocess(paths, mode=options.mode, target_size=size)  # type: ignore[arg-type]
    t1 = time.perf_counter()
    device = model.aggregator.camera_token.device
    with torch.no_grad():
        preds = model(batch.images.to(device))
    t2 = time.perf_counter()
    waited = model.waited_s if isinstance(model, OneForwardAtATime) else 0.0
    H, W = batch.images.shape[-2:]
    extr, K = pose_encoding_to_extri_intri(preds["pose_enc"][0].double().cpu(), (H, W))
    np_ = lambda t: None if t is None else t[0].detach().float().cpu().numpy()
    return ScenePrediction(
        scene=scene,
        names=[p.name for p in paths],
        original_sizes=batch.original_sizes,
        transforms=batch.transforms,
        extrinsics=extr.numpy(),
        intrinsics=K.numpy(),
        depth=np_(preds["depth"])[..., 0],
        depth_conf=np_(preds["depth_conf"]),
        world_points=np_(preds.get("world_points")),
        world_points_conf=np_(preds.get("world_points_conf")),
        images=batch.images.permute(0, 2, 3, 1).numpy(),
        report={
            "model_input_hw": [int(H), int(W)],
            "timings_s": {"load": t1 - t0, "model": t2 - t1 - waited, **({"wait": waited} if waited else {})},
        },
    )


def frame_limits(model: torch.nn.Module, paths: list[Path], options: ReconstructionOptions) -> tuple[int, int, dict]:
    """(single-pass limit, chunk size, memory report): ``max_frames`` / ``chunk_size``, lowered to fit the budget."""
    limit = options.max_frames
    chunk = options.chunk_size or limit
    info: dict[str, Any] = {}
    if options.memory_budget_mb is not None:
        from quantvggt.chunking import forward_bytes, frames_for_budget
        from quantvggt.images import open_image, preprocess_image

        size = options.image_size or model.image_size
        img, _ = preprocess_image(open_image(paths[0], name=paths[0].name), options.mode, size)  # type: ignore[arg-type]
        H, W = img.shape[-2:]
        fit = frames_for_budget(model, H, W, options.memory_budget_mb * 2**20)
        limit, chunk = min(limit, fit), min(chunk, fit)
        info = {
            "budget_mb": options.memory_budget_mb,
            "frames_in_budget": fit,
            "estimated_mb": round(forward_bytes(model, min(len(paths), limit), H, W) / 2**20, 1),
        }
    return limit, max(2, chunk), info


def chunk_plan(paths: list[Path], chunk_size: int, options: ReconstructionOptions) -> Any:
    """The scene's chunks as ``options`` ask (design, overlap/anchors, order); a :class:`chunking.ChunkPlan`."""
    from quantvggt.chunking import plan_scene

    return plan_scene(
        len(paths),
        chunk_size,
        options.chunking,
        options.overlap,
        options.anchors,
        options.anchor_select,
        paths,
        options.order,
    )


def align_options(options: ReconstructionOptions) -> Any:
    """How chunks are aligned and gated, from ``options`` (a :class:`chunking.AlignOptions`)."""
    from quantvggt.chunking import AlignOptions

    return AlignOptions(points_from=options.points_from, max_residual=options.max_align_residual, seed=options.seed)
