"""Synthetic scenes: geometry consistent with intrinsics, determinism, cues."""

import numpy as np
import pytest

from tfds_record3d import intrinsics as intrinsics_lib
from tfds_record3d import synthetic

IMAGE_SIZE, DEPTH_SIZE = (80, 60), (32, 24)


def _back_project(depth, k):
  """Depth (H, W) z-depth + K -> (H, W, 3) camera-frame points (OpenCV axes)."""
  h, w = depth.shape
  u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
  x = (u - k[0, 2]) / k[0, 0] * depth
  y = (v - k[1, 2]) / k[1, 1] * depth
  return np.stack([x, y, depth], axis=-1)


@pytest.mark.parametrize("seed", [3, 11])
def test_floor_back_projects_onto_the_world_floor_plane(seed):
  frames = list(synthetic.render_sequence(seed, 4, IMAGE_SIZE, DEPTH_SIZE))
  _, poses = synthetic.make_scene(np.random.default_rng(seed), 4)
  for example, pose in zip(frames, poses):
    # Depth-size intrinsics derived from the stored (image-size) intrinsics.
    k_depth = intrinsics_lib.scale_intrinsics(example["intrinsics"], IMAGE_SIZE, DEPTH_SIZE)
    labels = synthetic.render_view(synthetic.make_scene(np.random.default_rng(seed), 4)[0],
                                   pose, k_depth, DEPTH_SIZE, shade=False).surface
    floor = (labels == synthetic.FLOOR_SURFACE) & (example["depth"] > 0)
    assert floor.sum() > 20, "the camera looks down: the floor must be visible"
    points = _back_project(example["depth"], k_depth)[floor]  # (M, 3) camera frame
    world = points @ pose.rotation.T + pose.position
    np.testing.assert_allclose(world[:, 1], 0.0, atol=2e-3)  # floor is y = 0
    # Equivalently, in the camera frame the points are on one plane whose
    # distance to the camera is the camera height.
    centred = points - points.mean(axis=0)
    normal = np.linalg.svd(centred)[2][-1]
    assert np.abs(centred @ normal).max() < 2e-3
    assert abs(points.mean(axis=0) @ normal) == pytest.approx(pose.position[1], abs=2e-3)


def test_wrong_intrinsics_break_the_floor_plane():
  """Guards the test above: unscaled (image-size) K must not pass it."""
  example = next(synthetic.render_sequence(3, 1, IMAGE_SIZE, DEPTH_SIZE))
  scene, poses = synthetic.make_scene(np.random.default_rng(3), 1)
  k_depth = intrinsics_lib.scale_intrinsics(example["intrinsics"], IMAGE_SIZE, DEPTH_SIZE)
  floor = synthetic.render_view(scene, poses[0], k_depth, DEPTH_SIZE, shade=False).surface == 2
  world = _back_project(example["depth"], example["intrinsics"])[floor] @ poses[0].rotation.T
  assert np.abs(world[:, 1] + poses[0].position[1]).max() > 0.05


def test_examples_have_the_builder_features_and_are_deterministic():
  first = list(synthetic.render_sequence(5, 3, IMAGE_SIZE, DEPTH_SIZE, name="walk"))
  again = list(synthetic.render_sequence(5, 3, IMAGE_SIZE, DEPTH_SIZE, name="walk"))
  other = next(synthetic.render_sequence(6, 1, IMAGE_SIZE, DEPTH_SIZE))
  for frame, (a, b) in enumerate(zip(first, again)):
    assert a["image"].shape == (*IMAGE_SIZE, 3) and a["image"].dtype == np.uint8
    assert a["depth"].shape == DEPTH_SIZE and a["depth"].dtype == np.float32
    assert a["confidence"].shape == DEPTH_SIZE and a["confidence"].dtype == np.uint8
    assert a["intrinsics"].shape == (3, 3) and a["intrinsics"].dtype == np.float32
    assert (a["sequence"], a["frame"]) == ("walk", frame)
    for key in ("image", "depth", "confidence"):
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["depth"], other["depth"])
  assert 0.3 < first[0]["depth"][first[0]["depth"] > 0].min() < synthetic.MAX_RANGE_M


def _spearman(a, b):
  rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return np.corrcoef(rank_a, rank_b)[0, 1]


def test_brightness_falls_off_with_depth():
  """The camera lamp makes near surfaces brighter: a monocular cue to learn."""
  correlations = []
  for seed in range(4):
    example = next(synthetic.render_sequence(seed, 1, (48, 36), (48, 36)))
    valid = example["depth"] > 0
    correlations.append(_spearman(example["image"].mean(-1)[valid], example["depth"][valid]))
  assert np.mean(correlations) < -0.4, correlations


def test_plan_sequences_covers_1059_frames_in_about_30_sequences():
  plan = synthetic.plan_sequences()
  assert sum(p.num_frames for p in plan) == synthetic.NUM_FRAMES == 1059
  assert 25 <= len(plan) <= 35
  assert all(28 <= p.num_frames <= 42 for p in plan)
  assert len({p.seed for p in plan}) == len(plan)
  assert [p.num_frames for p in synthetic.plan_sequences(9)] == [3, 3, 3]
