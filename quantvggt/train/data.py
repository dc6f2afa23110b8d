"""Synthetic training data: a pool of rendered scenes, sampled into normalised multi-view batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from quantvggt import synth
from quantvggt.geometry import extri_intri_to_pose_encoding, unproject_depth

TRAIN_SEED_BASE = 1_000_000  # evaluation scenes use seeds < TRAIN_SEED_BASE, so training never sees them
VAL_SEED_BASE = 3_000_000  # held-out validation scenes: above every training pool with seed < 20
FRESH_SEED_BASE = 1 << 32  # scenes rendered during training (pool refresh): disjoint from every seed above


@dataclass
class RenderedScene:
    """One rendered scene: images uint8 ``[K,H,W,3]``, z-depth ``[K,H,W]``, extrinsics ``[K,3,4]``, K ``[K,3,3]``."""

    images: np.ndarray
    depth: np.ndarray
    extrinsics: np.ndarray
    intrinsics: np.ndarray


def render_scene(seed: int, frames: int, width: int, height: int) -> RenderedScene:
    """Render a synthetic scene with ground truth."""
    rng = np.random.default_rng(seed)
    world = synth.make_world(rng)
    extr, K = synth.scene_cameras(rng, frames, width, height)
    imgs, depths = zip(*(synth.render(world, extr[i], K[i], width, height) for i in range(frames)))
    return RenderedScene(
        np.stack(imgs), np.stack(depths).astype(np.float16), extr.astype(np.float32), K.astype(np.float32)
    )


def normalise(scene: RenderedScene, idx: list[int]) -> dict[str, Tensor]:
    """Frames ``idx`` (first = reference) as a training sample in VGGT's convention.

    The world is moved so the first camera is the identity and scaled so the mean distance of valid points
    from the origin is 1; depth and translations are scaled alike.
    """
    H, W = scene.images.shape[1:3]
    extr = torch.from_numpy(scene.extrinsics[idx]).double()
    K = torch.from_numpy(scene.intrinsics[idx]).double()
    depth = torch.from_numpy(scene.depth[idx].astype(np.float32)).double()
    ref = torch.cat([extr[0], torch.tensor([[0, 0, 0, 1.0]], dtype=torch.float64)])
    ref_inv = torch.linalg.inv(ref)
    extr = extr @ ref_inv  # camera-from-(reference camera)
    pts = unproject_depth(depth, extr, K, pixel_offset=0.5)
    valid = depth > 0
    scale = pts[valid].norm(dim=-1).mean().clamp(min=1e-6)
    extr[..., 3] /= scale
    depth, pts = depth / scale, pts / scale
    enc = extri_intri_to_pose_encoding(extr[None], K[None], (H, W))[0]
    return {
        "images": torch.from_numpy(scene.images[idx]).permute(0, 3, 1, 2).float() / 255.0,
        "pose_enc": enc.float(),
        "depth": depth.float(),
        "world_points": pts.float(),
        "valid": valid,
    }


class ScenePool:
    """Pre-rendered training scenes; each draw is a random frame subset with a random reference frame.

    With ``refresh_every`` > 0, every that many samples served one scene is replaced by a newly rendered one, so a
    long run keeps seeing new scenes and cannot memorise poses per scene. Replacement happens in whichever process
    serves the samples (each DataLoader worker refreshes its own copy); new seeds come from (``seed``,
    ``stream``, worker id, counter), so a resumed run passing its start step as ``stream`` gets new scenes.
    """

    def __init__(
        self,
        n_scenes: int,
        frames_per_scene: int,
        width: int,
        height: int,
        seed: int = 0,
        workers: int = 1,
        seed_base: int = TRAIN_SEED_BASE,
        refresh_every: int = 0,
        stream: int = 0,
    ) -> None:
        self.size, self.seed, self.stream, self.refresh_every = (width, height), seed, stream, refresh_every
        self.frames_per_scene = frames_per_scene
        self._served = self._fresh = 0
        jobs = [(seed_base + seed * 100_000 + i, frames_per_scene, width, height) for i in range(n_scenes)]
        if workers > 1:
            import multiprocessing

            # fork: the workers only need this module; rendering is pure numpy, so the pool is identical to serial
            with multiprocessing.get_context("fork").Pool(workers) as mp:
                self.scenes = mp.starmap(render_scene, jobs, chunksize=8)
        else:
            self.scenes = [render_scene(*job) for job in jobs]

    def draw(self, rng: np.random.Generator, frames: int) -> tuple[int, tuple[int, ...]]:
        """A random (scene index, frame indices) pair; the first frame is the reference."""
        si = int(rng.integers(len(self.scenes)))
        k = self.scenes[si].images.shape[0]
        return si, tuple(rng.choice(k, size=min(frames, k), replace=False).tolist())

    def __getitem__(self, key: tuple[int, tuple[int, ...]]) -> dict[str, Tensor]:
        """The normalised sample for a key from :meth:`draw` (may then refresh one scene, see the class note)."""
        sample = normalise(self.scenes[key[0]], list(key[1]))
        if self.refresh_every:
            self._served += 1
            if self._served % self.refresh_every == 0:
                self._replace_one()
        return sample

    def _replace_one(self) -> None:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        self._fresh += 1
        entropy = np.random.SeedSequence([self.seed, self.stream, wid, self._fresh]).generate_state(1, np.uint32)[0]
        slot = (self._fresh * 7919 + wid * 104729) % len(self.scenes)  # spread workers' replacements over the pool
        self.scenes[slot] = render_scene(FRESH_SEED_BASE + int(entropy), self.frames_per_scene, *self.size)

    def sample(self, rng: np.random.Generator, frames: int) -> dict[str, Tensor]:
        """One normalised sample of ``frames`` frames."""
        return self[self.draw(rng, frames)]
