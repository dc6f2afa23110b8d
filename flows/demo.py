"""The main job on embedded defaults: synthetic scenes -> quantize flow -> reconstruct flow on local Ray -> summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from quantvggt import synth
from quantvggt.eval import relative_pose_errors
from quantvggt.evaluate import prediction_metrics
from quantvggt.manifest import read_manifest
from quantvggt.quant.load import load_model
from quantvggt.reconstruct import ReconstructionOptions, reconstruct_scene
from quantvggt.storage import open_storage, split_uri

DEFAULT_MODEL = "vggt-tiny-synthetic"
log = logging.getLogger(__name__)


def agreement(a: Any, b: Any) -> dict[str, float]:
    """How closely prediction ``b`` (4-bit) follows ``a`` (float) on a scene: pose angle differences, depth abs-rel."""
    r, t = relative_pose_errors(b.extrinsics, a.extrinsics)
    rel = np.abs(b.depth - a.depth) / np.maximum(np.abs(a.depth), 1e-6)
    return {"rot_diff_deg": float(r.mean()), "trans_diff_deg": float(t.mean()), "depth_rel_diff": float(np.median(rel))}


def main(
    out: str = "demo-out",
    model: str = DEFAULT_MODEL,
    scenes: int = 3,
    frames: int = 8,
    recipe: str = "quantvggt-w4a8",
    workers: int = 2,
    epochs: int = 5,
) -> dict[str, Any]:
    """Run the whole pipeline locally and print where everything is."""
    from flows.quantize import quantize
    from flows.reconstruct import ScenesFailedError, reconstruct

    root = Path(out).resolve()
    inbox = synth.main(root / "inbox", scenes=scenes, frames=frames, seed=42, size=(224, 168))
    pool = synth.main(root / "calibration-pool", scenes=8, frames=frames, seed=7, size=(224, 168))
    print(f"[1/4] synthetic scenes in {inbox} (+ calibration pool {pool})")
    ckpt = quantize(
        model=model,
        calibration_pool=[str(pool)],
        recipe=recipe,
        seed=0,
        out=str(root / "store"),
        frames=frames,
        clusters=3,
        per_cluster=2,
        epochs=epochs,
    )
    print(f"[2/4] quantized checkpoint: {ckpt}")
    opts = {"max_points": 20000}
    failure: ScenesFailedError | None = None
    try:
        manifest = reconstruct(
            scenes=[str(inbox)],
            checkpoint=ckpt,
            out=str(root / "reconstructions"),
            options=opts,
            batch={"num_workers": workers},
        )
    except ScenesFailedError as e:  # the summary below still shows every scene, the failed ones with their errors
        manifest, failure = e.manifest, e
    print(f"[3/4] reconstructions written; manifest {manifest}")
    results = read_manifest(*split_uri(manifest))
    fm, qm = load_model(model), load_model(ckpt)
    meta = json.loads((Path(ckpt) / "quant.json").read_text())
    # Table 1's metrics (quantvggt evaluate) against the synthetic scenes' ground truth, float and 4-bit side by side
    lines = [
        "| scene | status | images | points | seconds | AUC@30 float | AUC@30 4-bit | depth abs-rel float | 4-bit "
        "| float-vs-4bit rot diff (deg) | trans diff (deg) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok_metrics: list[tuple[dict[str, float], dict[str, float]]] = []
    for r in results:
        cells = "- | - | - | - | - | -"
        if r.ok:
            ro, scene = ReconstructionOptions(**opts), inbox / r.scene
            pf, pq = reconstruct_scene(fm, scene, ro), reconstruct_scene(qm, scene, ro)  # each model once per scene
            mf, mq, ag = prediction_metrics(pf, scene), prediction_metrics(pq, scene), agreement(pf, pq)
            ok_metrics.append((mf, mq))
            cells = (
                f"{mf['auc@30']:.3f} | {mq['auc@30']:.3f} | {mf['abs_rel']:.3f} | {mq['abs_rel']:.3f} "
                f"| {ag['rot_diff_deg']:.2f} | {ag['trans_diff_deg']:.2f}"
            )
        lines.append(f"| {r.scene} | {r.status} | {r.images} | {r.points} | {r.seconds:.1f} | {cells} |")
    if ok_metrics:
        af, aq = (float(np.mean([m[k]["auc@30"] for m in ok_metrics])) for k in (0, 1))
        lines.append(f"| mean | | | | | {af:.3f} | {aq:.3f} ({aq / max(af, 1e-9):.0%} of float) | | | | |")
    print("[4/4] summary\n" + "\n".join(lines))
    rep = meta.get("report", {})
    print(
        f"\nmodel {model}, recipe {recipe}: {rep.get('compression_vs_fp16', 0):.2f}x smaller than fp16 "
        f"({rep.get('bytes_16bit', 0) / 1e6:.2f} MB vs {rep.get('fp16_bytes', 0) / 1e6:.2f} MB)"
    )
    first = root / "reconstructions" / results[0].scene if results else root / "reconstructions"
    print(
        f"\nOutputs: {root / 'reconstructions'}/<scene>/sparse/0 (COLMAP binary) + report.json; "
        f"manifests in {root / 'reconstructions' / '_manifests'}"
    )
    print("Open one in COLMAP:")
    print(f"  colmap gui --import_path {first / 'sparse' / '0'} --image_path {inbox / first.name}")
    print(f"  colmap model_analyzer --path {first / 'sparse' / '0'}")
    print(f"Picture of it: {first / 'preview.png'}")
    if failure is not None:
        raise failure
    store = open_storage(root / "reconstructions")
    return {
        "manifest": manifest,
        "checkpoint": ckpt,
        "rows": [r.to_row() for r in results],
        "complete": [r.scene for r in results if store.is_complete(r.scene)],
    }
