"""Point clouds (numpy): back-projection, world coordinates from Record3D poses,
voxel fusion, and binary PLY files.

  `camera_points` / `world_points`  depth [H,W] + K (+ pose) -> xyz [N,3];
  `VoxelFuser`     one voxel-downsampled cloud from many frames (mean position and
                   colour per voxel); `fuse_frame` adds one frame to it;
  `write_points_ply` / `read_ply`   binary little-endian PLY with colours;
  `write_ply`      one depth map's points in camera axes, straight to a PLY.
"""

from __future__ import annotations

import numpy as np

from tfds_record3d import poses as poses_lib
from trainer import sampling

DEFAULT_VOXEL_SIZE = 0.02  # meters: room-scale geometry stays legible, files stay small
FUSION_LONG_SIDE = 256  # predicted depth is sampled on a grid of at most this for fusion
# One vertex of our PLY files: position in meters, colour.
_PLY_VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                        ("red", "u1"), ("green", "u1"), ("blue", "u1")])


def camera_points(depth: np.ndarray, intrinsics: np.ndarray, stride: int = 1) -> tuple:
  """(xyz float32 [N,3] in OpenCV camera axes (x right, y down, z forward), mask
  [h,w] of the valid pixels of the every-`stride`-th-pixel grid they come from).

  Pixel (i, j) has its centre at (j + 0.5, i + 0.5), the dataset's convention.
  """
  depth = np.asarray(depth, np.float32)[stride // 2::stride, stride // 2::stride]
  v, u = np.mgrid[0:depth.shape[0], 0:depth.shape[1]].astype(np.float32)
  u, v = u * stride + stride // 2 + 0.5, v * stride + stride // 2 + 0.5
  valid = np.isfinite(depth) & (depth > 0)
  z = depth[valid]
  x = (u[valid] - intrinsics[0, 2]) * z / intrinsics[0, 0]
  y = (v[valid] - intrinsics[1, 2]) * z / intrinsics[1, 1]
  return np.stack([x, y, z], axis=-1).astype(np.float32), valid


def world_points(depth: np.ndarray, intrinsics: np.ndarray, pose: np.ndarray,
                 stride: int = 1) -> tuple:
  """(xyz [N,3] world, mask) of depth [H,W] seen by a camera with Record3D pose
  `pose` (camera-to-world [4,4], OpenGL camera axes); see `camera_points`."""
  xyz, valid = camera_points(depth, intrinsics, stride)
  transform = poses_lib.opencv_camera_to_world(pose).astype(np.float64)
  world = xyz.astype(np.float64) @ transform[:3, :3].T + transform[:3, 3]
  return world.astype(np.float32), valid


_KEY_BITS = 21  # per axis: +-2^20 voxels (+-21 km at 2 cm)
_KEY_OFFSET = 1 << (_KEY_BITS - 1)


class VoxelFuser:
  """Accumulates world points into voxels of `voxel_size` meters: one point per
  occupied voxel, at the mean position and mean colour of its points."""

  def __init__(self, voxel_size: float):
    if not voxel_size > 0:
      raise ValueError(f"voxel size must be > 0 meters, got {voxel_size}")
    self.voxel_size = float(voxel_size)
    self._keys = np.zeros(0, np.int64)
    self._sums = np.zeros((0, 6), np.float64)  # x, y, z, r, g, b summed
    self._counts = np.zeros(0, np.int64)
    self.frames = 0

  def add(self, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """xyz float [N,3] world meters, rgb uint8 [N,3]."""
    self.frames += 1
    cells = np.floor(np.asarray(xyz, np.float64) / self.voxel_size).astype(np.int64)
    inside = np.all(np.abs(cells) < _KEY_OFFSET, axis=1)  # far outliers cannot be keyed
    cells, xyz, rgb = cells[inside] + _KEY_OFFSET, xyz[inside], rgb[inside]
    keys = (cells[:, 0] << (2 * _KEY_BITS)) | (cells[:, 1] << _KEY_BITS) | cells[:, 2]
    sums = np.concatenate([np.asarray(xyz, np.float64), np.asarray(rgb, np.float64)], axis=1)
    keys = np.concatenate([self._keys, keys])
    sums = np.concatenate([self._sums, sums])
    counts = np.concatenate([self._counts, np.ones(len(xyz), np.int64)])
    self._keys, inverse = np.unique(keys, return_inverse=True)
    self._sums = np.stack([np.bincount(inverse, sums[:, c], len(self._keys)) for c in range(6)], 1)
    self._counts = np.bincount(inverse, counts, len(self._keys)).astype(np.int64)

  def points(self) -> tuple:
    """(xyz float32 [M,3], rgb uint8 [M,3], points per voxel int64 [M])."""
    mean = self._sums / np.maximum(self._counts, 1)[:, None]
    return (mean[:, :3].astype(np.float32), np.clip(np.round(mean[:, 3:]), 0, 255).astype(np.uint8),
            self._counts)


def fuse_frame(fuser: VoxelFuser, depth: np.ndarray, rgb: np.ndarray, intrinsics: np.ndarray,
               pose: np.ndarray) -> None:
  """Adds one frame's depth [h,w] (K for that size) to `fuser`, coloured by rgb [H,W,3];
  depth is sampled on a grid of at most FUSION_LONG_SIDE."""
  stride = sampling.grid_stride(depth.shape, FUSION_LONG_SIDE)
  xyz, valid = world_points(depth, intrinsics, pose, stride)
  colours = sampling.resample_nearest(rgb, depth.shape)[stride // 2::stride, stride // 2::stride]
  fuser.add(xyz, colours[valid])


def write_points_ply(path: str, xyz: np.ndarray, rgb: np.ndarray) -> int:
  """xyz float [N,3], rgb uint8 [N,3] -> binary little-endian PLY; returns N."""
  vertices = np.zeros(len(xyz), dtype=_PLY_VERTEX)
  vertices["x"], vertices["y"], vertices["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
  vertices["red"], vertices["green"], vertices["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
  header = ("ply\nformat binary_little_endian 1.0\n"
            f"element vertex {len(xyz)}\n"
            "property float x\nproperty float y\nproperty float z\n"
            "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
  with open(path, "wb") as f:
    f.write(header.encode("ascii"))
    f.write(vertices.tobytes())
  return int(len(xyz))


def read_ply(path: str) -> tuple:
  """(xyz float32 [N,3], rgb uint8 [N,3]) of a PLY written by `write_points_ply`."""
  with open(path, "rb") as f:
    data = f.read()
  end = data.index(b"end_header\n") + len(b"end_header\n")
  vertices = np.frombuffer(data[end:], dtype=_PLY_VERTEX)
  xyz = np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=-1)
  return xyz, np.stack([vertices["red"], vertices["green"], vertices["blue"]], axis=-1)


def write_ply(path: str, depth: np.ndarray, rgb: np.ndarray, intrinsics: np.ndarray) -> int:
  """Back-projects valid depth [H,W] with K into a binary little-endian PLY; returns points.

  OpenCV camera axes (x right, y down, z forward), as Record3D's depth is.
  """
  xyz, valid = camera_points(depth, intrinsics)
  return write_points_ply(path, xyz, rgb[valid])
