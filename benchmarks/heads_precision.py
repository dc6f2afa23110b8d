"""bf16 vs fp32 heads (upstream runs the camera/DPT heads in fp32): accuracy on the parity fixture and the small model.

    python benchmarks/heads_precision.py [--scenes runs/evalset]

Prints max relative error against the upstream outputs of tests/fixtures/vggt-tiny-parity for each heads precision,
and pose AUC@30 / depth abs-rel of the shipped vggt-tiny-synthetic on the evaluation set (bf16 via CPU autocast
here; on a GPU the same switch runs the heads under CUDA bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from quantvggt.evaluate import eval_scenes, evaluate_model
from quantvggt.model import load_vggt
from quantvggt.model.loading import config_from_json
from quantvggt.reconstruct import ReconstructionOptions

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vggt-tiny-parity"


def main() -> None:
    """Parity-fixture errors and small-model metrics per heads precision."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", default="runs/evalset", help="evaluation set from `quantvggt synth`")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    cfg = config_from_json(json.loads((FIXTURE / "config.json").read_text()))
    parity = load_vggt(str(FIXTURE / "weights.safetensors"), config=cfg)
    x = torch.from_numpy(np.load(FIXTURE / "inputs.npz")["images"])
    ref = np.load(FIXTURE / "outputs.npz")
    small = load_vggt("vggt-tiny-synthetic")
    scenes = eval_scenes(args.scenes)
    print("| heads | parity max rel. err (pose_enc / depth / world_points) | AUC@30 | AUC@15 | depth abs-rel |")
    print("|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        parity.heads_precision = small.heads_precision = precision
        with torch.no_grad():
            out = parity(x)
        errs = [
            float(np.abs(out[k].numpy() - ref[k]).max() / np.abs(ref[k]).max())
            for k in ("pose_enc", "depth", "world_points")
        ]
        m = evaluate_model(small, scenes, ReconstructionOptions())
        print(
            f"| {precision} | {' / '.join(f'{e:.1e}' for e in errs)} | {m['auc@30']:.3f} | {m['auc@15']:.3f} "
            f"| {m['abs_rel']:.4f} |"
        )


if __name__ == "__main__":
    main()
