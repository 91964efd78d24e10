"""Synthetic scenes: geometry consistent with intrinsics, determinism, cues, the
LiDAR-like sensor model, and the target domain (also built through TFDS)."""

import numpy as np
import pytest

import tensorflow_datasets as tfds

import tfds_record3d
from tfds_record3d import intrinsics as intrinsics_lib
from tfds_record3d import splits
from tfds_record3d import synthetic
from tfds_record3d.record3d import record3d_dataset_builder as builder_module

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
  scene, poses = synthetic.make_scene(np.random.default_rng(seed), 4)
  for example, pose in zip(frames, poses):
    # Depth-size intrinsics derived from the stored (image-size) intrinsics.
    k_depth = intrinsics_lib.scale_intrinsics(example["intrinsics"], IMAGE_SIZE, DEPTH_SIZE)
    view = synthetic.render_view(scene, pose, k_depth, DEPTH_SIZE, shade=False)
    floor = view.surface == synthetic.FLOOR_SURFACE
    assert floor.sum() > 20, "the camera looks down: the floor must be visible"
    points = _back_project(view.depth, k_depth)[floor]  # (M, 3) camera frame, exact depth
    world = points @ pose.rotation.T + pose.position
    np.testing.assert_allclose(world[:, 1], 0.0, atol=2e-3)  # floor is y = 0
    # Equivalently, in the camera frame the points are on one plane whose
    # distance to the camera is the camera height.
    centred = points - points.mean(axis=0)
    normal = np.linalg.svd(centred)[2][-1]
    assert np.abs(centred @ normal).max() < 2e-3
    assert abs(points.mean(axis=0) @ normal) == pytest.approx(pose.position[1], abs=2e-3)
    # The stored (sensor) depth is that exact depth plus noise where it is
    # trusted: a wrong stored K would have rendered another depth map.
    trusted = example["confidence"] == synthetic.CONFIDENCE_HIGH
    error = np.abs(example["depth"] - view.depth)[trusted]
    assert np.median(error / view.depth[trusted]) < 0.02


def test_wrong_intrinsics_break_the_floor_plane():
  """Guards the test above: unscaled (image-size) K must not pass it."""
  example = next(synthetic.render_sequence(3, 1, IMAGE_SIZE, DEPTH_SIZE))
  scene, poses = synthetic.make_scene(np.random.default_rng(3), 1)
  k_depth = intrinsics_lib.scale_intrinsics(example["intrinsics"], IMAGE_SIZE, DEPTH_SIZE)
  view = synthetic.render_view(scene, poses[0], k_depth, DEPTH_SIZE, shade=False)
  floor = view.surface == 2
  world = _back_project(view.depth, example["intrinsics"])[floor] @ poses[0].rotation.T
  assert np.abs(world[:, 1] + poses[0].position[1]).max() > 0.05


@pytest.mark.parametrize("domain_name", ["source", "target"])
def test_examples_have_the_builder_features_and_are_deterministic(domain_name):
  first = list(synthetic.render_sequence(5, 3, IMAGE_SIZE, DEPTH_SIZE, name="walk",
                                         domain_name=domain_name))
  again = list(synthetic.render_sequence(5, 3, IMAGE_SIZE, DEPTH_SIZE, name="walk",
                                         domain_name=domain_name))
  other = next(synthetic.render_sequence(6, 1, IMAGE_SIZE, DEPTH_SIZE, domain_name=domain_name))
  for frame, (a, b) in enumerate(zip(first, again)):
    assert a["image"].shape == (*IMAGE_SIZE, 3) and a["image"].dtype == np.uint8
    assert a["depth"].shape == DEPTH_SIZE and a["depth"].dtype == np.float32
    assert a["confidence"].shape == DEPTH_SIZE and a["confidence"].dtype == np.uint8
    assert a["intrinsics"].shape == (3, 3) and a["intrinsics"].dtype == np.float32
    assert (a["sequence"], a["frame"]) == ("walk", frame)
    assert set(np.unique(a["confidence"])) <= {0, 1, 2}
    for key in ("image", "depth", "confidence", "pose"):
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(first[0]["depth"], other["depth"])
  assert 0.3 < first[0]["depth"][first[0]["depth"] > 0].min() < synthetic.MAX_RANGE_M


def test_pose_is_camera_to_world_with_opengl_axes():
  example = next(synthetic.render_sequence(3, 1, IMAGE_SIZE, DEPTH_SIZE))
  pose = synthetic.make_scene(np.random.default_rng(3), 1)[1][0]
  # OpenGL looks down its -z axis: -z of the stored pose is our forward axis.
  np.testing.assert_allclose(-example["pose"][:3, 2], pose.rotation[:, 2], atol=1e-6)
  np.testing.assert_allclose(example["pose"][:3, 1], -pose.rotation[:, 1], atol=1e-6)
  np.testing.assert_allclose(example["pose"][:3, 3], pose.position, atol=1e-6)


# --- The LiDAR-like sensor model -------------------------------------------

def _flat_view(depth, size=synthetic.DEPTH_SIZE, cos_view=1.0):
  """A hand-made view of one fronto-parallel surface (distance = depth)."""
  full = np.full(size, depth, np.float32)
  return synthetic.View(rgb=None, depth=full, distance=full,
                        cos_view=np.full(size, cos_view, np.float32),
                        surface=np.zeros(size, np.int32))


def test_noise_matches_its_documented_sigma_and_grows_with_distance():
  assert synthetic.noise_sigma(1.0) == pytest.approx(0.010)  # 1% at 1 m
  assert synthetic.noise_sigma(3.0) == pytest.approx(0.042)  # 1.4% at 3 m
  measured = {}
  for z in (1.0, 2.0, 3.0):
    depth, confidence = synthetic.lidar_measurement(_flat_view(z), np.random.default_rng(0))
    assert np.all(confidence == 2)  # in range, head-on, no edge
    measured[z] = np.std(depth - z)
    assert measured[z] == pytest.approx(synthetic.noise_sigma(z), rel=0.15)
  assert measured[1.0] < measured[2.0] < measured[3.0]
  assert measured[3.0] > 3 * measured[1.0]  # faster than proportional to depth


def test_noise_is_spatially_correlated_like_interpolated_dots():
  depth, _ = synthetic.lidar_measurement(_flat_view(2.0), np.random.default_rng(1))
  error = depth - 2.0
  def correlation(shift):
    return np.corrcoef(error[:, :-shift].ravel(), error[:, shift:].ravel())[0, 1]
  # 70% of the variance is smooth over ~11 pixels (24 cells across 256), 30% per pixel.
  assert 0.6 < correlation(1) < 0.75
  assert correlation(40) < 0.15


def test_grazing_angles_and_range_lower_confidence_and_raise_noise():
  def measure(z, cos_view):
    return synthetic.lidar_measurement(_flat_view(z, cos_view=cos_view), np.random.default_rng(2))

  cases = {  # (depth m, |cos|) -> confidence everywhere
      (2.0, 0.9): 2, (2.0, 0.3): 1, (2.0, 0.1): 0,  # grazing: 66 and 78 degrees
      (3.9, 0.9): 2, (4.5, 0.9): 1, (5.5, 0.9): 0,  # range: 4 and 5 m
  }
  for (z, cos_view), level in cases.items():
    depth, confidence = measure(z, cos_view)
    assert np.all(confidence == level), (z, cos_view)
    assert np.all(depth > 0)
  assert np.std(measure(2.0, 0.1)[0] - 2.0) > 4 * np.std(measure(2.0, 0.9)[0] - 2.0)
  assert np.std(measure(5.5, 0.9)[0] - 5.5) > 1.7 * np.std(measure(4.9, 0.9)[0] - 4.9)
  depth, confidence = measure(7.0, 0.9)  # beyond MAX_RANGE_M: no return
  assert np.all(depth == 0) and np.all(confidence == 0)


def _box_before_wall():
  """Camera 1.5 m high looking along +z at a wall 3 m away; a box whose front
  face is 1 m away fills the right half of the image (camera x = -world x)."""
  materials = (synthetic.Material(synthetic._PLASTER, np.full(3, 0.6), np.full(3, 0.4), 0.5),)
  scene = synthetic.Scene(
      room_size=np.array([6.0, 3.0, 5.0]), face_materials=(0,) * 6,
      boxes=(synthetic.Box(np.array([0.5, 0.0, 3.0]), np.array([3.0, 3.0, 3.5]), 0),),
      spheres=(), materials=materials, light_direction=np.array([0.0, -1.0, 0.0]), exposure=1.0)
  pose = synthetic.CameraPose(synthetic._rotation(0.0, 0.0, 0.0), np.array([3.0, 1.5, 2.0]))
  k = intrinsics_lib.default_intrinsics(*synthetic.DEPTH_SIZE)
  return synthetic.render_view(scene, pose, k, synthetic.DEPTH_SIZE, shade=False)


def test_occluding_edges_get_wrong_depth_and_low_confidence():
  view = _box_before_wall()
  depth, confidence = synthetic.lidar_measurement(view, np.random.default_rng(3))
  rows = slice(40, 100)  # well above the floor
  centre = synthetic.DEPTH_SIZE[1] // 2  # the box's edge: columns centre-1 | centre
  np.testing.assert_allclose(view.depth[rows, centre + 1], 1.0, rtol=1e-6)
  np.testing.assert_allclose(view.depth[rows, centre - 2], 3.0, rtol=1e-6)
  radius = synthetic.edge_band_radius(synthetic.DEPTH_SIZE)
  assert radius == 2  # at the LiDAR's 256x192
  band = slice(centre - radius, centre + radius)
  assert np.all(confidence[rows, band] == 0)
  # Flying pixels: between the two surfaces, never on either.
  assert np.all((depth[rows, band] > 1.0 + 0.15 * 2.0 - 0.01) &
                (depth[rows, band] < 1.0 + 0.85 * 2.0 + 0.01))
  assert np.all(np.abs(depth - view.depth)[rows, band] > 0.25)
  # Beside the band, head-on and in range: high confidence, small errors.
  for side in (slice(centre - 30, centre - radius - 1), slice(centre + radius + 1, centre + 30)):
    assert np.all(confidence[rows, side] == 2)
    assert np.abs(depth - view.depth)[rows, side].max() < 6 * synthetic.noise_sigma(3.0)
  # The wall meets the floor and the box meets the floor without a depth
  # jump: creases are not edges.
  floor_crease = (view.surface == 2) & (confidence == 0) & (view.cos_view > 0.2)
  assert not np.any(floor_crease[:, :centre - radius - 1])


@pytest.mark.parametrize("domain_name", ["source", "target"])
def test_rooms_have_all_three_levels_and_errors_follow_confidence(domain_name):
  spec = synthetic.domain(domain_name)
  size = (96, 72)
  errors = {0: [], 1: [], 2: []}
  for seed in range(spec.base_seed, spec.base_seed + 3):
    examples = synthetic.render_sequence(seed, 2, (24, 18), size, domain_name=domain_name)
    scene, poses = spec.make_scene(np.random.default_rng(seed), 2)
    for example, pose in zip(examples, poses):
      k_depth = intrinsics_lib.scale_intrinsics(example["intrinsics"], (24, 18), size)
      exact = synthetic.render_view(scene, pose, k_depth, size, shade=False).depth
      valid = example["depth"] > 0
      for level in errors:
        errors[level].append(np.abs(example["depth"] - exact)[valid & (example["confidence"] == level)])
  mean = {level: np.concatenate(e).mean() for level, e in errors.items()}
  assert all(np.concatenate(e).size > 100 for e in errors.values())  # all three levels occur
  assert mean[0] > 3 * mean[2] and mean[1] > 1.3 * mean[2], mean
  assert mean[2] < 0.05  # trusted pixels: a few cm


# --- The target domain ------------------------------------------------------

def _domain_sample(domain_name, frames=2, rooms=3, size=(48, 36)):
  spec = synthetic.domain(domain_name)
  examples, heights = [], []
  for seed in range(spec.base_seed, spec.base_seed + rooms):
    examples += list(synthetic.render_sequence(seed, frames, size, size, domain_name=domain_name))
    heights += [p.position[1] for p in spec.make_scene(np.random.default_rng(seed), frames)[1]]
  return examples, np.array(heights)


def _saturation(image):
  image = image.astype(np.float64)
  high = image.max(-1)
  return np.mean((high - image.min(-1)) / np.maximum(high, 1.0))


def test_target_domain_differs_measurably_from_the_source():
  source, source_heights = _domain_sample("source")
  target, target_heights = _domain_sample("target")
  # Field of view: fx 0.60 against 0.755 of the long side (80 against 67 degrees).
  assert target[0]["intrinsics"][0, 0] == pytest.approx(0.60 * 48)
  assert source[0]["intrinsics"][0, 0] == pytest.approx(0.755 * 48)
  # Camera held lower: the ranges 0.65-1.0 m and 1.1-1.6 m do not overlap.
  assert target_heights.max() < source_heights.min()
  # Smaller rooms (depth within ~5 m; the source's reach 7 m across).
  def diagonals(domain_name):
    spec = synthetic.domain(domain_name)
    rooms = [spec.make_scene(np.random.default_rng(seed), 2)[0].room_size
             for seed in range(spec.base_seed, spec.base_seed + 20)]
    return np.array([np.hypot(size[0], size[2]) for size in rooms])
  assert diagonals("target").mean() < 0.8 * diagonals("source").mean()
  assert diagonals("target").max() < 6.4 < diagonals("source").max()
  assert max(e["depth"].max() for e in target) < 5.0
  # Colour: saturated palettes against near-grey ones.
  assert np.mean([_saturation(e["image"]) for e in target]) > 3 * np.mean(
      [_saturation(e["image"]) for e in source])
  # Rooms are never shared: different seeds and names.
  target_plan = synthetic.plan_sequences(domain_name="target")
  source_plan = synthetic.plan_sequences()
  assert not {p.seed for p in target_plan} & {p.seed for p in source_plan}
  assert all(p.name.startswith("home_") and p.domain == "target" for p in target_plan)


def test_target_plan_is_20_rooms_split_by_room():
  plan = synthetic.plan_sequences(domain_name="target")
  assert sum(p.num_frames for p in plan) == 600 and len(plan) == 20
  assert all(25 <= p.num_frames <= 35 for p in plan)
  split_plan = splits.split_sequences({p.name: p.num_frames for p in plan})
  rooms = {split: {name for name, _ in parts} for split, parts in split_plan.items()}
  assert len(rooms["validation"]) >= 2 and len(rooms["test"]) >= 2  # unseen rooms
  assert not (rooms["train"] & rooms["validation"]) and not (rooms["train"] & rooms["test"])
  with pytest.raises(ValueError, match="unknown synthetic domain"):
    synthetic.plan_sequences(domain_name="nosuch")


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


class SyntheticTargetTinyBuildTest(tfds.testing.DatasetBuilderTestCase):
  """The real builder on a tiny `synthetic_target` variant: 3 rooms of 3 frames."""
  DATASET_CLASS = builder_module.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = [tfds_record3d.Record3dConfig(
      name="synthetic_target_tiny", num_frames=9, image_size=(32, 24), depth_size=(16, 12),
      synthetic_domain="target")]
  SPLITS = {"train": 3, "validation": 3, "test": 3}
