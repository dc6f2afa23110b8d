"""W4A4 quality after calibrating on an NFDS selection vs on a random subset of the same size, over several seeds.

    python benchmarks/nfds_stability.py --seeds 5

Model: the tiny architecture with planted VGGT-like outliers. Pool: synthetic scenes plus planted noise scenes
(the kind of sample NFDS's filter should drop). Quality: relative error of the last aggregator layer vs full
precision on held-out synthetic scenes (lower is better). Both arms use the same recipe and epochs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from quantvggt import synth
from quantvggt.calib import nfds
from quantvggt.images import list_images, load_and_preprocess
from quantvggt.quant import get_recipe, quantize_
from quantvggt.testing import planted_outlier_model

SIZE = 56


def make_pool(root: Path, n_scenes: int, n_noise: int) -> Path:
    """Synthetic scenes plus noise/flat scenes, all in one group."""
    pool = synth.main(root / "pool" / "all", scenes=n_scenes, frames=4, seed=21, size=(112, 84))
    rng = np.random.default_rng(0)
    for i in range(n_noise):
        d = pool / f"noise_{i}"
        d.mkdir()
        for j in range(4):
            arr = (
                (rng.random((84, 112, 3)) ** (1 + 7 * (i % 2)) * 255).astype(np.uint8)
                if i % 3
                else np.full((84, 112, 3), 250, np.uint8)
            )
            Image.fromarray(arr).save(d / f"f{j}.png")
    return root / "pool"


def last_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.aggregator(x[None], keep_layers=[-1])[0][-1]


def main() -> None:
    """Run both arms for every seed and print per-seed errors plus mean and spread."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--scenes", type=int, default=24)
    ap.add_argument("--noise", type=int, default=4)
    ap.add_argument("--clusters", type=int, default=3)
    ap.add_argument("--per-cluster", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = planted_outlier_model()
    base.image_size = SIZE
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pool = make_pool(root, args.scenes, args.noise)
        held = [
            load_and_preprocess(list_images(s), target_size=SIZE).images
            for s in sorted(synth.main(root / "held", scenes=4, frames=4, seed=99, size=(112, 84)).glob("scene_*"))
        ]
        refs = [last_tokens(base, x) for x in held]
        k = args.clusters * args.per_cluster
        res: dict[str, list[float]] = {"nfds": [], "random": []}
        noise_picked = []
        for seed in range(args.seeds):
            out = nfds.main(
                base,
                [pool],
                root / f"sel{seed}.parquet",
                frames=4,
                n_clusters=args.clusters,
                per_cluster=args.per_cluster,
                seed=seed,
                overwrite=True,
            )
            rows = nfds.read_manifest(out)
            rng = np.random.default_rng(seed)
            rand_ids = set(rng.choice(len(rows), size=k, replace=False).tolist())
            noise_picked.append(sum("noise" in rows[i]["sample_id"] for i in rand_ids))
            arms = {
                "nfds": nfds.load_selected(out, image_size=SIZE),
                "random": [
                    {
                        "id": rows[i]["sample_id"],
                        "images": nfds.load_candidate(
                            nfds.Candidate(
                                rows[i]["sample_id"], rows[i]["scene"], rows[i]["group"], tuple(rows[i]["frames"])
                            ),
                            SIZE,
                        ),
                    }
                    for i in sorted(rand_ids)
                ],
            }
            for arm, calib in arms.items():
                q = copy.deepcopy(base)
                quantize_(q, get_recipe("quantvggt-w4a4", epochs=args.epochs, seed=seed), calib)
                err = float(np.mean([float((last_tokens(q, x) - r).norm() / r.norm()) for x, r in zip(held, refs)]))
                res[arm].append(err)
            print(
                f"seed {seed}: nfds {res['nfds'][-1]:.4f}  random {res['random'][-1]:.4f}  "
                f"(noise scenes in random subset: {noise_picked[-1]})",
                flush=True,
            )
        print(
            f"\npool: {args.scenes} synthetic + {args.noise} noise scenes; {k} samples per calibration set; "
            f"quantvggt-w4a4, {args.epochs} epochs"
        )
        print("| calibration set | mean rel. error | std | min | max |")
        print("|---|---|---|---|---|")
        for arm, v in res.items():
            print(f"| {arm} | {statistics.mean(v):.4f} | {statistics.pstdev(v):.4f} | {min(v):.4f} | {max(v):.4f} |")


if __name__ == "__main__":
    main()
