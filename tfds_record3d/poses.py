"""Record3D camera poses as 4x4 matrices.

A `.r3d` capture's metadata holds `poses`: one row per frame of 7 numbers
`qx, qy, qz, qw, tx, ty, tz` (a unit quaternion, scalar last, then a
translation in meters): the camera-to-world transform in OpenGL camera axes
(x right, y up, z backward, i.e. the camera looks along -z). For a point X_cam
in that camera frame, X_world = R @ X_cam + t.

Our depth maps and point clouds use OpenCV camera axes (x right, y down, z
forward). `opencv_camera_to_world` turns a Record3D pose into the transform
that takes OpenCV-camera points to world points:
  T_cv = T_gl @ diag(1, -1, -1, 1)
because X_gl = diag(1, -1, -1) @ X_cv (y and z flip sign).

Pure numpy; no TensorFlow.
"""

from __future__ import annotations

import numpy as np

# X_gl = OPENCV_TO_OPENGL @ X_cv (homogeneous): flips y (down -> up) and z
# (forward -> backward). It is its own inverse.
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0]).astype(np.float32)

# Quaternions whose norm is further than this from 1 are refused rather than
# silently normalised: they point at a wrong column order, not at rounding.
_NORM_TOLERANCE = 1e-2


def _rotation(qx: float, qy: float, qz: float, qw: float) -> np.ndarray:
  """3x3 float64 rotation of a (normalised) unit quaternion, scalar last."""
  q = np.array([qx, qy, qz, qw], dtype=np.float64)
  if not np.all(np.isfinite(q)):
    raise ValueError(f"pose quaternion {q.tolist()} is not finite")
  norm = np.linalg.norm(q)
  if abs(norm - 1.0) > _NORM_TOLERANCE:
    raise ValueError(f"pose quaternion (qx,qy,qz,qw)={q.tolist()} has norm {norm:.4f}, "
                     "not 1: is the row in Record3D's order qx,qy,qz,qw,tx,ty,tz?")
  x, y, z, w = q / norm
  return np.array([
      [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
  ])


def pose_matrix(qx: float, qy: float, qz: float, qw: float,
                tx: float, ty: float, tz: float) -> np.ndarray:
  """float32 [4,4] camera-to-world (OpenGL camera axes) of one Record3D pose row.

  Raises ValueError when the quaternion is not finite or not of unit norm
  (within 1e-2; it is normalised exactly), or the translation is not finite.
  """
  t = np.array([tx, ty, tz], dtype=np.float64)
  if not np.all(np.isfinite(t)):
    raise ValueError(f"pose translation {t.tolist()} is not finite")
  matrix = np.eye(4, dtype=np.float64)
  matrix[:3, :3] = _rotation(qx, qy, qz, qw)
  matrix[:3, 3] = t
  return matrix.astype(np.float32)


def pose_matrices(poses) -> np.ndarray:
  """float32 [N,4,4] from Record3D `poses` (N x 7 rows qx,qy,qz,qw,tx,ty,tz).

  N may be 0 (returns [0,4,4]). Raises ValueError naming the row on a wrong
  shape or a bad row (see `pose_matrix`).
  """
  rows = np.asarray(poses, dtype=np.float64)
  if rows.size == 0:
    return np.zeros((0, 4, 4), dtype=np.float32)
  if rows.ndim != 2 or rows.shape[1] != 7:
    raise ValueError(f"poses must be N x 7 (qx,qy,qz,qw,tx,ty,tz); got shape {rows.shape}")
  out = np.empty((rows.shape[0], 4, 4), dtype=np.float32)
  for i, row in enumerate(rows):
    try:
      out[i] = pose_matrix(*row)
    except ValueError as e:
      raise ValueError(f"poses[{i}]: {e}") from e
  return out


def opencv_camera_to_world(pose: np.ndarray) -> np.ndarray:
  """float32 [...,4,4]: maps OpenCV-camera points (x right, y down, z forward)
  to world points, from Record3D camera-to-world matrices [...,4,4] (OpenGL axes)."""
  return (np.asarray(pose, dtype=np.float32) @ OPENCV_TO_OPENGL).astype(np.float32)


def quaternion_from_matrix(rotation: np.ndarray) -> np.ndarray:
  """(qx, qy, qz, qw) float64 with qw >= 0 of a 3x3 rotation; the inverse of
  `pose_matrix`'s rotation (used to write test captures with known poses)."""
  m = np.asarray(rotation, dtype=np.float64)
  trace = np.trace(m)
  if trace > 0:
    s = 2.0 * np.sqrt(trace + 1.0)
    q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4]
  elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
    s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
    q = [s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
  elif m[1, 1] > m[2, 2]:
    s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
    q = [(m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
  else:
    s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
    q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4, (m[1, 0] - m[0, 1]) / s]
  q = np.array(q)
  return -q if q[3] < 0 else q
