"""Plot the camera loss of consecutive training stages against training samples seen (docs/train_stages.png).

    python benchmarks/plot_training.py OUT.png LOG.jsonl:BATCH:LABEL[:MAX_STEP] ... \
        [--val VAL.jsonl:OFFSET_SAMPLES:BATCH]

Each stage starts where the previous one stopped (x = cumulative samples); ``--val`` adds a run's held-out
validation (camera L1 of the last refinement next to the best constant guess).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    """Parse the stage list and write the PNG."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("stages", nargs="+")
    ap.add_argument("--val", action="append", default=[])
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for spec in args.stages:
        path, batch, label, *cap = spec.split(":")
        rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        if cap:
            rows = [r for r in rows if r["step"] <= int(cap[0])]
        xs = [offset + r["step"] * int(batch) for r in rows]
        ax.plot(xs, [r["camera"] for r in rows], label=f"{label} (train, batch {batch})", lw=0.8)
        offset = xs[-1]
    ax2 = ax.twinx()
    for spec in args.val:
        path, start, batch = spec.split(":")
        rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        xs = [int(start) + r["step"] * int(batch) for r in rows]
        ax2.plot(xs, [r["val_camera"] for r in rows], "k.-", label="held-out camera L1")
        ax2.plot(xs, [r["val_camera_const"] for r in rows], "k--", label="held-out, best constant pose")
    ax2.set_ylabel("held-out camera L1 (last iteration)")
    ax2.set_ylim(bottom=0)
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("camera loss (train, all iterations)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)


if __name__ == "__main__":
    main()
