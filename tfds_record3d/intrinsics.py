"""Pinhole intrinsics shared by every config.

Convention used throughout the package: pixel (row i, column j) has its
centre at image coordinates (u, v) = (j + 0.5, i + 0.5). With that
convention, resizing an image by a factor s maps K to diag(s, s, 1) @ K
exactly, which is how depth-size intrinsics are derived from the image-size
intrinsics stored in the `intrinsics` feature.
"""

from __future__ import annotations

import numpy as np

# Focal length as a fraction of the longer image side. The iPhone wide camera
# that Record3D records with has fx ~ 1450 px at 1920x1440, i.e. ~0.755 of the
# long side (~67 degrees across it). Used by `synthetic` and as the `pairs`
# default when no manifest gives intrinsics.
DEFAULT_FOCAL_FRACTION = 0.755


def default_intrinsics(height: int, width: int) -> np.ndarray:
  """Returns the documented default K (3, 3) float32 for an image size.

  fx = fy = 0.755 * max(height, width); principal point at the image centre.
  """
  focal = DEFAULT_FOCAL_FRACTION * max(height, width)
  return np.array(
      [[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]],
      dtype=np.float32,
  )


def scale_intrinsics(
    intrinsics: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]
) -> np.ndarray:
  """Maps K for an image of `from_size` (H, W) to K for `to_size` (H, W)."""
  scale_y = to_size[0] / from_size[0]
  scale_x = to_size[1] / from_size[1]
  scaled = np.array(intrinsics, dtype=np.float64).copy()
  scaled[0, :] *= scale_x  # fx, skew, cx
  scaled[1, :] *= scale_y  # fy, cy
  return scaled.astype(np.float32)


def same_aspect_ratio(
    size_a: tuple[int, int], size_b: tuple[int, int], tolerance: float = 0.01
) -> bool:
  """True if two (H, W) sizes have the same H/W ratio within `tolerance`."""
  ratio_a = size_a[0] / size_a[1]
  ratio_b = size_b[0] / size_b[1]
  return abs(ratio_a - ratio_b) <= tolerance * ratio_a
