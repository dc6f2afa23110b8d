"""The paper's Table 1 on our model: float vs quantization recipes on a synthetic evaluation set with ground truth."""

from __future__ import annotations

import copy
import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantvggt import eval as ev
from quantvggt.fsutil import atomic_write_text
from quantvggt.geometry import unproject_depth
from quantvggt.quant.sensitivity import BudgetUnreachableError
from quantvggt.reconstruct import ReconstructionOptions, reconstruct_scene
from quantvggt.synth import load_gt

log = logging.getLogger(__name__)

DEFAULT_RECIPES = (
    "fp",
    "rtn-w8a8",
    "smoothquant-w8a8",
    "quarot-w8a8",
    "quantvggt-w8a8",
    "rtn-w4a4",
    "smoothquant-w4a4",
    "quarot-w4a4",
    "quantvggt-w4a4",
    "quantvggt-w4a16",
)


def _gt_at_model_pixels(gt_depth: np.ndarray, pred: Any, i: int) -> np.ndarray:
    """Ground-truth depth sampled (nearest) at the model pixel centres of frame ``i``; 0 outside the image."""
    H, W = pred.depth.shape[1:]
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    xy = pred.transforms[i].to_original(np.stack([u, v], -1))
    x, y = np.floor(xy[..., 0]).astype(int), np.floor(xy[..., 1]).astype(int)
    h, w = gt_depth.shape
    ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    out = np.zeros((H, W), np.float64)
    out[ok] = gt_depth[y[ok], x[ok]]
    return out


def scene_metrics(model: torch.nn.Module, scene: Path, options: ReconstructionOptions) -> dict[str, float]:
    """Pose AUCs, depth abs-rel / delta1 and point accuracy for one synthetic scene."""
    return prediction_metrics(reconstruct_scene(model, scene, options), scene)


def prediction_metrics(pred: Any, scene: Path) -> dict[str, float]:
    """:func:`scene_metrics` of a prediction already made for ``scene`` (a ``ScenePrediction``)."""
    gt = load_gt(scene)
    idx = [gt["names"].index(n) for n in pred.names]
    out = ev.pose_metrics(pred.extrinsics, gt["extrinsics"][idx])
    gt_d = np.stack([_gt_at_model_pixels(gt["depth"][j], pred, i) for i, j in enumerate(idx)])
    out.update(ev.depth_metrics(pred.depth.astype(np.float64), gt_d))
    # gt points at the same pixels, from gt depth and gt cameras expressed in model pixels
    K_gt = np.stack([pred.transforms[i].intrinsics_to_model(gt["intrinsics"][j]) for i, j in enumerate(idx)])
    gt_pts = unproject_depth(
        torch.from_numpy(gt_d), torch.from_numpy(gt["extrinsics"][idx]), torch.from_numpy(K_gt), pixel_offset=0.5
    ).numpy()
    pr_pts = unproject_depth(
        torch.from_numpy(pred.depth).double(),
        torch.from_numpy(pred.extrinsics),
        torch.from_numpy(pred.intrinsics),
        pixel_offset=0.5,
    ).numpy()
    valid = gt_d > 0
    pm = ev.point_metrics(pr_pts[valid], gt_pts[valid], max_points=5000)
    scale = np.linalg.norm(gt_pts[valid] - gt_pts[valid].mean(0), axis=1).mean()  # report relative to the scene extent
    out.update(point_accuracy=pm["accuracy"] / scale, point_completeness=pm["completeness"] / scale)
    return out


def evaluate_model(
    model: torch.nn.Module, scenes: Sequence[Path], options: ReconstructionOptions | None = None
) -> dict[str, float]:
    """Mean of :func:`scene_metrics` over ``scenes``."""
    options = options or ReconstructionOptions()
    per = [scene_metrics(model, s, options) for s in scenes]
    return {k: float(np.mean([p[k] for p in per])) for k in per[0]}


def eval_scenes(root: str | Path) -> list[Path]:
    """Scene folders under ``root`` that have ground truth (``gt/cameras.json``)."""
    root = Path(root)
    found = sorted(p.parent.parent for p in root.glob("*/gt/cameras.json"))
    if (root / "gt" / "cameras.json").is_file():
        found = [root]
    if not found:
        raise ValueError(f"{root}: no synthetic scenes with ground truth (gt/cameras.json) found")
    return found


def main(
    model_loader: Callable[[], torch.nn.Module],
    scenes_root: str | Path,
    out: str | Path,
    recipes: Sequence[str] = DEFAULT_RECIPES,
    calibration: list[dict] | None = None,
    recipe_overrides: dict[str, dict] | None = None,
    options: ReconstructionOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """Evaluate every recipe; write ``table.md``, ``table.csv``, ``results.json`` and ``auc.png`` into ``out``.

    Rows already in ``out/results.json`` for the same scenes are reused unless ``overwrite``: a long table that was
    interrupted resumes where it stopped.
    """
    from quantvggt.quant import get_recipe, quantize_
    from quantvggt.quant.api import bytes_at_16bit

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = eval_scenes(scenes_root)
    base = model_loader()
    fp16_bytes = bytes_at_16bit(base)
    done = {} if overwrite else _previous_rows(out / "results.json", scenes)
    results = []
    sensitivity: dict[tuple[str, ...], dict] = {}  # per scope: the probe does not depend on the method
    for name in recipes:
        if name in done:
            log.info("%s: measured before (results.json), reused", name)
            results.append(done[name])
            continue
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        if name != "fp":
            recipe, scope, budget = parse_recipe_spec(name)
            kw = dict((recipe_overrides or {}).get(recipe.split("-")[0], {}))
            if scope:
                kw["scope"] = scope
            config = get_recipe(recipe, **kw)
            if budget is not None:
                try:
                    config = _mixed(model, config, calibration or [], budget, sensitivity)
                except BudgetUnreachableError as e:  # a row of the table, not the end of a long evaluation
                    log.warning("%s: %s", name, e)
                    results.append({"recipe": name, "error": str(e)})
                    _write_results(out, scenes, results)
                    continue
            rep = quantize_(model, config, calibration)
            nbytes, ratio = rep.bytes_16bit, rep.compression_vs_fp16
        else:
            nbytes, ratio = fp16_bytes, 1.0
        calib_s = time.perf_counter() - t0
        metrics = evaluate_model(model, scenes, options)
        row = {"recipe": name, **metrics, "bytes_16bit": nbytes, "compression_vs_fp16": ratio, "calibration_s": calib_s}
        log.info("%s: AUC@30 %.3f (%.2fx smaller than fp16)", name, metrics["auc@30"], ratio)
        results.append(row)
        _write_results(out, scenes, results)  # after every row: a long evaluation that dies keeps what it measured
    cols = [
        "recipe",
        "auc@30",
        "auc@15",
        "auc@5",
        "auc@3",
        "abs_rel",
        "delta1",
        "point_accuracy",
        "bytes_16bit",
        "compression_vs_fp16",
    ]
    unreachable = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    with (out / "table.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    fp_auc = next((r["auc@30"] for r in results if r["recipe"] == "fp"), None)
    lines = [
        "| recipe | AUC@30 | AUC@15 | AUC@5 | AUC@3 | depth abs-rel | δ<1.25 | point acc. "
        "| MB (16-bit floats) | x vs fp16 |" + (" % of FP AUC@30 |" if fp_auc is not None else ""),
        "|---" * (10 + (fp_auc is not None)) + "|",
    ]
    for r in results:
        line = (
            f"| {r['recipe']} | {r['auc@30']:.3f} | {r['auc@15']:.3f} | {r['auc@5']:.3f} | {r['auc@3']:.3f} "
            f"| {r['abs_rel']:.3f} | {r['delta1']:.3f} | {r['point_accuracy']:.3f} | {r['bytes_16bit'] / 1e6:.2f} "
            f"| {r['compression_vs_fp16']:.2f} |"
        )
        if fp_auc is not None:
            line += f" {100 * r['auc@30'] / fp_auc:.1f} |" if fp_auc > 0 else " n/a |"
        lines.append(line)
    lines += ["", *(f"- {r['recipe']}: not measured, {r['error']}" for r in unreachable)] if unreachable else []
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _bar_chart(results, out / "auc.png")
    _size_chart(results, out / "size_vs_auc.png")
    return out


def _write_results(out: Path, scenes: Sequence[Path], results: list[dict]) -> None:
    atomic_write_text(
        out / "results.json", json.dumps({"scenes": [str(s) for s in scenes], "results": results}, indent=1)
    )


def _previous_rows(path: Path, scenes: Sequence[Path]) -> dict[str, dict]:
    """Rows of an earlier run over the same scenes, by recipe; none when the file is absent or for other scenes."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s: unreadable, every row is measured again", path)
        return {}
    if data.get("scenes") != [str(s) for s in scenes]:
        log.info("%s: another evaluation set, every row is measured again", path)
        return {}
    return {r["recipe"]: r for r in data.get("results", [])}


def parse_recipe_spec(spec: str) -> tuple[str, tuple[str, ...] | None, float | None]:
    """``recipe[@scope+scope...][@3.5x]`` -> (recipe, scope or None, mixed-precision budget or None).

    E.g. ``quantvggt-w4a4@aggregator+camera_head+dpt_heads@3.6x``: QuantVGGT over those parts with per-layer
    widths chosen by sensitivity until the model is 3.6x smaller than fp16.
    """
    recipe, *parts = spec.split("@")
    scope: tuple[str, ...] | None = None
    budget: float | None = None
    for part in parts:
        if part.lower().endswith("x"):
            try:
                budget = float(part[:-1])
            except ValueError as e:
                raise ValueError(f"{spec}: budget {part!r} is not a number followed by x") from e
        elif part:
            scope = tuple(part.split("+"))
    return recipe, scope, budget


def _mixed(model: torch.nn.Module, config: Any, calibration: list, budget: float, cache: dict) -> Any:
    import dataclasses

    from quantvggt.quant.calibrate import as_batch
    from quantvggt.quant.sensitivity import choose_bits, layer_sensitivity

    if config.scope not in cache:
        batches = [as_batch(c["images"] if isinstance(c, dict) else c) for c in calibration]
        cache[config.scope] = layer_sensitivity(model.eval(), config, batches)
    bits = choose_bits(model, config, cache[config.scope], budget=budget)
    return dataclasses.replace(config, layer_bits=bits.layer_bits)


def _size_chart(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    methods = ["fp", "rtn", "smoothquant", "quarot", "quantvggt"]
    acts = {"a4": "o", "a8": "s", "a16": "D", "fp": "o"}  # marker by activation width: the accuracy lever at 4 bits
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in results:
        recipe, *_ = parse_recipe_spec(r["recipe"])
        method = recipe.split("-")[0]
        act = "fp" if recipe == "fp" else recipe.rsplit("a", 1)[-1].join(("a", ""))
        mixed = r["recipe"].endswith("x") and "@" in r["recipe"]
        ax.scatter(
            r["compression_vs_fp16"],
            r["auc@30"],
            marker=acts.get(act, "o"),
            s=70 if mixed else 30,
            facecolors="none" if mixed else f"C{methods.index(method) if method in methods else 9}",
            edgecolors=f"C{methods.index(method) if method in methods else 9}",
            linewidths=1.5,
        )
    handles = [Line2D([], [], ls="", marker="o", color=f"C{i}", label=m) for i, m in enumerate(methods)]
    handles += [Line2D([], [], ls="", marker=mk, color="gray", label=f"w*{a}") for a, mk in acts.items() if a != "fp"]
    handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="gray", ms=9, label="mixed precision (hollow)"))
    ax.legend(handles=handles, fontsize=8, ncol=2)
    ax.set_xlabel("x smaller than fp16 (whole model)")
    ax.set_ylabel("pose AUC@30")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _bar_chart(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = [r["recipe"] for r in results]
    x = np.arange(len(names))
    for _k, (key, wdt) in enumerate((("auc@30", -0.3), ("auc@15", -0.1), ("auc@5", 0.1), ("auc@3", 0.3))):
        ax.bar(x + wdt, [r[key] for r in results], width=0.2, label=key.upper())
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUC")
    ax.legend(ncol=4, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
