"""Noise-Filtered Diverse Sampling (NFDS): choose calibration samples by deep-layer statistics and frame clustering.

1. Candidate pool: one sample (K frames, seeded) per scene folder; a scene's group is its parent folder
   (or a manifest column).
2. Statistics (:func:`sample_stats`, a pure function of one sample): mean and std of the input of ``norm1`` in
   the last few frame and global blocks, and a frame-aware feature: cosine similarities of frames 1..K-1 to frame 0
   in the last aggregator layer (special tokens kept, patch tokens mean-pooled).
3. Selection (:func:`select`, a pure function of the rows): per group and layer, a sample is an outlier when its mean
   or std leaves ``[Q1 - 1.5 IQR, Q3 + 1.5 IQR]`` (groups under 4 samples are not filtered); the inliers are
   clustered with KMeans and ``per_cluster`` samples are drawn from every cluster, topped up from the rest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantvggt.fsutil import atomic_file, check_output_file
from quantvggt.images import ImageLoadError, list_images, load_and_preprocess, pick_frames, readable_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One calibration candidate: ``frames`` of scene folder ``scene`` in group ``group``."""

    sample_id: str
    scene: str
    group: str
    frames: tuple[str, ...]


def _scene_folders(path: Path, seen: set[Path] | None = None) -> list[Path]:
    """Folders holding images, found recursively (a scene folder's own subfolders are not searched).

    A folder is searched once: a symlinked folder that resolves to one already seen or to an ancestor (a loop such
    as ``selfloop -> .``, which used to repeat every scene ~40 times) is skipped with a warning.
    """
    seen = set() if seen is None else seen
    real = path.resolve()
    if real in seen:
        log.warning("NFDS pool: %s is %s, already searched; skipped", path, real)
        return []
    seen.add(real)
    try:
        if list_images(path):
            return [path]
        children = sorted(path.iterdir())
    except OSError as e:
        log.warning("NFDS pool: cannot read %s (%s); skipped", path, e)
        return []
    out: list[Path] = []
    for p in children:
        if not p.is_dir() or p.name.startswith("."):
            continue
        if p.is_symlink() and (p.resolve() == real or p.resolve() in real.parents):
            log.warning("NFDS pool: %s links to %s, a folder above it; not followed", p, p.resolve())
            continue
        out += _scene_folders(p, seen)
    return out


def _manifest_path(value: str, manifest: Path) -> Path:
    """A path column of a manifest: absolute as written, relative ones against the manifest's folder.

    Manifests written before paths were stored absolute hold paths relative to the folder they were written from;
    those still resolve when run from there.
    """
    p = Path(value)
    if p.is_absolute():
        return p
    beside = Path(os.path.abspath(manifest.parent / p))
    return beside if beside.exists() or not p.exists() else Path(os.path.abspath(p))


def _read_table(path: Path, required: Sequence[str], what: str) -> list[dict[str, Any]]:
    """Rows of a CSV/Parquet manifest, with one-line errors naming the file and any missing columns."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        table = pcsv.read_csv(path) if path.suffix == ".csv" else pq.read_table(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what}") from None
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot read the {what} ({type(e).__name__}: {e})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: the {what} has no column {', '.join(map(repr, missing))}"
            f" (it has {', '.join(map(repr, table.column_names)) or 'none'})"
        )
    return table.to_pylist()


def _check_counts(**counts: Any) -> None:
    """Refuse counts that are not whole numbers >= their minimum (``frames=(value, 2)``), naming the option."""
    for key, (value, least) in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{key} must be a whole number >= {least}, got {value!r}")


def candidate_pool(
    pool: Sequence[str | Path], frames: int = 10, seed: int = 0, group_column: str = "group"
) -> list[Candidate]:
    """Candidates from scene folders, folders of scene folders, or a CSV/Parquet manifest (``scene`` [+ group]).

    Scene paths are stored absolute; relative ``scene`` entries of a pool manifest are relative to its folder.
    """
    _check_counts(frames=(frames, 2))  # one frame has no frame-similarity feature to cluster on
    scenes: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for item in pool:
        p = Path(item)
        if p.suffix in (".csv", ".parquet"):
            for r in _read_table(p, ["scene"], "pool manifest"):
                scene = _manifest_path(str(r["scene"]), p)
                scenes.append((scene, str(r.get(group_column) or scene.parent.name)))
        elif p.is_dir():
            scenes += [(Path(os.path.abspath(s)), s.parent.name) for s in _scene_folders(p, seen)]
        else:
            raise ValueError(f"{p}: not a folder or a .csv/.parquet manifest")
    out = []
    for i, (scene, group) in enumerate(scenes):
        if not scene.is_dir():
            log.warning("NFDS pool: %s is not a folder; not a candidate", scene)
            continue
        names = [img.name for img in readable_images(scene)[0]]  # never raises: bad files are skipped, logged
        if len(names) < 2:
            log.warning("NFDS pool: %s has fewer than 2 readable images; not a candidate", scene)
            continue
        idx = pick_frames(len(names), frames, seed=seed * 7919 + i)
        chosen = tuple(names[j] for j in idx)
        out.append(Candidate(f"{scene.name}#{seed}", str(scene), group, chosen))
    return out


def load_candidate(c: Candidate, image_size: int = 518, mode: str = "crop") -> torch.Tensor:
    """The candidate's frames preprocessed for the model: ``[K, 3, H, W]``."""
    return load_and_preprocess([Path(c.scene) / f for f in c.frames], mode=mode, target_size=image_size).images  # type: ignore[arg-type]


def stat_layers(model: torch.nn.Module, last: int = 4) -> list[str]:
    """Names of the ``norm1`` modules of the last ``last`` frame and global blocks."""
    depth = model.aggregator.cfg.depth
    return [
        f"aggregator.{kind}_blocks.{i}.norm1"
        for kind in ("frame", "global")
        for i in range(max(0, depth - last), depth)
    ]


@torch.no_grad()
def sample_stats(model: torch.nn.Module, images: torch.Tensor, layers: list[str] | None = None) -> dict[str, Any]:
    """Deep-layer statistics and the frame-similarity feature of one sample (pure: same input, same output)."""
    layers = layers or stat_layers(model)
    seen: dict[str, tuple[float, float]] = {}
    hooks = []
    for name in layers:

        def hook(mod: torch.nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].float()
            seen[name] = (float(x.mean()), float(x.std()))

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        x = images if images.dim() == 5 else images[None]
        tokens, psi = model.aggregator(x, keep_layers=[-1])
    finally:
        for h in hooks:
            h.remove()
    last = tokens[-1][0]  # [S, P, 2C]
    desc = torch.cat([last[:, :psi].flatten(1), last[:, psi:].mean(1)], dim=-1)  # special tokens kept, patches pooled
    desc = torch.nn.functional.normalize(desc, dim=-1)
    feature = (desc[1:] @ desc[0]).tolist()
    return {
        "layer_mean": [seen[n][0] for n in layers],
        "layer_std": [seen[n][1] for n in layers],
        "layers": layers,
        "feature": feature,
    }


def iqr_outliers(values: np.ndarray, k: float = 1.5) -> np.ndarray:
    """Boolean mask of values outside ``[Q1 - k IQR, Q3 + k IQR]``."""
    q1, q3 = np.percentile(values, [25, 75])
    iqr = q3 - q1
    return (values < q1 - k * iqr) | (values > q3 + k * iqr)


def _fixed_length(features: list[list[float]]) -> np.ndarray:
    n = max(len(f) for f in features)
    # samples with fewer frames are padded with their own mean similarity
    return np.array([f + [float(np.mean(f)) if f else 0.0] * (n - len(f)) for f in features])


def select(
    rows: list[dict[str, Any]],
    n_clusters: int = 5,
    per_cluster: int = 4,
    seed: int = 0,
    n_init: int = 10,
    filter_outliers: bool = True,
) -> list[dict[str, Any]]:
    """Mark outliers (with reasons), cluster inliers, and mark the selected samples. Rows are copied, not mutated."""
    from sklearn.cluster import KMeans

    # --clusters 0 selected nothing and wrote an empty selection with exit 0
    _check_counts(n_clusters=(n_clusters, 1), per_cluster=(per_cluster, 1), n_init=(n_init, 1))
    rows = [dict(r, outlier=False, outlier_reason="", cluster=-1, selected=False) for r in rows]
    if filter_outliers:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r["group"], []).append(i)
        for g, idx in groups.items():
            if len(idx) < 4:
                continue
            n_layers = len(rows[idx[0]]["layer_mean"])
            for li in range(n_layers):
                for stat in ("layer_mean", "layer_std"):
                    vals = np.array([rows[i][stat][li] for i in idx])
                    for i, bad in zip(idx, iqr_outliers(vals)):
                        if bad:
                            rows[i]["outlier"] = True
                            value = f"{stat.split('_')[1]}={rows[i][stat][li]:.4g}"
                            reason = f"{rows[i]['layers'][li]} {value} outside IQR fence of group {g}"
                            rows[i]["outlier_reason"] = "; ".join(filter(None, [rows[i]["outlier_reason"], reason]))
        for r in rows:
            if r["outlier"]:
                log.info("NFDS: dropping %s (%s)", r["sample_id"], r["outlier_reason"])
    inliers = [i for i, r in enumerate(rows) if not r["outlier"]]
    if not inliers:
        raise ValueError("NFDS: every candidate was filtered as an outlier")
    feats = _fixed_length([rows[i]["feature"] for i in inliers])
    k = min(n_clusters, len(inliers))
    labels = (
        KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(feats)
        if k > 1
        else np.zeros(len(inliers), int)
    )
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in range(k):
        members = [inliers[j] for j in np.flatnonzero(labels == c)]
        take = rng.permutation(members)[:per_cluster].tolist()
        chosen += take
    want = min(n_clusters * per_cluster, len(inliers))
    rest = [i for i in inliers if i not in set(chosen)]
    chosen += rng.permutation(rest)[: max(0, want - len(chosen))].tolist() if rest else []
    for j, i in enumerate(inliers):
        rows[i]["cluster"] = int(labels[j])
    for i in chosen:
        rows[i]["selected"] = True
    return rows


def write_manifest(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the selection manifest (Parquet) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    cols = [
        "sample_id",
        "scene",
        "group",
        "frames",
        "layers",
        "layer_mean",
        "layer_std",
        "outlier",
        "outlier_reason",
        "feature",
        "cluster",
        "selected",
    ]
    table = pa.Table.from_pylist([{c: (list(r[c]) if c == "frames" else r[c]) for c in cols} for r in rows])
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return path


MANIFEST_COLUMNS = ("sample_id", "scene", "frames", "selected")  # what loading the selected samples needs
PLOT_SOFTWARE = "quantvggt NFDS selection plot"


def is_manifest(path: str | Path) -> bool:
    """Whether ``path`` is a selection manifest (Parquet with the columns loading needs): ours to replace."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception:  # not Parquet, unreadable: not ours
        return False
    return all(c in names for c in MANIFEST_COLUMNS)


def _is_plot(path: Path) -> bool:
    """Whether ``path`` is a plot we wrote (its PNG ``Software`` text, or an older plot beside our manifest)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            software = str(getattr(im, "text", {}).get("Software", ""))
    except Exception:
        return False
    return software == PLOT_SOFTWARE or is_manifest(path.with_suffix(".parquet"))


def check_selection_output(out: str | Path, inputs: Sequence[str | Path]) -> None:
    """Refuse a manifest path (and the plot beside it) that would land in an input or replace a file not ours.

    ``out`` must end in ``.parquet`` (``quantize --calibration`` recognises manifests by it; the plot is
    ``out.with_suffix(".png")``), may replace only a selection manifest, and neither file may be or lie inside an
    input (a pool folder or scene: a PNG there becomes a frame). ``ValueError`` naming the file.
    """
    out = Path(out)
    if out.suffix != ".parquet":
        raise ValueError(f"{out}: a selection manifest must end in .parquet (the plot goes beside it as .png)")
    check_output_file(out, inputs, is_own=is_manifest)
    check_output_file(out.with_suffix(".png"), inputs, is_own=_is_plot)


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a selection manifest, ``scene`` made absolute (relative paths are relative to the manifest's folder).

    A file that is not a manifest, or lacks a column loading needs, is a ``ValueError`` naming it and the columns.
    """
    path = Path(path)
    rows = _read_table(path, MANIFEST_COLUMNS, "selection manifest")
    for r in rows:
        r["scene"] = str(_manifest_path(str(r["scene"]), path))
    return rows


def load_selected(path: str | Path, image_size: int = 518, mode: str = "crop") -> list[dict[str, Any]]:
    """The selected samples of a manifest as calibration items ``{"id", "images"}`` for ``quantize_``."""
    return list(iter_selected(path, image_size, mode))


def iter_selected(path: str | Path, image_size: int = 518, mode: str = "crop") -> Iterator[dict[str, Any]]:
    """Lazily yield the selected samples (see :func:`load_selected`)."""
    for r in read_manifest(path):
        if r["selected"]:
            c = Candidate(r["sample_id"], r["scene"], str(r.get("group") or ""), tuple(r["frames"]))
            try:
                images = load_candidate(c, image_size, mode)
            except (ImageLoadError, OSError) as e:  # a calibration set missing a sample is not the one selected
                raise ValueError(f"{path}: selected sample {c.sample_id}: {e}") from e
            yield {"id": r["sample_id"], "images": images}


def plot_selection(rows: list[dict[str, Any]], png: str | Path) -> Path:
    """PCA of the features to 2-D, coloured by cluster; outliers as crosses, selected samples ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feats = _fixed_length([r["feature"] for r in rows])
    centred = feats - feats.mean(0)
    if centred.shape[1] >= 2 and len(rows) >= 2:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
    else:
        xy = np.concatenate([centred[:, :1], np.zeros((len(rows), 1))], 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    inl = np.array([not r["outlier"] for r in rows])
    clusters = np.array([r["cluster"] for r in rows])
    # clusters are categories: one fixed colour and one legend entry each (a colour bar would suggest an order)
    palette = plt.get_cmap("tab10" if len(set(clusters[inl])) <= 10 else "tab20")
    for i, c in enumerate(sorted(set(clusters[inl].tolist()))):
        m = inl & (clusters == c)
        ax.scatter(xy[m, 0], xy[m, 1], color=palette(i % palette.N), s=30, label=f"cluster {c}")
    if (~inl).any():
        ax.scatter(xy[~inl, 0], xy[~inl, 1], marker="x", c="k", s=40, label="filtered (outlier)")
    sel = np.array([r["selected"] for r in rows])
    ax.scatter(xy[sel, 0], xy[sel, 1], facecolors="none", edgecolors="r", s=110, linewidths=1.5, label="selected")
    ax.set_title(f"NFDS: {int(sel.sum())} selected of {len(rows)} ({int((~inl).sum())} filtered)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100, metadata={"Software": PLOT_SOFTWARE})  # marks the file as ours: may be replaced
    plt.close(fig)
    return Path(png)


def main(
    model: torch.nn.Module,
    pool: Sequence[str | Path],
    out: str | Path,
    frames: int = 10,
    n_clusters: int = 5,
    per_cluster: int = 4,
    seed: int = 0,
    n_init: int = 10,
    overwrite: bool = False,
    progress: Any | None = None,
) -> Path:
    """Collect statistics over the pool, select, write the manifest (+ PNG beside it); returns the manifest path.

    Refused before any work: bad counts, and an ``out`` (or its plot) that is inside a pool folder or would replace
    a file that is not a selection (:func:`check_selection_output`); checked again against the scenes found.
    """
    _check_counts(frames=(frames, 2), n_clusters=(n_clusters, 1), per_cluster=(per_cluster, 1), n_init=(n_init, 1))
    out = Path(out)
    check_selection_output(out, pool)
    if out.is_file() and not overwrite:
        return out
    cands = candidate_pool(pool, frames, seed)
    if not cands:
        raise ValueError(f"NFDS: no candidate scenes found in {list(map(str, pool))}")
    check_selection_output(out, sorted({c.scene for c in cands}))  # scenes listed by a pool manifest, too
    size = model.image_size
    rows = []
    it: Iterable[Candidate] = progress(cands) if progress else cands
    for c in it:
        try:
            images = load_candidate(c, size)
        except (ImageLoadError, OSError) as e:  # e.g. a frame replaced since the pool scan: skip it, go on
            log.warning("NFDS: candidate %s skipped: %s", c.sample_id, e)
            continue
        stats = sample_stats(model, images)
        rows.append({"sample_id": c.sample_id, "scene": c.scene, "group": c.group, "frames": list(c.frames), **stats})
    if not rows:
        raise ValueError(f"NFDS: none of the {len(cands)} candidates could be loaded (see the warnings above)")
    rows = select(rows, n_clusters, per_cluster, seed, n_init)
    write_manifest(rows, out)
    plot_selection(rows, out.with_suffix(".png"))
    return out
