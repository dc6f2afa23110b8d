"""Metrics: relative pose errors and AUC (as the VGGT/PoseDiffusion evaluation), depth and point-cloud accuracy."""

from __future__ import annotations

import numpy as np


def _to44(T: np.ndarray) -> np.ndarray:
    out = np.tile(np.eye(4), (*T.shape[:-2], 1, 1))
    out[..., :3, :4] = T[..., :3, :4]
    return out


def relative_pose_errors(
    pred_extr: np.ndarray, gt_extr: np.ndarray, ambiguity: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per image pair (i < j): rotation and translation-direction angle errors in degrees.

    Poses are camera-from-world ``[S, 3, 4]``; the relative pose of a pair is ``T_j T_i^-1``, so the errors do not
    depend on the world frame (equivalent to aligning both sets to the first camera). With ``ambiguity`` the
    translation error is ``min(e, 180 - e)``, as in the VGGT / PoseDiffusion evaluation.
    """
    P, G = _to44(np.asarray(pred_extr, np.float64)), _to44(np.asarray(gt_extr, np.float64))
    i, j = np.triu_indices(len(P), k=1)
    rel_p = P[j] @ np.linalg.inv(P[i])
    rel_g = G[j] @ np.linalg.inv(G[i])
    dR = np.einsum("nji,njk->nik", rel_p[:, :3, :3], rel_g[:, :3, :3])
    cos = np.clip((np.trace(dR, axis1=1, axis2=2) - 1) / 2, -1, 1)
    r_err = np.degrees(np.arccos(cos))
    tp, tg = rel_p[:, :3, 3], rel_g[:, :3, 3]
    tp = tp / np.maximum(np.linalg.norm(tp, axis=1, keepdims=True), 1e-12)
    tg = tg / np.maximum(np.linalg.norm(tg, axis=1, keepdims=True), 1e-12)
    t_err = np.degrees(np.arccos(np.clip((tp * tg).sum(1), -1, 1)))
    if ambiguity:
        t_err = np.minimum(t_err, 180 - t_err)
    return r_err, t_err


def auc(r_err: np.ndarray, t_err: np.ndarray, max_threshold: int) -> float:
    """Mean of the cumulative histogram (1-degree bins up to ``max_threshold``) of max(rotation, translation) error."""
    errs = np.round(np.maximum(r_err, t_err), 9)  # so an exact 10 deg error is not split by float noise at a bin edge
    hist, _ = np.histogram(errs, bins=np.arange(max_threshold + 1))
    return float(np.mean(np.cumsum(hist.astype(np.float64) / max(len(errs), 1))))


def pose_metrics(pred_extr: np.ndarray, gt_extr: np.ndarray) -> dict[str, float]:
    """AUC@30/15/5/3 and mean rotation/translation errors."""
    r, t = relative_pose_errors(pred_extr, gt_extr)
    out = {f"auc@{k}": auc(r, t, k) for k in (30, 15, 5, 3)}
    out.update(rot_err_mean=float(r.mean()), trans_err_mean=float(t.mean()))
    return out


def depth_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Abs-rel and delta<1.25 after per-image median scaling, over pixels with ``gt > 0`` (and ``mask``)."""
    absrel, delta = [], []
    for p, g, m in zip(pred, gt, mask if mask is not None else [None] * len(pred)):
        valid = (g > 0) & np.isfinite(p) & (p > 0)
        if m is not None:
            valid &= m
        if not valid.any():
            continue
        ps, gs = p[valid], g[valid]
        ps = ps * (np.median(gs) / np.median(ps))
        absrel.append(np.mean(np.abs(ps - gs) / gs))
        delta.append(np.mean(np.maximum(ps / gs, gs / ps) < 1.25))
    return {"abs_rel": float(np.mean(absrel)), "delta1": float(np.mean(delta))}


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity ``(s, R, t)`` minimising ``|| s R src + t - dst ||^2`` (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, D, Vt = np.linalg.svd(cov)
    E = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        E[2, 2] = -1
    R = U @ E @ Vt
    var = (xs**2).sum() / len(src)
    s = float(np.trace(np.diag(D) @ E) / var) if with_scale else 1.0
    t = mu_d - s * R @ mu_s
    return s, R, t


def point_metrics(pred: np.ndarray, gt: np.ndarray, max_points: int = 20000, seed: int = 0) -> dict[str, float]:
    """Accuracy (pred->gt) and completeness (gt->pred) mean nearest-neighbour distances after a Sim(3) fit.

    ``pred`` and ``gt`` are corresponding points ``[N, 3]`` (same pixels), used for the alignment; distances are
    reported in ground-truth units.
    """
    from sklearn.neighbors import NearestNeighbors

    ok = np.isfinite(pred).all(1) & np.isfinite(gt).all(1)
    pred, gt = pred[ok], gt[ok]
    if len(pred) > max_points:
        idx = np.random.default_rng(seed).choice(len(pred), max_points, replace=False)
        pred, gt = pred[idx], gt[idx]
    s, R, t = umeyama(pred, gt)
    aligned = s * pred @ R.T + t
    acc = NearestNeighbors(n_neighbors=1).fit(gt).kneighbors(aligned)[0].mean()
    comp = NearestNeighbors(n_neighbors=1).fit(aligned).kneighbors(gt)[0].mean()
    return {"accuracy": float(acc), "completeness": float(comp), "chamfer": float((acc + comp) / 2)}
