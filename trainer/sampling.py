"""Sampling images on other grids (numpy), shared by the flicker figure and the fused cloud.

  `grid_stride`       the every-s-th-pixel grid with at most N pixels on the long side;
  `grid_indices`      its row and column indices (pixel s // 2, s // 2 + s, ...);
  `resample_nearest`  the nearest pixel at the pixel centres of another size.
"""

from __future__ import annotations

import math

import numpy as np


def grid_stride(shape, long_side: int) -> int:
  """s >= 1 such that every s-th pixel of `shape` (H, W, ...) is at most `long_side` on
  the long side."""
  return max(1, math.ceil(max(shape[:2]) / long_side))


def grid_indices(shape, long_side: int) -> tuple:
  """Row and column index arrays of the `grid_stride` grid, starting at s // 2."""
  stride = grid_stride(shape, long_side)
  return np.arange(stride // 2, shape[0], stride), np.arange(stride // 2, shape[1], stride)


def resample_nearest(image: np.ndarray, size) -> np.ndarray:
  """Nearest sample at the pixel centres of `size` (H, W) (same aspect ratio)."""
  rows = np.minimum(((np.arange(size[0]) + 0.5) * image.shape[0] / size[0]).astype(int),
                    image.shape[0] - 1)
  cols = np.minimum(((np.arange(size[1]) + 0.5) * image.shape[1] / size[1]).astype(int),
                    image.shape[1] - 1)
  return image[rows[:, None], cols[None, :]]
