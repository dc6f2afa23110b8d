"""Chunked inference for large scenes: plan overlapping chunks, align their predictions by Sim(3), merge them.

A scene with more frames than one forward pass should see is split into chunks that share frames. Each chunk is
predicted on its own (its world is its first frame's camera, at its own scale), then brought into one world by a
similarity transform estimated from what the shared frames predict in both chunks: their confidence-weighted 3D
points (the same pixels of the same image, so correspondences are exact) fitted by Umeyama inside IRLS, with a
pose-based estimate as the starting point and as the fallback when too few points qualify.

Two designs:

- ``sequential``: windows in frame order, each overlapping the previous one; chunk k aligns to chunk k-1 (already in
  the world of chunk 0). Suits ordered captures; errors accumulate along the chain.
- ``anchors``: a few frames chosen for coverage sit in every chunk (the first one as every chunk's reference frame);
  every chunk aligns to chunk 0 through them, so there is no chain. Suits unordered collections.

Conventions as :mod:`quantvggt.geometry`: extrinsics are camera-from-world ``[S, 3, 4]``. A :class:`Sim3` maps a
chunk's world to the scene's world, ``x' = s R x + t``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # merged predictions are built with dataclasses.replace; the type is for annotations only
    from quantvggt.prediction import ScenePrediction

log = logging.getLogger(__name__)

DESIGNS = ("sequential", "anchors")


class AlignmentError(ValueError):
    """A chunk's predictions cannot be brought into the scene's world (too little shared, degenerate fit)."""


# -- planning ---------------------------------------------------------------------------------------------------------
@dataclass
class ChunkPlan:
    """Which frames each chunk predicts and how chunks are tied together (indices into the scene's image list)."""

    design: str
    n_frames: int
    chunks: list[list[int]]  # chunk k's frames in model order; chunks[k][0] is that chunk's reference frame
    targets: list[int | None]  # the chunk that chunk k aligns to (None for the reference chunk 0)
    shared: list[list[int]]  # frames chunk k shares with its target (empty for chunk 0)
    anchors: list[int] = field(default_factory=list)  # design "anchors": frames in every chunk
    order: str = "name"  # the frame order chunks follow: "name" or "similarity"
    order_affinity: float | None = None  # successor_affinity of the name order (when features were computed)

    def __post_init__(self) -> None:
        seen = {i for c in self.chunks for i in c}
        if seen != set(range(self.n_frames)):
            raise ValueError(f"chunk plan covers {len(seen)} of {self.n_frames} frames")
        for k, (t, sh) in enumerate(zip(self.targets, self.shared)):
            both = set(self.chunks[t]) & set(self.chunks[k]) if t is not None and 0 <= t < k else set()
            if k and (not sh or not set(sh) <= both):
                raise ValueError(f"chunk {k}: must align to an earlier chunk through frames both contain")

    def to_report(self, names: Sequence[str]) -> dict[str, Any]:
        """The plan with frame names, for report.json."""
        return {
            "design": self.design,
            "order": self.order,
            "order_affinity": None if self.order_affinity is None else round(self.order_affinity, 3),
            "chunks": len(self.chunks),
            "anchors": [names[i] for i in self.anchors],
            "frames_per_chunk": [len(c) for c in self.chunks],
        }


def plan_sequential(n: int, chunk_size: int, overlap: int) -> ChunkPlan:
    """Windows of ``chunk_size`` frames in order, each sharing at least ``overlap`` frames with the one before.

    The last window is moved back to end at the last frame (a larger overlap) rather than left short.
    """
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be >= 2, got {chunk_size}")
    if not 1 <= overlap < chunk_size:
        raise ValueError(f"overlap must be in [1, chunk_size), got {overlap} with chunk_size {chunk_size}")
    if n <= chunk_size:
        return ChunkPlan("sequential", n, [list(range(n))], [None], [[]])
    step = chunk_size - overlap
    starts = [*range(0, n - chunk_size, step), n - chunk_size]
    chunks = [list(range(s, s + chunk_size)) for s in starts]
    targets: list[int | None] = [None, *range(len(chunks) - 1)]
    shared = [[]] + [sorted(set(chunks[k]) & set(chunks[k - 1])) for k in range(1, len(chunks))]
    return ChunkPlan("sequential", n, chunks, targets, shared)


def plan_anchors(n: int, chunk_size: int, anchors: Sequence[int]) -> ChunkPlan:
    """Every chunk holds ``anchors`` (the first one as its reference frame) plus a share of the other frames.

    The other frames are split in their given order into as few groups as fit, of near-equal size, so no chunk is
    left nearly empty.
    """
    anchors = list(dict.fromkeys(int(a) for a in anchors))
    if not anchors or any(not 0 <= a < n for a in anchors):
        raise ValueError(f"anchors must be 1 or more frame indices in [0, {n}), got {anchors}")
    if len(anchors) >= chunk_size:
        raise ValueError(f"{len(anchors)} anchors leave no room in chunks of {chunk_size} frames")
    rest = [i for i in range(n) if i not in set(anchors)]
    per = chunk_size - len(anchors)
    groups = [g.tolist() for g in np.array_split(np.array(rest, int), max(1, -(-len(rest) // per)))] if rest else [[]]
    chunks = [anchors + g for g in groups]
    targets: list[int | None] = [None] + [0] * (len(chunks) - 1)
    shared = [[]] + [list(anchors) for _ in chunks[1:]]
    return ChunkPlan("anchors", n, chunks, targets, shared, anchors)


def image_features(paths: Sequence[str | Path], size: tuple[int, int] = (16, 12)) -> np.ndarray:
    """Cheap per-image features ``[N, D]``: a tiny grey thumbnail (zero-mean, unit-norm) plus the mean colour."""
    from quantvggt.images import open_image

    out = []
    for p in paths:
        small = np.asarray(open_image(p, name=Path(p).name).resize(size), np.float64) / 255.0
        grey = small.mean(-1).ravel()
        grey = grey - grey.mean()
        grey = grey / max(float(np.linalg.norm(grey)), 1e-9)
        out.append(np.concatenate([grey, small.reshape(-1, 3).mean(0)]))
    return np.stack(out)


def choose_anchors(n: int, k: int, features: np.ndarray | None = None, first: int = 0) -> list[int]:
    """``k`` anchor frames for coverage: farthest-point sampling in feature space from ``first``, else evenly spaced.

    Farthest-point sampling picks each next anchor as the frame least like those already chosen, so the anchors
    spread over the views present rather than clustering where many frames look alike.
    """
    k = max(1, min(k, n))
    if features is None:
        return list(dict.fromkeys((first + int(v)) % n for v in np.linspace(0, n, k, endpoint=False)))
    feats = np.asarray(features, np.float64)
    if len(feats) != n:
        raise ValueError(f"features for {len(feats)} frames, expected {n}")
    chosen = [first]
    dist = np.linalg.norm(feats - feats[first], axis=1)
    while len(chosen) < k:
        nxt = int(np.argmax(dist))
        if dist[nxt] <= 0:
            break  # the rest are duplicates of chosen frames
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(feats - feats[nxt], axis=1))
    return chosen


def order_by_similarity(features: np.ndarray, start: int = 0) -> list[int]:
    """A visiting order of the frames in which neighbours look alike: a greedy nearest-neighbour chain from ``start``.

    Turns an unordered collection into a path through its views, so that sequential windows along it hold nearby
    views (which the model predicts well) rather than frames from all around the scene.
    """
    feats = np.asarray(features, np.float64)
    n = len(feats)
    sq = (feats**2).sum(1)
    todo = np.ones(n, bool)
    todo[start] = False
    chain = [start]
    for _ in range(n - 1):
        d = sq - 2 * feats @ feats[chain[-1]]  # squared distance up to a constant; no n x n matrix held
        d[~todo] = np.inf
        nxt = int(np.argmin(d))
        todo[nxt] = False
        chain.append(nxt)
    return chain


# Name order counts as a capture order unless its neighbours look alike about as rarely as in a shuffle: a frame's
# successor is among its 3 most similar frames (or the other way round) for ~6/n of a shuffled n-frame set, <= 0.15
# for the 40+ frames that get chunked. Measured on synthetic scenes: shuffled orbits 0.0-0.08; ordered orbits and
# walks 0.67-1.0; jittered short arcs 0.19-0.6 (name order measured as good or better there).
AUTO_ORDER_AFFINITY = 0.15


def successor_affinity(features: np.ndarray, k: int = 3) -> float:
    """Fraction of consecutive frames (in the given order) that are among each other's ``k`` most similar frames."""
    f = np.asarray(features, np.float64)
    n = len(f)
    if n < 2:
        return 1.0
    sq = (f**2).sum(1)
    near = []
    for i in range(n):  # one row of distances at a time: no n x n matrix
        d = sq - 2 * f @ f[i]
        d[i] = np.inf
        near.append(set(np.argpartition(d, min(k, n - 2))[:k].tolist()) if n > 2 else {1 - i})
    return float(np.mean([(i + 1) in near[i] or i in near[i + 1] for i in range(n - 1)]))


def _in_order(plan: ChunkPlan, order: Sequence[int], name: str, affinity: float | None) -> ChunkPlan:
    """``plan`` made over positions of ``order``, re-expressed in frame indices."""
    o = list(order)
    return ChunkPlan(
        plan.design,
        plan.n_frames,
        [[o[i] for i in c] for c in plan.chunks],
        plan.targets,
        [[o[i] for i in sh] for sh in plan.shared],
        [o[i] for i in plan.anchors],
        name,
        affinity,
    )


def plan_scene(
    n: int,
    chunk_size: int,
    design: str = "sequential",
    overlap: int | None = None,
    anchors: int | None = None,
    anchor_select: str = "even",
    paths: Sequence[str | Path] | None = None,
    order: str = "auto",
) -> ChunkPlan:
    """The chunk plan of an ``n``-frame scene; ``overlap`` / ``anchors`` default to a quarter of ``chunk_size``.

    ``order="similarity"`` first arranges the frames by :func:`order_by_similarity` (for unordered collections);
    ``"name"`` keeps scene order; ``"auto"`` keeps it when it looks like a capture order (``successor_affinity``
    at least ``AUTO_ORDER_AFFINITY``), else follows similarity.
    ``anchor_select="features"`` picks anchors by farthest-point sampling on the features, ``"even"`` spaces them
    evenly along the order. Features are :func:`image_features` of ``paths`` (each image read once more, small).
    """
    if design not in DESIGNS:
        raise ValueError(f"chunking must be one of {', '.join(DESIGNS)}, got {design!r}")
    if order not in ("auto", "name", "similarity"):
        raise ValueError(f"order must be 'auto', 'name' or 'similarity', got {order!r}")
    if anchor_select not in ("even", "features"):
        raise ValueError(f"anchor_select must be 'even' or 'features', got {anchor_select!r}")
    need_features = order != "name" or (design == "anchors" and anchor_select == "features")
    if need_features and paths is None:
        raise ValueError("ordering or choosing anchors by similarity needs the image paths")
    feats = image_features(paths) if need_features and paths is not None else None
    seq, affinity = list(range(n)), None
    if order != "name" and feats is not None:
        affinity = successor_affinity(feats)
        if order == "similarity" or affinity < AUTO_ORDER_AFFINITY:
            seq, order = order_by_similarity(feats), "similarity"
        else:
            order = "name"
        log.info("chunk order: %s (%.0f%% of name-order neighbours look alike)", order, 100 * affinity)
    default = max(1, chunk_size // 4)
    if design == "sequential":
        plan = plan_sequential(n, chunk_size, default if overlap is None else overlap)
    else:
        k = default if anchors is None else anchors
        by_features = anchor_select == "features" and feats is not None
        plan = plan_anchors(n, chunk_size, choose_anchors(n, k, feats[seq] if by_features else None))
    return _in_order(plan, seq, order, affinity)


# -- memory -----------------------------------------------------------------------------------------------------------
# Activation floats kept per aggregator token and model width, beyond the layers the heads read (2 x width each):
# the running tokens, q/k/v, the attention output and the MLP's hidden layer (4 x width) of the block being run,
# plus allocator slack (12 counted; 16 keeps the estimate at or above the measured peaks of the shipped model).
_TRANSIENT_PER_TOKEN = 16
# Floats per model pixel in the outputs and the input: image 3, depth + confidence 2, point map + confidence 4.
_OUTPUT_PER_PIXEL = 9
_HEAD_FRAMES = 8  # the DPT heads run 8 frames at a time (DPTHead.forward), whatever the chunk size


def forward_bytes(model: Any, frames: int, H: int, W: int) -> int:
    """Estimated bytes one forward pass over ``frames`` frames of ``H x W`` model pixels needs beyond the weights.

    Linear in ``frames``: attention runs through ``scaled_dot_product_attention``, whose CPU and GPU kernels do not
    hold the frames x frames score matrix. Checked against measured peaks of the shipped model in
    docs/BENCHMARKS.md; for VGGT-1B only the per-frame slope is cross-checked (upstream's published ~195 MB per frame
    keeps all 24 layers' outputs, 2 x 1024 x 1041 x 24 x 4 bytes ~ 205 MB; this model keeps the 4 the heads read).
    """
    cfg = model.config.aggregator
    p = cfg.patch_size
    tokens = (H // p) * (W // p) + 1 + cfg.num_register_tokens
    kept = len(model.needed_layers(False))
    per_frame = tokens * cfg.embed_dim * (2 * kept + _TRANSIENT_PER_TOKEN) + H * W * _OUTPUT_PER_PIXEL
    features = max((h.cfg.features for h in (model.depth_head, model.point_head) if h is not None), default=0)
    heads = min(frames, _HEAD_FRAMES) * H * W * features  # about one full-resolution feature map per head frame
    return 4 * (frames * per_frame + heads)


def frames_for_budget(model: Any, H: int, W: int, budget_bytes: float) -> int:
    """The most frames one forward pass may hold within ``budget_bytes`` (at least 2)."""
    lo, hi = 2, 2
    while forward_bytes(model, hi * 2, H, W) <= budget_bytes and hi < 1 << 20:
        hi *= 2
    hi *= 2
    while hi - lo > 1:  # forward_bytes grows with frames: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if forward_bytes(model, mid, H, W) <= budget_bytes else (lo, mid)
    return lo


# -- similarity transforms --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sim3:
    """Similarity ``x' = s R x + t`` from a chunk's world to the scene's world."""

    s: float
    R: np.ndarray
    t: np.ndarray

    @classmethod
    def identity(cls) -> Sim3:
        """The transform that changes nothing."""
        return cls(1.0, np.eye(3), np.zeros(3))

    def inverse(self) -> Sim3:
        """The transform back: ``x = R^T (x' - t) / s``."""
        return Sim3(1.0 / self.s, self.R.T, -(self.R.T @ self.t) / self.s)

    def compose(self, other: Sim3) -> Sim3:
        """``self`` after ``other``: ``x -> self(other(x))``."""
        return Sim3(self.s * other.s, self.R @ other.R, self.s * self.R @ other.t + self.t)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Transform points ``[..., 3]``."""
        return self.s * np.asarray(x, np.float64) @ self.R.T + self.t

    def extrinsics(self, E: np.ndarray) -> np.ndarray:
        """Camera-from-world ``[..., 3, 4]`` in the chunk's world -> the same cameras in the scene's world.

        Camera coordinates scale with the world, so ``[R_c | t_c]`` becomes ``[R_c R^T | s t_c - R_c R^T t]``.
        """
        E = np.asarray(E, np.float64)
        Rc = E[..., :3, :3] @ self.R.T
        tc = self.s * E[..., :3, 3] - np.einsum("...ij,j->...i", Rc, self.t)
        return np.concatenate([Rc, tc[..., None]], -1)

    def matrix(self) -> np.ndarray:
        """The 4x4 homogeneous matrix."""
        M = np.eye(4)
        M[:3, :3] = self.s * self.R
        M[:3, 3] = self.t
        return M

    def to_report(self) -> dict[str, Any]:
        """Scale, rotation angle (degrees) and translation, for report.json."""
        angle = np.degrees(np.arccos(np.clip((np.trace(self.R) - 1) / 2, -1, 1)))
        return {"scale": float(self.s), "rotation_deg": float(angle), "translation": [float(v) for v in self.t]}


def umeyama_weighted(src: np.ndarray, dst: np.ndarray, w: np.ndarray | None = None) -> Sim3:
    """Weighted least-squares similarity minimising ``sum w ||s R src + t - dst||^2`` (Umeyama 1991, weighted)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    w = np.ones(len(src)) if w is None else np.asarray(w, np.float64)
    W = w.sum()
    if len(src) < 3 or not W > 0:
        raise AlignmentError(f"need at least 3 weighted point pairs, got {len(src)} (total weight {W:g})")
    p = w / W
    mu_s, mu_d = p @ src, p @ dst
    xs, xd = src - mu_s, dst - mu_d
    cov = (xd * p[:, None]).T @ xs
    var = float(p @ (xs**2).sum(1))
    if not var > 0:
        raise AlignmentError("the source points are all at one place")
    U, D, Vt = np.linalg.svd(cov)
    E = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        E[2, 2] = -1
    R = U @ E @ Vt
    s = float(np.trace(np.diag(D) @ E) / var)
    if not s > 0:
        raise AlignmentError(f"degenerate fit (scale {s:g})")
    return Sim3(s, R, mu_d - s * R @ mu_s)


def _weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(x)
    cw = np.cumsum(w[order])
    return float(x[order][np.searchsorted(cw, 0.5 * cw[-1])])


@dataclass
class RobustFit:
    """A robust similarity fit and how well it explains the correspondences."""

    sim: Sim3
    residual: float  # confidence-weighted median distance after alignment, relative to the target's extent
    inliers: float  # fraction of the confidence weight the final (redescending) weights keep
    points: int  # correspondences used
    iterations: int


def robust_sim3(
    src: np.ndarray,
    dst: np.ndarray,
    conf: np.ndarray | None = None,
    init: Sim3 | None = None,
    iters: int = 20,
    huber_k: float = 1.345,
    tukey_k: float = 4.685,
    floor: float = 1e-9,
) -> RobustFit:
    """Confidence-weighted Umeyama inside IRLS: Huber weights while converging, then Tukey's biweight.

    Residuals are scaled by their weighted MAD (with ``floor`` times the target's extent as the least scale, so exact
    data does not divide by zero). Huber keeps the early iterations convex from a poor start; the redescending Tukey
    weights then give gross outliers exactly zero weight, so they cannot bias the result.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    c = np.ones(len(src)) if conf is None else np.asarray(conf, np.float64)
    ok = np.isfinite(src).all(1) & np.isfinite(dst).all(1) & np.isfinite(c) & (c > 0)
    src, dst, c = src[ok], dst[ok], c[ok]
    if len(src) < 3:
        raise AlignmentError(f"only {len(src)} usable point pairs")
    extent = _weighted_median(np.linalg.norm(dst - (c / c.sum()) @ dst, axis=1), c)
    if not extent > 0:
        raise AlignmentError("the target points are all at one place")
    sim = init if init is not None else umeyama_weighted(src, dst, c)
    w = c
    it = 0
    for it in range(1, iters + 1):
        r = np.linalg.norm(sim.apply(src) - dst, axis=1)
        sigma = max(1.4826 * _weighted_median(r, c), floor * extent)
        tukey = it > iters // 2
        if tukey:
            u = r / (tukey_k * sigma)
            h = np.where(u < 1, (1 - u**2) ** 2, 0.0)
        else:
            h = np.minimum(1.0, huber_k * sigma / np.maximum(r, 1e-300))
        w_new = c * h
        if not w_new.sum() > 0:
            break
        new = umeyama_weighted(src, dst, w_new)
        step = abs(new.s / sim.s - 1) + np.abs(new.R - sim.R).max() + np.linalg.norm(new.t - sim.t) / extent
        sim, w = new, w_new
        if tukey and step < 1e-12:
            break
    r = np.linalg.norm(sim.apply(src) - dst, axis=1)
    return RobustFit(
        sim=sim,
        residual=_weighted_median(r, c) / extent,
        inliers=float(w[w > 0].size and c[w > 0].sum() / c.sum()),
        points=len(src),
        iterations=it,
    )


def rotation_mean(Rs: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Chordal L2 mean of rotations ``[N, 3, 3]``: the rotation nearest to their weighted average."""
    M = np.einsum("n,nij->ij", np.ones(len(Rs)) if w is None else np.asarray(w, np.float64), Rs)
    U, _, Vt = np.linalg.svd(M)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return U @ D @ Vt


def sim3_from_poses(
    E_src: np.ndarray, E_dst: np.ndarray, depth_ratio: float | None = None, w: np.ndarray | None = None
) -> Sim3:
    """Similarity from the shared frames' poses: rotation from their orientations, scale from ``depth_ratio``.

    ``depth_ratio`` is the target's depth over the source's on the same pixels (works from one shared frame); without
    it the scale comes from the spread of the camera centres (needs two or more frames apart). For camera-from-world
    poses ``R_dst = R_src R^T``, so each frame gives ``R = R_dst^T R_src``.
    """
    E_src, E_dst = np.asarray(E_src, np.float64), np.asarray(E_dst, np.float64)
    w = np.ones(len(E_src)) if w is None else np.asarray(w, np.float64)
    R = rotation_mean(np.einsum("nji,njk->nik", E_dst[:, :3, :3], E_src[:, :3, :3]), w)
    C_src = -np.einsum("nji,nj->ni", E_src[:, :3, :3], E_src[:, :3, 3])
    C_dst = -np.einsum("nji,nj->ni", E_dst[:, :3, :3], E_dst[:, :3, 3])
    if depth_ratio is not None and np.isfinite(depth_ratio) and depth_ratio > 0:
        s = float(depth_ratio)
    else:
        p = w / w.sum()
        spread_src = np.sqrt(p @ ((C_src - p @ C_src) ** 2).sum(1))
        spread_dst = np.sqrt(p @ ((C_dst - p @ C_dst) ** 2).sum(1))
        if not spread_src > 1e-12:
            raise AlignmentError("one shared frame and no depth: the scale is unknown")
        s = float(spread_dst / spread_src)
    t = (w / w.sum()) @ (C_dst - s * C_src @ R.T)
    return Sim3(s, R, t)


# -- chunk predictions in one world -----------------------------------------------------------------------------------
def frame_points(pred: ScenePrediction, i: int, points_from: str = "depth") -> tuple[np.ndarray, np.ndarray]:
    """World points ``[H*W, 3]`` and their confidence ``[H*W]`` of frame ``i`` (NaN where invalid)."""
    from quantvggt.geometry import depth_to_cam_points

    if points_from == "point_map" and pred.world_points is not None:
        xyz = pred.world_points[i].reshape(-1, 3).astype(np.float64)
        conf = pred.world_points_conf[i].reshape(-1).astype(np.float64)
    else:
        import torch

        d = pred.depth[i].astype(np.float64)
        cam = depth_to_cam_points(torch.from_numpy(d), torch.from_numpy(pred.intrinsics[i]), pixel_offset=0.5).numpy()
        E = pred.extrinsics[i].astype(np.float64)
        xyz = ((cam.reshape(-1, 3) - E[:, 3]) @ E[:, :3]).reshape(-1, 3)  # R^T (x - t)
        conf = pred.depth_conf[i].reshape(-1).astype(np.float64)
        xyz[~(d.reshape(-1) > 0)] = np.nan
    return xyz, conf


def _per_frame(value: Any, n: int) -> bool:
    return isinstance(value, (list, np.ndarray)) and len(value) == n


def select_frames(pred: ScenePrediction, frames: Sequence[int]) -> ScenePrediction:
    """The prediction of ``frames`` only: every per-frame field (list or array, including optional ones) indexed."""
    n, idx = len(pred.names), list(frames)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(pred):
        v = getattr(pred, f.name)
        if _per_frame(v, n):
            changes[f.name] = v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]
    changes["report"] = dict(pred.report)
    return dataclasses.replace(pred, **changes)


def transform_prediction(pred: ScenePrediction, sim: Sim3, frames: Sequence[int] | None = None) -> ScenePrediction:
    """``pred`` (or only ``frames`` of it) in the scene's world: poses moved, depth and point maps scaled/moved."""
    out = select_frames(pred, range(len(pred.names)) if frames is None else frames)
    out.extrinsics = sim.extrinsics(out.extrinsics)
    out.depth = (out.depth * sim.s).astype(pred.depth.dtype)
    if out.world_points is not None:
        out.world_points = sim.apply(out.world_points).astype(pred.world_points.dtype)
    return out


def pad_prediction(pred: ScenePrediction, H: int, W: int) -> ScenePrediction:
    """Maps padded (centred, as ``load_and_preprocess`` pads) to ``H x W``; intrinsics and transforms follow.

    Chunks of a scene with mixed image sizes can come out at different model sizes; merged maps need one size.
    Padding has depth and confidence 0 (never selected as points) and white images.
    """
    from quantvggt.images import ImageTransform

    h, w = pred.depth.shape[1:]
    if (h, w) == (H, W):
        return pred
    if h > H or w > W:
        raise ValueError(f"cannot pad {h}x{w} maps to {H}x{W}")
    top, left = (H - h) // 2, (W - w) // 2

    def pad(a: np.ndarray | None, value: float) -> np.ndarray | None:
        if a is None:
            return None
        width = [(0, 0), (top, H - h - top), (left, W - w - left)] + [(0, 0)] * (a.ndim - 3)
        return np.pad(a, width, constant_values=value)

    K = pred.intrinsics.copy()
    K[:, 0, 2] += left
    K[:, 1, 2] += top
    return dataclasses.replace(
        pred,
        intrinsics=K,
        transforms=[t and ImageTransform(t.sx, t.sy, t.ox + left, t.oy + top) for t in pred.transforms],
        depth=pad(pred.depth, 0.0),
        depth_conf=pad(pred.depth_conf, 0.0),
        world_points=pad(pred.world_points, 0.0),
        world_points_conf=pad(pred.world_points_conf, 0.0),
        images=pad(pred.images, 1.0),
    )


def concat_predictions(parts: Sequence[ScenePrediction]) -> ScenePrediction:
    """One prediction holding the frames of ``parts`` in order (maps padded to the largest size)."""
    H = max(p.depth.shape[1] for p in parts)
    W = max(p.depth.shape[2] for p in parts)
    parts = [pad_prediction(p, H, W) for p in parts]
    sizes = [len(p.names) for p in parts]
    first = parts[0]
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(first):
        vals = [getattr(p, f.name) for p in parts]
        framewise = [_per_frame(v, n) for v, n in zip(vals, sizes)]
        if f.name == "report" or not any(framewise) or not all(fw or v is None for fw, v in zip(framewise, vals)):
            continue
        if any(v is None for v in vals):  # an optional map (e.g. the point head's) that some chunk lacks
            changes[f.name] = None
        elif isinstance(vals[0], np.ndarray):
            changes[f.name] = np.concatenate(vals)
        else:
            changes[f.name] = [x for v in vals for x in v]
    return dataclasses.replace(first, **changes)


@dataclass
class AlignOptions:
    """How chunks are aligned and when an alignment counts as failed."""

    method: str = "points"  # "points": robust Umeyama on the shared frames' 3D points; "poses": their poses alone
    points_from: str = "depth"  # which 3D points of the shared frames to fit: "depth" (unprojected) or "point_map"
    conf_percentile: float = 50.0  # use shared pixels above this confidence percentile (in both chunks)
    max_points: int = 20_000  # correspondences per chunk pair (a seeded subsample)
    min_points: int = 50  # below this the pose-based estimate is used alone
    # Relative residual above which a chunk is reported failed, not merged: chains of the shipped model that align
    # well measured 0.03-0.21; chunks it cannot relate (anchors from opposite sides of an orbit) 0.3-0.9.
    max_residual: float = 0.3
    # A link up to ``relaxed_residual`` x that limit still merges when the shared frames' poses agree within
    # ``max_pose_deg`` after alignment: a 240-frame walk had a usable link at 0.46 with 9.2 deg, whereas chunks the
    # model cannot relate (anchors across an orbit) showed 18-47 deg at residuals over 0.3 (docs/BENCHMARKS.md).
    relaxed_residual: float = 2.0
    max_pose_deg: float = 12.0
    min_inliers: float = 0.5  # fraction of confidence weight kept by the robust weights, else failed
    seed: int = 0


@dataclass
class ChunkAlignment:
    """How one chunk was brought into the scene's world."""

    index: int
    status: str  # "reference", "aligned" or "failed"
    target: int | None = None
    shared: list[str] = field(default_factory=list)
    sim: Sim3 | None = None
    method: str = ""  # "points" (robust Umeyama) or "poses" (fallback)
    residual: float | None = None
    inliers: float | None = None
    points: int = 0
    pose_rotation_deg: float | None = None  # shared frames: aligned source vs target orientation (mean)
    pose_center: float | None = None  # shared frames: camera-centre distance relative to the target's extent (mean)
    error: str = ""

    def to_report(self, frames: Sequence[str]) -> dict[str, Any]:
        """For report.json: status, target, shared frames, transform and residuals (rounded)."""

        def rnd(v: float | None) -> float | None:
            return None if v is None else round(float(v), 6)

        return {
            "index": self.index,
            "frames": list(frames),
            "status": self.status,
            "aligned_to": self.target,
            "shared": self.shared,
            "method": self.method,
            "residual": rnd(self.residual),
            "inliers": rnd(self.inliers),
            "points": self.points,
            "pose_rotation_deg": rnd(self.pose_rotation_deg),
            "pose_center": rnd(self.pose_center),
            **({"transform": self.sim.to_report()} if self.sim is not None else {}),
            **({"error": self.error} if self.error else {}),
        }


def _pose_disagreement(E_a: np.ndarray, E_b: np.ndarray, extent: float) -> tuple[float, float]:
    dR = np.einsum("nji,njk->nik", E_a[:, :3, :3], E_b[:, :3, :3])
    ang = np.degrees(np.arccos(np.clip((np.trace(dR, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    C_a = -np.einsum("nji,nj->ni", E_a[:, :3, :3], E_a[:, :3, 3])
    C_b = -np.einsum("nji,nj->ni", E_b[:, :3, :3], E_b[:, :3, 3])
    return float(ang.mean()), float(np.linalg.norm(C_a - C_b, axis=1).mean() / max(extent, 1e-12))


def align_chunk(
    src: ScenePrediction, dst: ScenePrediction, shared: Sequence[str], options: AlignOptions | None = None
) -> tuple[Sim3, RobustFit | None, str]:
    """Similarity taking ``src``'s world to ``dst``'s (already in the scene's world) through frames named ``shared``.

    -> (transform, the robust point fit or None when the pose-based estimate was used alone, method).
    """
    options = options or AlignOptions()
    src = select_frames(src, [src.names.index(n) for n in shared])
    dst = select_frames(dst, [dst.names.index(n) for n in shared])
    H = max(src.depth.shape[1], dst.depth.shape[1])
    W = max(src.depth.shape[2], dst.depth.shape[2])
    src, dst = pad_prediction(src, H, W), pad_prediction(dst, H, W)  # chunks of mixed image sizes: same pixels
    si = di = list(range(len(shared)))
    P_src, P_dst, C, ratios = [], [], [], []
    for a, b in zip(si, di):
        xa, ca = frame_points(src, a, options.points_from)
        xb, cb = frame_points(dst, b, options.points_from)
        ok = np.isfinite(xa).all(1) & np.isfinite(xb).all(1) & np.isfinite(ca) & np.isfinite(cb)
        if ok.any():
            ok &= (ca >= np.percentile(ca[ok], options.conf_percentile)) & (
                cb >= np.percentile(cb[ok], options.conf_percentile)
            )
        P_src.append(xa[ok])
        P_dst.append(xb[ok])
        C.append(np.sqrt(ca[ok] * cb[ok]))
        da, db = src.depth[a].reshape(-1)[ok], dst.depth[b].reshape(-1)[ok]
        good = (da > 0) & (db > 0)
        if good.any():
            ratios.append(np.median(db[good] / da[good]))
    src_pts, dst_pts, conf = np.concatenate(P_src), np.concatenate(P_dst), np.concatenate(C)
    depth_ratio = float(np.median(ratios)) if ratios else None
    init = sim3_from_poses(src.extrinsics[si], dst.extrinsics[di], depth_ratio)
    if options.method == "poses" or len(src_pts) < options.min_points:
        return init, None, "poses"
    if len(src_pts) > options.max_points:
        sel = np.random.default_rng(options.seed).choice(len(src_pts), options.max_points, replace=False)
        src_pts, dst_pts, conf = src_pts[sel], dst_pts[sel], conf[sel]
    fit = robust_sim3(src_pts, dst_pts, conf, init=init)
    return fit.sim, fit, "points"


def frame_quality(pred: ScenePrediction) -> np.ndarray:
    """Mean depth confidence per frame ``[S]``: how well the chunk saw each of its frames."""
    c = pred.depth_conf.reshape(len(pred.names), -1).astype(np.float64)
    return np.where(np.isfinite(c), c, 0.0).mean(1)


class ChunkMerger:
    """Aligns chunk predictions as they arrive (in chunk order) and keeps, per frame, its best aligned prediction.

    Memory is one copy of each frame plus the shared frames later chunks align to, whatever the number of chunks:
    a chunk's prediction can be dropped once :meth:`add` returns.
    """

    def __init__(self, plan: ChunkPlan, names: Sequence[str], options: AlignOptions | None = None) -> None:
        if len(names) != plan.n_frames:
            raise ValueError(f"{len(names)} names for a plan of {plan.n_frames} frames")
        self.plan, self.names, self.options = plan, list(names), options or AlignOptions()
        self.alignments: list[ChunkAlignment] = []
        self._targets: dict[int, ScenePrediction] = {}  # aligned chunk -> its frames later chunks align to
        self._best: dict[int, tuple[float, int]] = {}  # frame -> (quality, chunk) of the prediction kept
        self._store: ScenePrediction | None = None  # every frame's kept prediction, in scene order, filled in place
        self._merged = False
        self._later = [
            sorted({i for j, t in enumerate(plan.targets) if t == k for i in plan.shared[j]})
            for k in range(len(plan.chunks))
        ]

    def add(self, pred: ScenePrediction) -> ChunkAlignment:
        """Align the next chunk's prediction (frames in the plan's chunk order) and keep what the merge needs."""
        k = len(self.alignments)
        chunk = self.plan.chunks[k]
        if pred.names != [self.names[i] for i in chunk]:
            raise ValueError(f"chunk {k}: prediction frames {pred.names[:3]}... are not the plan's")
        t = self.plan.targets[k]
        shared = [self.names[i] for i in self.plan.shared[k]]
        res = ChunkAlignment(k, "failed", target=t, shared=shared)
        self.alignments.append(res)
        if t is None:
            res.status, res.sim, res.method = "reference", Sim3.identity(), "reference"
        elif t not in self._targets:
            res.error = f"its target chunk {t} failed to align"
        else:
            self._align(res, pred, self._targets[t])
        if res.status == "failed":
            log.warning("chunk %d not merged: %s", k, res.error)
            return res
        assert res.sim is not None
        q = frame_quality(pred)
        wins = [j for j, i in enumerate(chunk) if i not in self._best or q[j] > self._best[i][0]]
        keep = sorted(set(wins) | {chunk.index(i) for i in self._later[k]})
        moved = transform_prediction(pred, res.sim, keep)
        for j in wins:
            self._best[chunk[j]] = (float(q[j]), k)
        self._keep([chunk[j] for j in wins], select_frames(moved, [keep.index(j) for j in wins]))
        if self._later[k]:
            self._targets[k] = select_frames(moved, [keep.index(chunk.index(i)) for i in self._later[k]])
        return res

    def _keep(self, frames: list[int], part: ScenePrediction) -> None:
        """Write ``part``'s frames into the scene-sized store at ``frames`` (one allocation per map, not per frame).

        Kept frames are copied straight into preallocated arrays, so the result needs no second copy at the end and
        the many small long-lived arrays of per-frame copies never fragment the heap between chunks.
        """
        if not frames:
            return
        n = self.plan.n_frames
        if self._store is None:
            empty: dict[str, Any] = {}
            for f in dataclasses.fields(part):
                v = getattr(part, f.name)
                if f.name != "report" and _per_frame(v, len(part.names)):
                    empty[f.name] = np.zeros((n, *v.shape[1:]), v.dtype) if isinstance(v, np.ndarray) else [None] * n
            self._store = dataclasses.replace(part, **empty)
        store = self._store
        H, W = store.depth.shape[1:]
        h, w = part.depth.shape[1:]
        if h > H or w > W:  # a chunk of larger images (mixed sizes): widen everything kept so far
            store = self._store = pad_prediction(store, max(h, H), max(w, W))
        part = pad_prediction(part, *store.depth.shape[1:])
        for f in dataclasses.fields(store):
            dst, src = getattr(store, f.name), getattr(part, f.name)
            if f.name == "report" or not _per_frame(dst, n):
                continue
            if src is None:  # an optional map this chunk lacks: the result has none
                setattr(store, f.name, None)
            elif isinstance(dst, np.ndarray):
                dst[frames] = src
            else:
                for i, v in zip(frames, src):
                    dst[i] = v

    def fail(self, error: str) -> ChunkAlignment:
        """Record that the next chunk has no prediction (its inference failed); its frames stay unregistered."""
        k = len(self.alignments)
        t = self.plan.targets[k]
        res = ChunkAlignment(k, "failed", target=t, shared=[self.names[i] for i in self.plan.shared[k]], error=error)
        self.alignments.append(res)
        log.warning("chunk %d not merged: %s", k, error)
        return res

    def _align(self, res: ChunkAlignment, pred: ScenePrediction, target: ScenePrediction) -> None:
        opts = self.options
        try:
            sim, fit, method = align_chunk(pred, target, res.shared, opts)
        except (AlignmentError, np.linalg.LinAlgError) as e:
            res.error = str(e)
            return
        res.sim, res.method = sim, method
        if fit is not None:
            res.residual, res.inliers, res.points = fit.residual, fit.inliers, fit.points
        si = [pred.names.index(n) for n in res.shared]
        di = [target.names.index(n) for n in res.shared]
        dst = np.concatenate([frame_points(target, i, opts.points_from)[0] for i in di])
        dst = dst[np.isfinite(dst).all(1)]
        extent = float(np.median(np.linalg.norm(dst - np.median(dst, 0), axis=1))) if len(dst) else 1.0
        res.pose_rotation_deg, res.pose_center = _pose_disagreement(
            sim.extrinsics(pred.extrinsics[si]), target.extrinsics[di], extent
        )
        pose_ok = res.pose_rotation_deg <= opts.max_pose_deg
        if fit is not None and fit.residual > opts.max_residual * (opts.relaxed_residual if pose_ok else 1.0):
            res.error = f"alignment residual {fit.residual:.3g} over the limit {opts.max_residual:g}"
        elif fit is not None and fit.inliers < opts.min_inliers:
            res.error = f"only {fit.inliers:.0%} of the shared points agree (limit {opts.min_inliers:.0%})"
        else:
            res.status = "aligned"

    def result(self) -> ScenePrediction:
        """Every frame an aligned chunk saw, once, in scene order; the others in ``report["images_unregistered"]``.

        The report holds ``chunking`` (plan, per-chunk alignment, the chunk each frame came from) and
        ``images_unregistered`` (name and the failed chunks' errors with their residuals).
        """
        if len(self.alignments) != len(self.plan.chunks):
            raise ValueError(f"{len(self.alignments)} of {len(self.plan.chunks)} chunks added")
        if self._merged:
            raise ValueError("result() was already taken")
        self._merged = True
        order = sorted(self._best)
        if not order:
            raise AlignmentError("no chunk could be aligned")
        failed = {k: al for k, al in enumerate(self.alignments) if al.status == "failed"}
        unregistered = [
            {
                "name": self.names[i],
                "reason": "; ".join(
                    f"chunk {k}: {al.error}" + (f" (residual {al.residual:.3g})" if al.residual is not None else "")
                    for k, al in failed.items()
                    if i in self.plan.chunks[k]
                ),
            }
            for i in range(self.plan.n_frames)
            if i not in self._best
        ]
        source = {self.names[i]: self._best[i][1] for i in order}
        store, self._store = self._store, None  # the merger hands its frames over: result() runs once
        assert store is not None
        merged = store if len(order) == self.plan.n_frames else select_frames(store, order)
        del store
        merged.report = {
            "chunking": {
                **self.plan.to_report(self.names),
                "per_chunk": [
                    al.to_report([self.names[i] for i in self.plan.chunks[k]]) for k, al in enumerate(self.alignments)
                ],
                "frame_source_chunk": source,
            },
            "images_unregistered": unregistered,
        }
        return merged


def align_chunks(
    preds: Sequence[ScenePrediction], plan: ChunkPlan, options: AlignOptions | None = None
) -> list[ChunkAlignment]:
    """Bring every chunk into chunk 0's world, in order; a chunk whose target failed, or whose fit is poor, fails."""
    merger = ChunkMerger(plan, _scene_names(preds, plan), options)
    return [merger.add(p) for p in preds]


def merge_chunks(
    preds: Sequence[ScenePrediction], plan: ChunkPlan, names: Sequence[str], options: AlignOptions | None = None
) -> ScenePrediction:
    """Align ``preds`` (one per chunk of ``plan``) and merge them into one prediction (see :class:`ChunkMerger`)."""
    merger = ChunkMerger(plan, names, options)
    for p in preds:
        merger.add(p)
    return merger.result()


def _scene_names(preds: Sequence[ScenePrediction], plan: ChunkPlan) -> list[str]:
    names = [""] * plan.n_frames
    for p, c in zip(preds, plan.chunks):
        for n, i in zip(p.names, c):
            names[i] = n
    return names


# -- compact chunk predictions (shipped between processes, e.g. Ray tasks) ------------------------------------------
_ARRAYS = ("extrinsics", "intrinsics", "depth", "depth_conf", "world_points", "world_points_conf", "images")


def prediction_to_arrays(pred: ScenePrediction, point_map: bool = True) -> dict[str, Any]:
    """``pred`` as plain numpy arrays and strings (no dataclasses): what the merger needs of a chunk, compact to ship.

    Images travel as 8-bit (the COLMAP export writes 8-bit colours, rounding as here, so the colours come out the
    same); ``point_map=False`` leaves out the point head's maps (16 of 36 bytes a pixel), which only
    ``points_from="point_map"`` reads. Absent optional maps stay out of the dict; the report keeps only its timings.
    """
    out: dict[str, Any] = {
        "scene": pred.scene,
        "names": list(pred.names),
        "original_sizes": np.asarray(pred.original_sizes, np.int64).reshape(-1, 2),
        # a frame without a transform (not produced by load_and_preprocess) is a row of NaN
        "transforms": np.array(
            [[t.sx, t.sy, t.ox, t.oy] if t is not None else [np.nan] * 4 for t in pred.transforms], np.float64
        ).reshape(-1, 4),
        "timings_s": dict(pred.report.get("timings_s", {})),
    }
    for key in _ARRAYS:
        value = getattr(pred, key)
        if value is None or (not point_map and key.startswith("world_points")):
            continue
        if key == "images":
            value = (np.asarray(value, np.float32) * 255 + 0.5).clip(0, 255).astype(np.uint8)
        out[key] = np.ascontiguousarray(value)
    return out


def prediction_from_arrays(data: dict[str, Any]) -> ScenePrediction:
    """Inverse of :func:`prediction_to_arrays`."""
    from quantvggt.images import ImageTransform
    from quantvggt.prediction import ScenePrediction

    images = data["images"]
    return ScenePrediction(
        scene=data["scene"],
        names=list(data["names"]),
        original_sizes=[(int(a), int(b)) for a, b in data["original_sizes"]],  # order kept as given
        transforms=[None if np.isnan(t).any() else ImageTransform(*map(float, t)) for t in data["transforms"]],  # type: ignore[misc]
        **{key: data.get(key) for key in _ARRAYS if key != "images"},
        images=images.astype(np.float32) / np.float32(255) if images.dtype == np.uint8 else images,
        report={"timings_s": dict(data.get("timings_s", {}))},
    )
