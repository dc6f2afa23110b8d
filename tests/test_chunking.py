"""Chunked inference: plans, robust Sim(3) on exact synthetic geometry, alignment and merge of chunk predictions."""

from __future__ import annotations

import numpy as np
import pytest

from quantvggt.chunking import (
    AlignmentError,
    ChunkMerger,
    ChunkPlan,
    Sim3,
    choose_anchors,
    merge_chunks,
    plan_anchors,
    plan_sequential,
    robust_sim3,
    sim3_from_poses,
    transform_prediction,
    umeyama_weighted,
)
from quantvggt.images import ImageTransform
from quantvggt.prediction import ScenePrediction
from quantvggt.synth import look_at


def random_sim(rng: np.random.Generator, scale: tuple[float, float] = (0.3, 3.0)) -> Sim3:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    R = q * np.sign(np.linalg.det(q))
    return Sim3(float(rng.uniform(*scale)), R, rng.normal(size=3) * 2)


# -- planning ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 16, 17, 40, 101])
def test_sequential_plan_covers_every_frame_with_overlap(n: int) -> None:
    plan = plan_sequential(n, chunk_size=16, overlap=4)
    assert sorted({i for c in plan.chunks for i in c}) == list(range(n))
    assert all(len(c) == min(16, n) for c in plan.chunks)
    for k in range(1, len(plan.chunks)):
        assert plan.targets[k] == k - 1 and len(plan.shared[k]) >= 4
        assert plan.chunks[k][0] == plan.shared[k][0]  # a chunk's reference frame is one it shares


def test_anchor_plan_puts_anchors_first_in_every_chunk() -> None:
    plan = plan_anchors(50, chunk_size=12, anchors=[7, 0, 30])
    assert all(c[:3] == [7, 0, 30] for c in plan.chunks)
    assert sorted(i for c in plan.chunks for i in c[3:]) == [i for i in range(50) if i not in (7, 0, 30)]
    sizes = [len(c) for c in plan.chunks]
    assert max(sizes) <= 12 and max(sizes) - min(sizes) <= 1  # balanced: no nearly empty last chunk
    assert plan.targets[1:] == [0] * (len(plan.chunks) - 1) and plan.shared[1] == [7, 0, 30]


def test_plans_refuse_bad_settings() -> None:
    with pytest.raises(ValueError, match="overlap"):
        plan_sequential(10, 4, 4)
    with pytest.raises(ValueError, match="no room"):
        plan_anchors(10, 4, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="covers"):
        ChunkPlan("sequential", 5, [[0, 1]], [None], [[]])
    with pytest.raises(ValueError, match="earlier chunk"):
        ChunkPlan("sequential", 4, [[0, 1], [2, 3]], [None, 0], [[], [1]])


def test_anchors_spread_over_distinct_views() -> None:
    # three clusters of near-identical frames: farthest-point sampling takes one frame from each
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    feats = np.concatenate([c + rng.normal(scale=0.01, size=(5, 3)) for c in centres])
    picked = choose_anchors(15, 3, feats, first=0)
    assert picked[0] == 0 and sorted(p // 5 for p in picked) == [0, 1, 2]
    assert choose_anchors(12, 3) == [0, 4, 8]  # no features: evenly spaced


# -- Sim(3) ---------------------------------------------------------------------------------------------------------
def test_umeyama_recovers_a_known_similarity_exactly() -> None:
    rng = np.random.default_rng(1)
    sim = random_sim(rng)
    x = rng.normal(size=(200, 3))
    fit = umeyama_weighted(x, sim.apply(x), rng.uniform(0.5, 2, 200))
    assert abs(fit.s - sim.s) < 1e-9 and np.abs(fit.R - sim.R).max() < 1e-9 and np.abs(fit.t - sim.t).max() < 1e-9
    back = sim.inverse().compose(sim)
    assert abs(back.s - 1) < 1e-12 and np.allclose(back.R, np.eye(3)) and np.allclose(back.t, 0)


def test_irls_rejects_gross_outliers() -> None:
    rng = np.random.default_rng(2)
    sim = random_sim(rng)
    x = rng.normal(size=(1000, 3))
    y = sim.apply(x)
    bad = rng.choice(1000, 300, replace=False)  # 30 % of the correspondences wrong by up to several scene sizes
    y[bad] += rng.normal(scale=3.0, size=(300, 3))
    conf = rng.uniform(1, 5, 1000)
    plain = umeyama_weighted(x, y, conf)
    assert abs(plain.s - sim.s) > 1e-2  # least squares is pulled off
    fit = robust_sim3(x, y, conf)
    got = fit.sim
    assert abs(got.s - sim.s) < 1e-6 and np.abs(got.R - sim.R).max() < 1e-6 and np.abs(got.t - sim.t).max() < 1e-6
    assert fit.residual < 1e-6 and 0.65 < fit.inliers < 0.75


def test_irls_with_noise_stays_close() -> None:
    rng = np.random.default_rng(3)
    sim = random_sim(rng)
    x = rng.normal(size=(2000, 3))
    y = sim.apply(x) + rng.normal(scale=0.01, size=(2000, 3))
    y[:200] += 5.0
    fit = robust_sim3(x, y).sim
    assert abs(fit.s / sim.s - 1) < 5e-3 and np.abs(fit.R - sim.R).max() < 5e-3


def test_robust_fit_refuses_degenerate_input() -> None:
    with pytest.raises(AlignmentError):
        robust_sim3(np.zeros((10, 3)), np.ones((10, 3)))
    with pytest.raises(AlignmentError):
        robust_sim3(np.full((2, 3), np.nan), np.zeros((2, 3)))


def test_pose_based_similarity() -> None:
    rng = np.random.default_rng(4)
    sim = random_sim(rng)
    E = np.stack([look_at(np.array([3 * np.sin(a), 1.0, 3 * np.cos(a)]), np.zeros(3)) for a in (0.0, 0.4, 0.9)])
    E_dst = sim.extrinsics(E)
    for fit in (sim3_from_poses(E, E_dst), sim3_from_poses(E[:1], E_dst[:1], depth_ratio=sim.s)):
        assert abs(fit.s - sim.s) < 1e-9 and np.abs(fit.R - sim.R).max() < 1e-9 and np.abs(fit.t - sim.t).max() < 1e-9
    with pytest.raises(AlignmentError, match="scale"):
        sim3_from_poses(E[:1], E_dst[:1])


# -- chunk predictions ------------------------------------------------------------------------------------------------
H, W = 12, 16


def scene_truth(S: int, seed: int = 0) -> dict:
    """Cameras on an arc looking at the origin, smooth positive depth maps, and their world points."""
    rng = np.random.default_rng(seed)
    E = np.stack(
        [
            look_at(np.array([3 * np.sin(a), 1.0 + 0.3 * np.sin(3 * a), 3 * np.cos(a)]), rng.normal(scale=0.1, size=3))
            for a in np.linspace(0, 2.5, S)
        ]
    )
    K = np.array([[14.0, 0, W / 2], [0, 14.0, H / 2], [0, 0, 1]])
    v, u = np.mgrid[0:H, 0:W]
    depth = np.stack([2.5 + 0.3 * np.sin(u / 3 + i) + 0.2 * np.cos(v / 2 - i) for i in range(S)])
    return {"E": E, "K": np.repeat(K[None], S, 0), "depth": depth, "names": [f"frame_{i:03d}.png" for i in range(S)]}


def chunk_prediction(gt: dict, frames: list[int], to_chunk: Sim3, rng: np.random.Generator) -> ScenePrediction:
    """What a perfect model would predict for ``frames`` in a world that is ``to_chunk`` of the scene's."""
    from quantvggt.chunking import frame_points

    S = len(frames)
    pred = ScenePrediction(
        scene="s",
        names=[gt["names"][i] for i in frames],
        original_sizes=[(W, H)] * S,
        transforms=[ImageTransform(1.0, 1.0, 0.0, 0.0)] * S,
        extrinsics=gt["E"][frames],
        intrinsics=gt["K"][frames],
        depth=gt["depth"][frames],
        depth_conf=rng.uniform(1, 3, (S, H, W)),
        world_points=None,
        world_points_conf=None,
        images=np.zeros((S, H, W, 3)),
    )
    pred.world_points = np.stack([frame_points(pred, i)[0].reshape(H, W, 3) for i in range(S)])
    pred.world_points_conf = pred.depth_conf.copy()
    return transform_prediction(pred, to_chunk)


def test_transform_prediction_keeps_geometry_consistent() -> None:
    from quantvggt.chunking import frame_points

    gt = scene_truth(4)
    rng = np.random.default_rng(5)
    sim = random_sim(rng)
    base = chunk_prediction(gt, [0, 1, 2, 3], Sim3.identity(), rng)
    moved = transform_prediction(base, sim)
    for i in range(4):  # unprojecting the moved depth with the moved camera lands on the moved points
        np.testing.assert_allclose(frame_points(moved, i)[0], sim.apply(frame_points(base, i)[0]), atol=1e-9)
        np.testing.assert_allclose(moved.world_points[i], sim.apply(base.world_points[i]), atol=1e-9)


@pytest.mark.parametrize("design", ["sequential", "anchors"])
@pytest.mark.parametrize("points_from", ["depth", "point_map"])
def test_chunks_align_and_merge_back_to_the_truth(design: str, points_from: str) -> None:
    from quantvggt.chunking import AlignOptions

    S = 23
    gt = scene_truth(S)
    rng = np.random.default_rng(6)
    plan = plan_sequential(S, 8, 3) if design == "sequential" else plan_anchors(S, 8, choose_anchors(S, 3))
    # chunk k's world is its first frame's camera at an arbitrary scale, as VGGT predicts it
    worlds = [Sim3(float(rng.uniform(0.5, 2)), np.eye(3), np.zeros(3)) for _ in plan.chunks]
    to_chunk = []
    for c, w in zip(plan.chunks, worlds):
        E0 = gt["E"][c[0]]
        to_chunk.append(w.compose(Sim3(1.0, E0[:, :3], E0[:, 3])))
    preds = [chunk_prediction(gt, c, t, rng) for c, t in zip(plan.chunks, to_chunk)]
    merger = ChunkMerger(plan, gt["names"], AlignOptions(points_from=points_from))
    als = [merger.add(p) for p in preds]
    assert [a.status for a in als] == ["reference"] + ["aligned"] * (len(plan.chunks) - 1)
    for k, a in enumerate(als[1:], 1):  # each chunk's world mapped onto chunk 0's
        want = to_chunk[0].compose(to_chunk[k].inverse())
        assert abs(a.sim.s - want.s) < 1e-6 and np.abs(a.sim.R - want.R).max() < 1e-6
        assert a.residual < 1e-6 and a.pose_rotation_deg < 1e-4
    merged = merger.result()
    assert merged.names == gt["names"]  # every image once, in scene order
    truth = transform_prediction(chunk_prediction(gt, list(range(S)), Sim3.identity(), rng), to_chunk[0])
    np.testing.assert_allclose(merged.extrinsics, truth.extrinsics, atol=1e-6)
    np.testing.assert_allclose(merged.depth, truth.depth, atol=1e-6)
    np.testing.assert_allclose(merged.world_points, truth.world_points, atol=1e-6)
    report = merged.report["chunking"]
    assert report["design"] == design and len(report["per_chunk"]) == len(plan.chunks)
    assert set(report["frame_source_chunk"]) == set(gt["names"]) and merged.report["images_unregistered"] == []


def test_merge_takes_each_frame_from_its_most_confident_chunk() -> None:
    gt = scene_truth(10)
    rng = np.random.default_rng(7)
    plan = plan_sequential(10, 6, 2)  # chunks [0..5], [4..9]: frames 4 and 5 in both
    preds = [chunk_prediction(gt, c, Sim3.identity(), rng) for c in plan.chunks]
    preds[0].depth_conf[4] = 10.0  # frame 4: chunk 0 saw it best
    preds[1].depth_conf[1] = 10.0  # frame 5: chunk 1 saw it best
    merged = merge_chunks(preds, plan, gt["names"])
    src = merged.report["chunking"]["frame_source_chunk"]
    assert src["frame_004.png"] == 0 and src["frame_005.png"] == 1
    assert merged.names == gt["names"] and float(merged.depth_conf[4].mean()) == 10.0


def test_a_chunk_that_fails_to_align_is_reported_not_merged() -> None:
    from quantvggt.chunking import AlignOptions

    S = 16
    gt = scene_truth(S)
    rng = np.random.default_rng(8)
    plan = plan_sequential(S, 6, 2)  # 4 chunks in a chain
    preds = [chunk_prediction(gt, c, Sim3.identity(), rng) for c in plan.chunks]
    preds[2].depth[:] = rng.uniform(0.5, 5, preds[2].depth.shape)  # chunk 2 predicts nonsense depth
    preds[2].world_points = None
    preds[2].world_points_conf = None
    merger = ChunkMerger(plan, gt["names"], AlignOptions(max_residual=0.05))
    als = [merger.add(p) for p in preds]
    assert [a.status for a in als] == ["reference", "aligned", "failed", "failed"]
    assert als[2].residual > 0.05 and "residual" in als[2].error and "chunk 2 failed" in als[3].error
    merged = merger.result()
    lost = {u["name"]: u["reason"] for u in merged.report["images_unregistered"]}
    assert sorted(lost) == gt["names"][len(set(plan.chunks[0]) | set(plan.chunks[1])) :]
    assert all("chunk 2" in r or "chunk 3" in r for r in lost.values())
    assert "residual" in lost[gt["names"][10]]
    assert len(merged.names) + len(lost) == S
    per = merged.report["chunking"]["per_chunk"][2]
    assert per["status"] == "failed" and per["residual"] > 0.05


def test_a_link_just_over_the_residual_limit_merges_only_when_the_poses_agree() -> None:
    from quantvggt.chunking import AlignOptions

    S = 16
    gt = scene_truth(S)
    rng = np.random.default_rng(8)
    plan = plan_sequential(S, 6, 2)
    preds = [chunk_prediction(gt, c, Sim3.identity(), rng) for c in plan.chunks]
    preds[2].depth *= rng.uniform(0.7, 1.3, preds[2].depth.shape)  # noisy depth, right poses
    preds[2].world_points = None
    preds[2].world_points_conf = None

    def add_all(options: AlignOptions) -> list:
        merger = ChunkMerger(plan, gt["names"], options)
        return [merger.add(p) for p in preds]

    r = add_all(AlignOptions(max_residual=10))[2].residual
    assert r is not None and r > 0
    # over the limit but within the relaxed one, and the shared frames' poses agree: merged
    relaxed = add_all(AlignOptions(max_residual=r / 1.5))
    assert [a.status for a in relaxed] == ["reference", "aligned", "aligned", "aligned"]
    # the same link when poses may not disagree at all: failed, and the chain after it with it
    strict = add_all(AlignOptions(max_residual=r / 1.5, max_pose_deg=-1))
    assert [a.status for a in strict] == ["reference", "aligned", "failed", "failed"]
    # over the relaxed limit: failed whatever the poses say
    far = add_all(AlignOptions(max_residual=r / 2.5))
    assert far[2].status == "failed"


def test_padding_to_a_larger_map_keeps_the_geometry() -> None:
    from quantvggt.chunking import concat_predictions, frame_points, pad_prediction

    gt = scene_truth(3)
    pred = chunk_prediction(gt, [0, 1, 2], Sim3.identity(), np.random.default_rng(9))
    padded = pad_prediction(pred, H + 4, W + 2)  # 2 rows above and below, 1 column left and right
    for i in range(3):
        a = frame_points(pred, i)[0].reshape(H, W, 3)
        b = frame_points(padded, i)[0].reshape(H + 4, W + 2, 3)
        np.testing.assert_allclose(b[2 : 2 + H, 1 : 1 + W], a, atol=1e-9)
        assert np.isnan(b[0]).all() and (padded.depth_conf[i, 0] == 0).all()
        tf = padded.transforms[i]
        np.testing.assert_allclose(tf.to_original(np.array([1.5, 2.5])), [0.5, 0.5])
    both = concat_predictions([padded, pred])  # mixed sizes: the smaller part is padded to match
    assert both.depth.shape == (6, H + 4, W + 2) and both.names == pred.names * 2
    np.testing.assert_allclose(both.intrinsics[3], padded.intrinsics[0])


def test_similarity_order_recovers_a_shuffled_capture() -> None:
    from quantvggt.chunking import order_by_similarity, plan_scene

    t = np.linspace(0, 3, 40)
    path = np.stack([np.cos(t), np.sin(t), 0.3 * t], 1)  # views along a curve (an open path)
    perm = np.random.default_rng(10).permutation(40)
    feats = path[perm]
    start = int(np.flatnonzero(perm == 0)[0])
    chain = order_by_similarity(feats, start)
    assert perm[chain].tolist() == list(range(40))
    with pytest.raises(ValueError, match="needs the image paths"):
        plan_scene(40, 8, order="similarity")


def test_auto_order_follows_names_of_a_capture_and_similarity_of_a_shuffled_one(tmp_path) -> None:
    from quantvggt import synth
    from quantvggt.chunking import plan_scene
    from quantvggt.images import list_images

    for trajectory, want in (("orbit", "name"), ("random", "similarity")):
        paths = list_images(synth.make_scene(tmp_path / trajectory, 3, 48, 48, 36, trajectory))
        plan = plan_scene(48, 16, paths=paths)
        assert plan.order == want, (trajectory, plan.order_affinity)
        if want == "name":
            assert plan.chunks[0] == list(range(16))
        else:  # chunks hold neighbouring views: in capture order each chunk spans little of the orbit
            gt = synth.load_gt(tmp_path / trajectory)
            c = -np.einsum("nji,nj->ni", gt["extrinsics"][:, :, :3], gt["extrinsics"][:, :, 3])
            ang = np.arctan2(c[:, 0], c[:, 2])
            for chunk in plan.chunks:
                spread = np.angle(np.exp(1j * (ang[chunk] - ang[chunk[0]])))
                assert np.ptp(spread) < np.deg2rad(150)


@pytest.mark.parametrize("larger", [0, 1])
def test_chunks_of_different_map_sizes_merge_padded(larger: int) -> None:
    from quantvggt.chunking import frame_points, pad_prediction

    gt = scene_truth(10)
    rng = np.random.default_rng(11)
    plan = plan_sequential(10, 6, 2)
    preds = [chunk_prediction(gt, c, Sim3.identity(), rng) for c in plan.chunks]
    preds[larger] = pad_prediction(preds[larger], H + 4, W + 2)  # e.g. a chunk holding one taller image
    merged = merge_chunks(preds, plan, gt["names"])
    assert merged.depth.shape == (10, H + 4, W + 2) and merged.names == gt["names"]
    truth = chunk_prediction(gt, list(range(10)), Sim3.identity(), rng)
    for i in range(10):
        got = frame_points(merged, i)[0].reshape(H + 4, W + 2, 3)[2 : 2 + H, 1 : 1 + W]
        np.testing.assert_allclose(got, frame_points(truth, i)[0].reshape(H, W, 3), atol=1e-6)


def test_chunk_prediction_ships_as_plain_arrays_and_comes_back_the_same() -> None:
    import pickle

    from quantvggt.chunking import prediction_from_arrays, prediction_to_arrays

    gt = scene_truth(4)
    pred = chunk_prediction(gt, [0, 1, 2, 3], Sim3.identity(), np.random.default_rng(3))
    pred.report = {"timings_s": {"model": 1.5}, "other": "dropped"}
    data = prediction_to_arrays(pred)
    # only numpy arrays, strings, numbers: no dataclass travels between processes
    assert all(isinstance(v, (np.ndarray, str, list, dict)) for v in data.values())
    back = prediction_from_arrays(pickle.loads(pickle.dumps(data)))
    assert back.names == pred.names and back.transforms == pred.transforms
    assert [tuple(s) for s in back.original_sizes] == [tuple(s) for s in pred.original_sizes]
    for key in ("extrinsics", "intrinsics", "depth", "depth_conf"):
        np.testing.assert_array_equal(getattr(back, key), getattr(pred, key))
    assert data["images"].dtype == np.uint8 and back.images.dtype == np.float32
    np.testing.assert_allclose(back.images, pred.images, atol=0.5 / 255 + 1e-6)  # 8-bit, as the export writes them
    assert (back.world_points is None) == (pred.world_points is None)
    assert back.report == {"timings_s": {"model": 1.5}}
    small = prediction_to_arrays(pred, point_map=False)
    assert "world_points" not in small and prediction_from_arrays(small).world_points is None
