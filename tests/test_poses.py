"""tfds_record3d.poses: Record3D pose rows -> 4x4 camera-to-world matrices."""

import numpy as np
import pytest

from tfds_record3d import poses


def test_identity_and_translation():
  m = poses.pose_matrix(0, 0, 0, 1, 1.5, -2.0, 3.0)
  assert m.dtype == np.float32 and m.shape == (4, 4)
  np.testing.assert_array_equal(m[:3, :3], np.eye(3))
  np.testing.assert_array_equal(m[:3, 3], [1.5, -2.0, 3.0])
  np.testing.assert_array_equal(m[3], [0, 0, 0, 1])


def test_known_rotation_about_y():
  # 90 degrees about +y, quaternion (0, sin45, 0, cos45): x -> -z, z -> x.
  s = np.sqrt(0.5)
  m = poses.pose_matrix(0, s, 0, s, 0, 0, 0)
  np.testing.assert_allclose(m[:3, :3] @ [1, 0, 0], [0, 0, -1], atol=1e-6)
  np.testing.assert_allclose(m[:3, :3] @ [0, 0, 1], [1, 0, 0], atol=1e-6)
  # Camera-to-world: the camera centre (origin) maps to the translation.
  m = poses.pose_matrix(0, s, 0, s, 1, 2, 3)
  np.testing.assert_allclose(m @ [0, 0, 0, 1], [1, 2, 3, 1], atol=1e-6)


def test_round_trip_random_rotations_are_orthonormal():
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(20):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    rows.append([*q, *rng.normal(size=3)])
  matrices = poses.pose_matrices(rows)
  assert matrices.shape == (20, 4, 4) and matrices.dtype == np.float32
  for row, m in zip(rows, matrices):
    r = m[:3, :3].astype(np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-5)
    q = poses.quaternion_from_matrix(r)
    expected = np.array(row[:4]) * np.sign(row[3])  # q and -q are the same rotation
    np.testing.assert_allclose(q, expected, atol=1e-5)


def test_opencv_camera_to_world_flips_y_and_z():
  # Identity Record3D pose: the OpenGL camera looks along world -z, so a point
  # 2 m in front of the camera (OpenCV z = +2, y down = +1) is at world (0, -1, -2).
  t = poses.opencv_camera_to_world(poses.pose_matrix(0, 0, 0, 1, 0, 0, 0))
  np.testing.assert_allclose(t @ [0, 1, 2, 1], [0, -1, -2, 1])
  batch = poses.opencv_camera_to_world(np.stack([np.eye(4)] * 3))
  assert batch.shape == (3, 4, 4)


def test_empty_and_bad_rows():
  assert poses.pose_matrices([]).shape == (0, 4, 4)
  with pytest.raises(ValueError, match="N x 7"):
    poses.pose_matrices([[0, 0, 0, 1, 0, 0]])
  with pytest.raises(ValueError, match=r"poses\[1\].*norm"):
    poses.pose_matrices([[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 2, 0, 0, 0]])  # not unit
  with pytest.raises(ValueError, match="not finite"):
    poses.pose_matrix(0, 0, 0, 1, np.nan, 0, 0)
  with pytest.raises(ValueError, match="not finite"):
    poses.pose_matrix(np.nan, 0, 0, 1, 0, 0, 0)
  # Slightly off unit norm (rounding in the JSON) is normalised, not refused.
  m = poses.pose_matrix(0, 0, 0, 1.001, 0, 0, 0)
  np.testing.assert_allclose(m[:3, :3], np.eye(3), atol=1e-6)
