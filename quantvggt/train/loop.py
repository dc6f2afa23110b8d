"""Resumable, seeded training loop for a small VGGT on synthetic scenes."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from quantvggt.fsutil import atomic_dir, atomic_file, atomic_write_text
from quantvggt.model import VGGT, VGGTConfig
from quantvggt.train.data import VAL_SEED_BASE, ScenePool
from quantvggt.train.losses import camera_loss, conf_regression_loss

log = logging.getLogger(__name__)

TINY_SYNTHETIC_CONFIG: dict[str, Any] = {
    # layer scale 0.1 (upstream 0.01): a small model trained briefly from scratch needs its blocks to matter early
    "aggregator": {
        "img_size": 112,
        "patch_size": 14,
        "embed_dim": 128,
        "depth": 6,
        "num_heads": 4,
        "patch_embed": "conv",
        "init_values": 0.1,
    },
    "camera_head": {"dim_in": 256, "trunk_depth": 2, "num_heads": 4, "init_values": 0.1},
    "depth_head": {
        "dim_in": 256,
        "output_dim": 2,
        "activation": "exp",
        "features": 32,
        "out_channels": [16, 32, 64, 64],
        "intermediate_layer_idx": [1, 3, 4, 5],
    },
    "point_head": {
        "dim_in": 256,
        "output_dim": 4,
        "activation": "inv_log",
        "features": 32,
        "out_channels": [16, 32, 64, 64],
        "intermediate_layer_idx": [1, 3, 4, 5],
    },
    "track_head": None,
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved beside its checkpoints)."""

    model: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(TINY_SYNTHETIC_CONFIG)))
    steps: int = 20000
    batch_size: int = 4
    frames: tuple[int, int] = (3, 8)  # frames per sample, drawn uniformly in [lo, hi]
    width: int = 112
    height: int = 84
    pool_scenes: int = 800
    pool_frames: int = 12
    lr: float = 5e-4
    warmup: int = 300
    weight_decay: float = 0.05
    camera_weight: float = 5.0
    dense_weight: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    save_every: int = 250
    log_every: int = 25
    init_from: str | None = (
        None  # model source (load_vggt) whose weights start a new run (same config); optimiser starts fresh
    )
    init_partial: bool = False  # init_from another architecture: copy the tensors whose names and shapes match
    pool_refresh_every: int = 0  # replace one pool scene every this many samples served (0: fixed pool)
    val_every: int = 500  # held-out validation (val.jsonl) every this many steps; 0 disables
    val_samples: int = 32

    def __post_init__(self) -> None:
        self.frames = tuple(self.frames)  # type: ignore[assignment]
        self.check()

    def check(self) -> None:
        """Refuse values that cannot train (``ValueError`` naming the option); also run on fields set afterwards.

        ``steps -1`` trained nothing and said it wrote a checkpoint; ``batch_size 0`` was a traceback.
        """
        for key, least in _WHOLE_AT_LEAST.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{key} must be a whole number >= {least}, got {value!r}")
        for key in ("grad_clip",):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        for key in ("lr", "weight_decay", "camera_weight", "dense_weight"):  # lr 0: weights stay as they start
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.frames[0] < 2 or self.frames[1] < self.frames[0] or self.frames[1] > self.pool_frames:
            raise ValueError(f"frames range {self.frames} must be within [2, pool_frames={self.pool_frames}]")


# whole-number options and their least value (14 px: one patch)
_WHOLE_AT_LEAST = {
    "steps": 1, "batch_size": 1, "width": 14, "height": 14, "pool_scenes": 1, "pool_frames": 2, "warmup": 0,
    "threads": 1, "save_every": 1, "log_every": 1, "pool_refresh_every": 0, "val_every": 0, "val_samples": 1,
}  # fmt: skip


def check_device(device: str) -> torch.device:
    """``device`` as a ``torch.device``, or a one-line ``ValueError``: unknown names, and GPUs that are not there.

    ``--device cuda`` on a machine without one used to end in a traceback from inside the model's ``.to()``.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is available here (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: no Apple GPU (MPS) is available here (use --device cpu)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: training runs on cpu, cuda or mps")
    return dev


def _lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warm-up, then cosine to 10% of ``cfg.lr``; ``progress`` in [0, 1] overrides the step-based position."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    if progress is not None:
        p = max(p, progress)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


class _Batches:
    """Endless batch plans (lists of pool keys, one frame count per batch) drawn from the run's generator."""

    def __init__(self, pool: ScenePool, rng: np.random.Generator, cfg: TrainConfig) -> None:
        self.pool, self.rng, self.cfg = pool, rng, cfg

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, ...]]]]:
        while True:
            frames = int(self.rng.integers(self.cfg.frames[0], self.cfg.frames[1] + 1))
            yield [self.pool.draw(self.rng, frames) for _ in range(self.cfg.batch_size)]


def _collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def _batches(
    pool: ScenePool, rng: np.random.Generator, cfg: TrainConfig, workers: int, pin: bool
) -> Iterator[dict[str, Tensor]]:
    """Collated batches; with ``workers`` > 0 they are built in DataLoader processes.

    With workers the generator runs ahead of training by the prefetched batches, so a resumed run continues the
    stream rather than replaying it exactly (single-process runs resume exactly).
    """
    plans = _Batches(pool, rng, cfg)
    if workers <= 0:
        return (_collate([pool[k] for k in plan]) for plan in plans)
    loader = torch.utils.data.DataLoader(
        pool,
        batch_sampler=plans,
        num_workers=workers,
        collate_fn=_collate,  # type: ignore[arg-type]
        pin_memory=pin,
        prefetch_factor=4,
        worker_init_fn=_one_thread,
        persistent_workers=True,
    )
    return iter(loader)


def validation_set(cfg: TrainConfig, frames: int = 6) -> list[dict[str, Tensor]]:
    """Fixed held-out samples (scenes from ``VAL_SEED_BASE``, never in a training pool or an evaluation set)."""
    pool = ScenePool(cfg.val_samples, cfg.pool_frames, cfg.width, cfg.height, seed=0, seed_base=VAL_SEED_BASE)
    rng = np.random.default_rng(0)
    k = cfg.pool_frames
    return [
        pool[(i, tuple(rng.choice(k, size=min(frames, k), replace=False).tolist()))] for i in range(cfg.val_samples)
    ]


@torch.no_grad()
def validate(model: VGGT, samples: list[dict[str, Tensor]], device: torch.device, batch: int = 8) -> dict[str, float]:
    """Held-out camera L1 (last refinement) next to the best constant guess's, and depth abs-rel.

    ``val_camera`` below ``val_camera_const`` means the model infers poses from the images; equal means it predicts
    the average pose (memorised training poses show up as a falling training loss with no change here).
    """
    was_training = model.training
    model.eval()
    poses, depths = [], []
    for i in range(0, len(samples), batch):
        images = torch.stack([s["images"] for s in samples[i : i + batch]]).to(device)
        tokens, psi = model.aggregator(images)
        poses.append(model.camera_head(tokens)[-1].cpu())
        depths.append(model.depth_head(tokens, images, psi)[0][..., 0].cpu())
    model.train(was_training)
    gt = torch.stack([s["pose_enc"] for s in samples])
    const = gt.clone()
    const[:, 1:] = gt[:, 1:].reshape(-1, gt.shape[-1]).median(0).values
    d_gt = torch.stack([s["depth"] for s in samples])
    valid = torch.stack([s["valid"] for s in samples])
    d = torch.cat(depths)
    return {
        "val_camera": float(camera_loss([torch.cat(poses)], gt)),
        "val_camera_const": float(camera_loss([const], gt)),
        "val_depth_absrel": float(((d - d_gt).abs() / d_gt.clamp(min=1e-6))[valid].mean()),
    }


def export_model(run: str | Path, dest: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a run's weights (cast to ``dtype``) and config as a loadable model folder ``dest`` (atomically)."""
    run, dest = Path(run), Path(dest)
    sd = load_file(str(run / "model.safetensors"))
    with atomic_dir(dest) as tmp:
        save_file(
            {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
            str(tmp / "model.safetensors"),
        )
        config = json.loads((run / "config.json").read_text())
        if (run / "train_config.json").is_file():  # older run folders lack image_size in config.json
            train_cfg = (run / "train_config.json").read_text()
            config["image_size"] = json.loads(train_cfg)["width"]  # the resolution it was trained at
            (tmp / "train_config.json").write_text(train_cfg)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
    return dest


def save_checkpoint(
    out: Path, model: VGGT, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig, rng: np.random.Generator
) -> None:
    """Write weights, config and optimiser state, each atomically, renamed into place only once all are written."""
    state = {
        "optimizer": opt.state_dict(),
        "step": torch.tensor(step),
        "torch_rng": torch.get_rng_state(),
        "np_rng": json.dumps(rng.bit_generator.state),
    }
    # nested so the renames happen together at the end, weights first: a crash mid-write leaves the previous set
    with (
        atomic_file(out / "train_state.pt") as state_tmp,
        atomic_file(out / "config.json") as config_tmp,
        atomic_file(out / "model.safetensors") as model_tmp,
    ):
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(model_tmp))
        # image_size: the checkpoint folder loads with load_vggt at the resolution it is trained at
        config_tmp.write_text(json.dumps(model.config.to_dict(), indent=1))
        torch.save(state, state_tmp)
        atomic_write_text(out / "train_config.json", json.dumps(asdict(cfg), indent=1))


def plot_losses(log_path: Path, png: Path) -> None:
    """Loss curves (total and per term, smoothed) from ``log.jsonl`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "camera", "depth", "points"):
        ax.plot(steps, [r[key] for r in rows], label=key)
    ax.set_yscale("symlog")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _run_config(out: Path, cfg: TrainConfig | None) -> TrainConfig:
    """The run's config: the one saved in ``out`` when resuming (it wins over ``cfg``), else ``cfg`` or the default."""
    path = out / "train_config.json"
    if path.is_file():
        try:
            saved = TrainConfig(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError; unknown keys a TypeError
            raise ValueError(f"{path}: {e}") from None
        if cfg is not None and asdict(cfg) != asdict(saved):
            log.warning("resuming with the saved train_config.json (the one passed differs)")
        return saved
    return cfg or TrainConfig()


def _init_from(model: VGGT, cfg: TrainConfig) -> None:
    """Start a new run from another model's weights (all of them, or with ``init_partial`` those that fit)."""
    from quantvggt.model.loading import load_vggt

    init = load_vggt(cfg.init_from)  # any model source; 16-bit checkpoints come back as float32
    src = init.state_dict()
    if cfg.init_partial:
        own = model.state_dict()
        take = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(take, strict=False)
        log.info(
            "initialised %d of %d tensors from %s (fresh: %s)",
            len(take),
            len(own),
            cfg.init_from,
            sorted({k.split(".")[1] if k.count(".") > 1 else k for k in set(own) - set(take)}),
        )
        return
    if init.config.to_dict() != model.config.to_dict():
        raise ValueError(
            f"{cfg.init_from}: model config differs from this run's; "
            "init_from needs the same architecture (or init_partial)"
        )
    model.load_state_dict(src, strict=True)
    log.info("initialised from %s", cfg.init_from)


def build_model(out: Path, cfg: TrainConfig, dev: torch.device) -> tuple[VGGT, torch.optim.Optimizer, bool]:
    """The model and optimiser on ``dev``: resumed weights from ``out``, else ``init_from``'s, else fresh ones.

    Returns whether the run resumes (its optimiser and generator states are then restored by :func:`resume`).
    """
    model = VGGT(VGGTConfig.from_dict({**cfg.model, "image_size": cfg.width}))
    resuming = (out / "train_state.pt").is_file()
    if resuming:
        model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    elif cfg.init_from:
        _init_from(model, cfg)
    model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return model, opt, resuming


def resume(out: Path, opt: torch.optim.Optimizer, rng: np.random.Generator, dev: torch.device) -> int:
    """Restore the optimiser and both random generators from ``out``; returns the step to continue from."""
    state = torch.load(out / "train_state.pt", weights_only=True, map_location=dev)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    rng.bit_generator.state = json.loads(state["np_rng"])
    step = int(state["step"])
    log.info("resumed at step %d", step)
    return step


def build_pool(cfg: TrainConfig, step: int, workers: int) -> ScenePool:
    """Render the training scene pool (its refresh stream continues from ``step`` on resume)."""
    t0 = time.perf_counter()
    pool = ScenePool(
        cfg.pool_scenes,
        cfg.pool_frames,
        cfg.width,
        cfg.height,
        cfg.seed,
        workers=max(workers, 1),
        refresh_every=cfg.pool_refresh_every,
        stream=step,
    )
    log.info("rendered %d training scenes in %.0fs", cfg.pool_scenes, time.perf_counter() - t0)
    return pool


def train_step(
    model: VGGT, opt: torch.optim.Optimizer, b: dict[str, Tensor], cfg: TrainConfig, lr: float
) -> dict[str, Tensor]:
    """One optimiser step on batch ``b`` at learning rate ``lr``; returns the (detached) loss terms."""
    for g in opt.param_groups:
        g["lr"] = lr
    tokens, psi = model.aggregator(b["images"])
    poses = model.camera_head(tokens)
    depth, depth_conf = model.depth_head(tokens, b["images"], psi)
    pts, pts_conf = model.point_head(tokens, b["images"], psi)
    l_cam = camera_loss(poses, b["pose_enc"])
    l_depth = conf_regression_loss(depth, depth_conf, b["depth"][..., None], b["valid"])
    l_pts = conf_regression_loss(pts, pts_conf, b["world_points"], b["valid"])
    loss = cfg.camera_weight * l_cam + cfg.dense_weight * (l_depth + l_pts)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return {"loss": loss.detach(), "camera": l_cam.detach(), "depth": l_depth.detach(), "points": l_pts.detach()}


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def log_losses(log_path: Path, step: int, acc: dict[str, Tensor], cfg: TrainConfig, lr: float, elapsed: float) -> None:
    """Append the mean loss terms of the last ``cfg.log_every`` steps to ``log.jsonl``."""
    row = {"step": step, **{k: float(v) / cfg.log_every for k, v in acc.items()}, "lr": lr, "elapsed_s": elapsed}
    _append_jsonl(log_path, row)
    log.info(
        "step %d loss %.4f (cam %.4f depth %.4f pts %.4f)",
        step,
        row["loss"],
        row["camera"],
        row["depth"],
        row["points"],
    )


def log_validation(out: Path, step: int, model: VGGT, samples: list[dict[str, Tensor]], dev: torch.device) -> None:
    """Validate on the held-out samples and append the result to ``val.jsonl``."""
    row = {"step": step, **validate(model, samples, dev)}
    _append_jsonl(out / "val.jsonl", row)
    log.info(
        "step %d held-out camera L1 %.4f (constant guess %.4f), depth abs-rel %.4f",
        step,
        row["val_camera"],
        row["val_camera_const"],
        row["val_depth_absrel"],
    )


def main(
    out: str | Path,
    cfg: TrainConfig | None = None,
    max_minutes: float | None = None,
    device: str = "cpu",
    workers: int = 0,
    schedule_by_time: bool = False,
) -> Path:
    """Train (or resume) into ``out``; stops at ``cfg.steps`` or after ``max_minutes``. Returns ``out``.

    ``device``/``workers`` (DataLoader processes) only change speed. ``schedule_by_time`` decays the learning rate
    over ``max_minutes`` of wall time (for a fixed time budget on a lent GPU) as well as over ``cfg.steps``.
    """
    if schedule_by_time and max_minutes is None:
        raise ValueError("schedule_by_time needs max_minutes")
    if max_minutes is not None and not 0 < max_minutes < math.inf:
        raise ValueError(f"max_minutes must be a finite number > 0, got {max_minutes}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be a whole number >= 0, got {workers!r}")
    check_device(device)  # before any file is written or any scene rendered
    out = Path(out)
    cfg = _run_config(out, cfg)
    cfg.check()  # fields may have been set after construction (the train command does)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, opt, resuming = build_model(out, cfg, dev)
    step = resume(out, opt, rng, dev) if resuming else 0
    pool = build_pool(cfg, step, workers)
    model.train()
    t0 = time.perf_counter()
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    acc: dict[str, Tensor] = {}
    batches = _batches(pool, rng, cfg, workers, pin=dev.type == "cuda")
    val_set: list[dict[str, Tensor]] | None = None
    while step < cfg.steps:
        elapsed = time.perf_counter() - t0
        if max_minutes is not None and elapsed > 60 * max_minutes:
            break
        b = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
        progress = elapsed / (60 * max_minutes) if schedule_by_time and max_minutes else None
        lr = _lr_at(step, cfg, progress)
        losses = train_step(model, opt, b, cfg, lr)
        step += 1
        for k, v in losses.items():
            acc[k] = acc.get(k, 0.0) + v  # summed on the device: no per-step host sync on a GPU
        if step % cfg.log_every == 0:
            log_losses(log_path, step, acc, cfg, lr, round(time.perf_counter() - t0, 1))
            acc = {}
        if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps):
            val_set = val_set if val_set is not None else validation_set(cfg)
            log_validation(out, step, model, val_set, dev)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(out, model, opt, step, cfg, rng)
            plot_losses(log_path, out / "loss.png")
    save_checkpoint(out, model, opt, step, cfg, rng)
    if log_path.is_file():
        plot_losses(log_path, out / "loss.png")
    return out
