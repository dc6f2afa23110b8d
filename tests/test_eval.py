"""Pose, depth and point metrics on known perturbations."""

from __future__ import annotations

import numpy as np

from quantvggt import eval as ev
from quantvggt.synth import look_at


def _rig(n: int = 5) -> np.ndarray:
    # level cameras on a circle: relative translations are perpendicular to every camera's y axis
    return np.stack(
        [
            look_at(np.array([3 * np.sin(a), 1.0, 3 * np.cos(a)]), np.array([0.0, 1.0, 0.0]))
            for a in np.linspace(0, 1.5, n)
        ]
    )


def _rot_y(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def test_identical_and_similarity_transformed_poses_are_perfect() -> None:
    gt = _rig()
    m = ev.pose_metrics(gt, gt)
    assert m["auc@3"] == 1.0 and m["auc@30"] == 1.0
    # a global similarity of the world (rotation, translation, scale) leaves relative errors at zero
    R, t, s = _rot_y(40), np.array([1.0, -2.0, 0.5]), 3.0
    moved = gt.copy()
    moved[:, :, :3] = gt[:, :, :3] @ R.T
    moved[:, :, 3] = s * (gt[:, :, 3] - moved[:, :, :3] @ t)
    r, tr = ev.relative_pose_errors(moved, gt)
    assert r.max() < 1e-5 and tr.max() < 1e-5


def test_one_camera_rotated_10_degrees() -> None:
    gt = _rig(5)
    pred = gt.copy()
    k = 2
    C = -gt[k, :, :3].T @ gt[k, :, 3]  # keep its centre, turn it by 10 degrees about its own y axis
    pred[k, :, :3] = _rot_y(10) @ gt[k, :, :3]
    pred[k, :, 3] = -pred[k, :, :3] @ C
    r, t = ev.relative_pose_errors(pred, gt)
    pairs = list(zip(*np.triu_indices(5, k=1)))
    for (i, j), re, te in zip(pairs, r, t):
        assert abs(re - (10.0 if k in (i, j) else 0.0)) < 1e-5
        assert abs(te - (10.0 if j == k else 0.0)) < 1e-5  # direction changes only in the turned camera's frame
    # 4 of the 10 pairs have max error exactly 10 deg, the rest 0
    assert abs(ev.auc(r, t, 30) - (6 / 10 + 4 / 10 * 20 / 30)) < 1e-12
    assert abs(ev.auc(r, t, 5) - 0.6) < 1e-12


def test_depth_metrics_scale_invariant() -> None:
    gt = np.random.default_rng(0).uniform(1, 5, (2, 8, 8))
    m = ev.depth_metrics(gt * 3.7, gt)
    assert m["abs_rel"] < 1e-12 and m["delta1"] == 1.0
    noisy = ev.depth_metrics(gt * (1 + 0.1 * np.random.default_rng(1).standard_normal(gt.shape)), gt)
    assert 0.03 < noisy["abs_rel"] < 0.15


def test_umeyama_and_point_metrics() -> None:
    rng = np.random.default_rng(0)
    gt = rng.uniform(-1, 1, (500, 3))
    R = _rot_y(33)
    pred = (gt @ R.T) * 0.5 + np.array([1, 2, 3])
    s, R2, t = ev.umeyama(pred, gt)
    np.testing.assert_allclose(s * pred @ R2.T + t, gt, atol=1e-9)
    m = ev.point_metrics(pred, gt)
    assert m["accuracy"] < 1e-9 and m["completeness"] < 1e-9
