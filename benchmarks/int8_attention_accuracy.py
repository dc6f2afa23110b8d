"""Accuracy of INT8 attention: Table 1 rows with and without it, and per-layer attention error on VGGT-1B's shapes.

    python benchmarks/int8_attention_accuracy.py runs/int8-attention                 # both parts
    python benchmarks/int8_attention_accuracy.py OUT --epochs 5 --skip-1b           # faster: tiny model only

Part 1, the shipped small model (``vggt-tiny-synthetic``) on the Table 1 evaluation set (``runs/evalset`` if it
exists, else rendered as ``quantvggt synth OUT/evalset --scenes 10 --frames 8 --seed 0``), rows:

* ``fp`` and ``fp+int8attn``: the float model with exact / INT8 frame+global attention;
* ``quantvggt-w4a4`` and ``quantvggt-w4a4+int8attn``: one QuantVGGT W4A4 quantization (NFDS calibration, 5 clusters
  x 4, over ``runs/eval-scopes/calibration-pool`` if it exists, else a fresh 40-scene pool, seed 7, as
  ``quantvggt evaluate`` does), run with exact / INT8 attention. The linears are calibrated once, with exact
  attention, so the two rows differ only in the attention.

Metrics: pose AUC@30/@15, depth abs-rel and delta1 against ground truth (:func:`quantvggt.evaluate.scene_metrics`),
and agreement with the ``fp`` row's predictions on the same scene: pose AUC@30 with fp's poses as ground truth, mean
relative rotation / translation-direction difference (degrees), median relative depth difference (as
``flows/demo.py``'s ``agreement``).

Part 2, the VGGT-1B aggregator with seeded weights (``torch.manual_seed(0)``), ``--arch-frames`` frames at
``--arch-side`` px (frames of the first evaluation scene, resized): every frame and global attention call is run
exactly (the forward continues with exact outputs, so errors do not compound) and also through the INT8 reference
(with and without K smoothing) and bf16 SDPA; the relative Frobenius error of each against exact fp32 attention is
written per layer. Same for the tiny model on the first evaluation scene.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from quantvggt import synth
from quantvggt.eval import pose_metrics, relative_pose_errors
from quantvggt.evaluate import eval_scenes, scene_metrics
from quantvggt.lowbit.attention import int8_attention_ref
from quantvggt.model import load_vggt
from quantvggt.model.aggregator import Aggregator, set_attention
from quantvggt.model.layers import Attention
from quantvggt.prediction import ScenePrediction
from quantvggt.reconstruct import ReconstructionOptions, reconstruct_scene

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("int8_attention_accuracy")


def agreement(pred: ScenePrediction, fp: ScenePrediction) -> dict[str, float]:
    """How closely a row's prediction follows the float model's on one scene."""
    r, t = relative_pose_errors(pred.extrinsics, fp.extrinsics)
    rel = np.abs(pred.depth - fp.depth) / np.maximum(np.abs(fp.depth), 1e-6)
    return {
        "auc@30_vs_fp": pose_metrics(pred.extrinsics, fp.extrinsics)["auc@30"],
        "rot_diff_deg": float(r.mean()),
        "trans_diff_deg": float(t.mean()),
        "depth_rel_diff": float(np.median(rel)),
    }


def table_rows(out: Path, scenes: list[Path], pool: Path, epochs: int | None, seed: int) -> list[dict]:
    """Part 1: the four rows on the evaluation set."""
    from quantvggt.calib import nfds
    from quantvggt.quant import get_recipe, quantize_

    base = load_vggt("vggt-tiny-synthetic").eval()
    manifest = nfds.main(
        base, [pool], out / "calibration.parquet", frames=8, n_clusters=5, per_cluster=4, seed=seed, overwrite=True
    )
    calib = nfds.load_selected(manifest, image_size=base.image_size)
    q = copy.deepcopy(base)
    t0 = time.perf_counter()
    kw = {"epochs": epochs} if epochs is not None else {}
    quantize_(q, get_recipe("quantvggt-w4a4", **kw), calib)
    calib_s = time.perf_counter() - t0
    models = {
        "fp": base,
        "fp+int8attn": set_attention(copy.deepcopy(base), "int8"),
        "quantvggt-w4a4": q,
        "quantvggt-w4a4+int8attn": set_attention(copy.deepcopy(q), "int8"),
    }
    opts = ReconstructionOptions()
    fp_preds = {s: reconstruct_scene(base, s, opts) for s in scenes}
    rows = []
    for name, model in models.items():
        t0 = time.perf_counter()
        per = []
        for s in scenes:
            m = scene_metrics(model, s, opts)
            m.update(agreement(reconstruct_scene(model, s, opts), fp_preds[s]))
            per.append(m)
        row = {"row": name, "attention": model.config.aggregator.attention}
        row.update({k: float(np.mean([p[k] for p in per])) for k in per[0]})
        row["eval_s"] = time.perf_counter() - t0
        if name.startswith("quantvggt"):
            row["calibration_s"] = calib_s
        log.info("%s: AUC@30 %.3f abs-rel %.4f", name, row["auc@30"], row["abs_rel"])
        rows.append(row)
    return rows


@contextlib.contextmanager
def attention_probe(model: torch.nn.Module) -> Iterator[list[dict]]:
    """Per frame/global attention call: errors of INT8 (smoothed, unsmoothed) and bf16 SDPA vs exact fp32."""
    records: list[dict] = []
    current: list[str] = []
    exact_sdpa = F.scaled_dot_product_attention
    handles = []
    for agg in (m for m in model.modules() if isinstance(m, Aggregator)):
        for kind, blocks in (("frame", agg.frame_blocks), ("global", agg.global_blocks)):
            for i, block in enumerate(blocks):
                assert isinstance(block.attn, Attention)
                tag = f"{kind}.{i}"
                # hooks must return None: a forward hook's return value would replace the module's output
                handles.append(block.attn.register_forward_pre_hook(lambda *_, t=tag: current.append(t)))
                handles.append(block.attn.register_forward_hook(lambda *_: current.pop() and None))

    def probe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: object, **kw: object) -> torch.Tensor:
        exact = exact_sdpa(q, k, v, *a, **kw)
        if current and not a and not kw:

            def rel(x: torch.Tensor) -> float:
                return float((x.float() - exact.float()).norm() / exact.float().norm())

            bf = exact_sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
            records.append(
                {
                    "layer": current[-1],
                    "tokens": q.shape[-2],
                    "int8": rel(int8_attention_ref(q, k, v)),
                    "int8_no_smoothing": rel(int8_attention_ref(q, k, v, smooth=False)),
                    "sdpa_bf16": rel(bf),
                    "k_mean_over_std": float(k.float().mean(-2).norm() / k.float().std(-2).norm()),
                }
            )
        return exact

    F.scaled_dot_product_attention = probe  # Attention.forward looks it up at call time
    try:
        yield records
    finally:
        F.scaled_dot_product_attention = exact_sdpa
        for h in handles:
            h.remove()


def frames_of(scene: Path, n: int, size: int, square: bool) -> torch.Tensor:
    """The first ``n`` frames of a scene, preprocessed for a model of width ``size`` (``square``: resized to size^2)."""
    from quantvggt.images import load_and_preprocess

    paths = sorted(p for p in scene.iterdir() if p.suffix == ".png")[:n]
    x = load_and_preprocess(paths, "crop", size).images
    if square:  # VGGT-1B's issue shapes: 518 x 518 px = 1374 tokens per frame
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x


def per_layer(model: torch.nn.Module, images: torch.Tensor) -> list[dict]:
    """Run ``model`` (an Aggregator or a VGGT) once under :func:`attention_probe`."""
    with attention_probe(model) as records, torch.no_grad():
        model(images.unsqueeze(0) if isinstance(model, Aggregator) else images)
    return records


def summarize_layers(records: list[dict]) -> dict[str, dict[str, float]]:
    """Mean / max per attention kind."""
    out = {}
    for kind in ("frame", "global"):
        rs = [r for r in records if r["layer"].startswith(kind)]
        if rs:
            out[kind] = {
                f"{stat}_{key}": float(fn([r[key] for r in rs]))
                for key in ("int8", "int8_no_smoothing", "sdpa_bf16")
                for stat, fn in (("mean", np.mean), ("max", np.max))
            }
    return out


def markdown(res: dict) -> str:
    """The results as Markdown tables."""
    lines = []
    if res.get("rows"):
        lines += [
            "| row | attention | AUC@30 | AUC@15 | depth abs-rel | δ<1.25 | AUC@30 vs fp | rot. diff ° "
            "| transl. diff ° | depth rel. diff |",
            "|---" * 10 + "|",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['row']} | {r['attention']} | {r['auc@30']:.3f} | {r['auc@15']:.3f} | {r['abs_rel']:.4f} "
                f"| {r['delta1']:.3f} | {r['auc@30_vs_fp']:.3f} | {r['rot_diff_deg']:.3f} | {r['trans_diff_deg']:.3f} "
                f"| {r['depth_rel_diff']:.2e} |"
            )
    for arch in ("tiny", "1b"):
        recs = res.get(f"layers_{arch}")
        if not recs:
            continue
        lines += ["", f"Per-layer attention output, relative error vs exact fp32 ({arch}):", ""]
        lines += [
            "| layer | tokens | int8 | int8 without K smoothing | bf16 SDPA | ‖mean K‖/‖std K‖ |",
            "|---" * 6 + "|",
        ]
        for r in recs:
            lines.append(
                f"| {r['layer']} | {r['tokens']} | {r['int8']:.2e} | {r['int8_no_smoothing']:.2e} "
                f"| {r['sdpa_bf16']:.2e} | {r['k_mean_over_std']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    """Parse arguments, run both parts, write ``results.json`` and ``results.md`` into OUT."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--scenes", default=str(REPO / "runs" / "evalset"), help="evaluation set (rendered if missing)")
    p.add_argument("--pool", default=str(REPO / "runs" / "eval-scopes" / "calibration-pool"))
    p.add_argument("--epochs", type=int, default=None, help="QuantVGGT block-reconstruction epochs (default: 15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-table", action="store_true")
    p.add_argument("--skip-1b", action="store_true")
    p.add_argument("--arch-frames", type=int, default=2)
    p.add_argument("--arch-side", type=int, default=518)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scenes_root = Path(args.scenes)
    if not scenes_root.exists():
        scenes_root = synth.main(out / "evalset", scenes=10, frames=8, seed=0, size=(224, 168))
    scenes = eval_scenes(scenes_root)
    pool = Path(args.pool)
    if not pool.exists():
        pool = synth.main(out / "calibration-pool", scenes=40, frames=8, seed=7, size=(224, 168))
    res: dict = {"scenes": [str(s) for s in scenes], "pool": str(pool), "epochs": args.epochs or 15}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(res, indent=1))
        (out / "results.md").write_text(markdown(res))

    t0 = time.perf_counter()
    tiny = load_vggt("vggt-tiny-synthetic").eval()
    res["layers_tiny"] = per_layer(tiny, frames_of(scenes[0], 8, tiny.image_size, False))
    res["layers_tiny_summary"] = summarize_layers(res["layers_tiny"])
    save()
    if not args.skip_table:
        res["rows"] = table_rows(out, scenes, pool, args.epochs, args.seed)
        res["table_s"] = time.perf_counter() - t0
        save()
    if not args.skip_1b:
        from quantvggt.model import AggregatorConfig

        t1 = time.perf_counter()
        torch.manual_seed(0)
        agg = Aggregator(AggregatorConfig()).eval()
        res["layers_1b"] = per_layer(agg, frames_of(scenes[0], args.arch_frames, args.arch_side, True))
        res["layers_1b_summary"] = summarize_layers(res["layers_1b"])
        res["arch"] = {"frames": args.arch_frames, "side": args.arch_side, "seconds": time.perf_counter() - t1}
        del agg
        save()
    print(markdown(res))
    print(json.dumps({k: v for k, v in res.items() if k.endswith("summary")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
