r"""Depth for your own photos with an exported model.

  python -m trainer.predict --export_dir M/export --output_dir O photo1.jpg photo2.png

For each image NAME it writes into O: NAME_depth.png (16-bit, millimeters),
NAME_depth_color.png (colourised, near = warm), NAME_depth.npy (float32 meters),
and with --ply NAME.ply (coloured point cloud). A missing or unreadable image
is reported by name and the others are still processed; the exit code is 1
when any image failed.
"""

import os
import sys
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from trainer import depth_ops

# iPhone LiDAR-like intrinsics for a portrait 960x720 RGB frame (Record3D), in
# pixels; scaled to the actual image size when no --fx/--fy/--cx/--cy are given.
IPHONE_RGB_SIZE = (960, 720)  # (H, W)
IPHONE_FX = IPHONE_FY = 670.0

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "SavedModel written by trainer.main (M/export).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for the outputs (created).")
_PLY = flags.DEFINE_bool("ply", False, "Also write a coloured point cloud NAME.ply.")
_FX = flags.DEFINE_float("fx", None, "Focal length x in pixels of the input image (default: iPhone-like).")
_FY = flags.DEFINE_float("fy", None, "Focal length y in pixels (default: iPhone-like).")
_CX = flags.DEFINE_float("cx", None, "Principal point x in pixels (default: image centre).")
_CY = flags.DEFINE_float("cy", None, "Principal point y in pixels (default: image centre).")


def default_intrinsics(height: int, width: int, fx=None, fy=None, cx=None, cy=None) -> np.ndarray:
  """3x3 K for an image of this size: given values, else iPhone-like scaled ones."""
  scale = width / IPHONE_RGB_SIZE[1]
  return np.array([[fx or IPHONE_FX * scale, 0.0, width / 2.0 if cx is None else cx],
                   [0.0, fy or IPHONE_FY * scale, height / 2.0 if cy is None else cy],
                   [0.0, 0.0, 1.0]], np.float32)


def read_rgb(path: str) -> np.ndarray:
  """uint8 [H,W,3]; raises ValueError naming the file when it is not a readable image."""
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such file")
  try:
    with Image.open(path) as image:
      image.load()  # truncated files fail here, not later
      return np.asarray(image.convert("RGB"))
  except (OSError, Image.DecompressionBombError, SyntaxError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from e


def write_ply(path: str, depth: np.ndarray, rgb: np.ndarray, intrinsics: np.ndarray) -> int:
  """Back-projects valid depth [H,W] with K into a binary little-endian PLY; returns points."""
  height, width = depth.shape
  v, u = np.mgrid[0:height, 0:width].astype(np.float32)
  valid = depth > 0
  z = depth[valid]
  x = (u[valid] - intrinsics[0, 2]) * z / intrinsics[0, 0]
  y = (v[valid] - intrinsics[1, 2]) * z / intrinsics[1, 1]
  vertices = np.zeros(z.size, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                     ("red", "u1"), ("green", "u1"), ("blue", "u1")])
  # OpenCV camera axes (x right, y down, z forward), as Record3D's depth is.
  vertices["x"], vertices["y"], vertices["z"] = x, y, z
  colours = rgb[valid]
  vertices["red"], vertices["green"], vertices["blue"] = colours[:, 0], colours[:, 1], colours[:, 2]
  header = ("ply\nformat binary_little_endian 1.0\n"
            f"element vertex {z.size}\n"
            "property float x\nproperty float y\nproperty float z\n"
            "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
  with open(path, "wb") as f:
    f.write(header.encode("ascii"))
    f.write(vertices.tobytes())
  return int(z.size)


def predict_files(export_dir: str, image_paths: Sequence[str], output_dir: str,
                  ply: bool = False, intrinsics_flags: Optional[dict] = None) -> dict:
  """Runs the SavedModel on each file; returns {path: error message or None}."""
  serving = tf.saved_model.load(export_dir).signatures["serving_default"]
  os.makedirs(output_dir, exist_ok=True)
  outcome = {}
  start = time.time()
  for index, path in enumerate(image_paths):
    try:
      rgb = read_rgb(path)
    except ValueError as e:
      logging.error("skipped %s", e)
      outcome[path] = str(e)
      continue
    depth = serving(images=tf.constant(rgb[None]))["depth"].numpy()[0]  # [H,W] meters
    stem = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0])
    millimeters = np.clip(np.round(depth * 1000.0), 0, 65535).astype(np.uint16)
    Image.fromarray(millimeters).save(f"{stem}_depth.png")
    valid = depth[depth > 0]
    vmin, vmax = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)
    Image.fromarray(depth_ops.colourize(depth, vmin, vmax)).save(f"{stem}_depth_color.png")
    np.save(f"{stem}_depth.npy", depth.astype(np.float32))
    if ply:
      k = default_intrinsics(*depth.shape, **(intrinsics_flags or {}))
      write_ply(f"{stem}.ply", depth, rgb, k)
    outcome[path] = None
    done = index + 1
    eta = (time.time() - start) / done * (len(image_paths) - done)
    logging.info("[%d/%d] %s -> %s_depth.png (%.2f..%.2f m), %.0fs left", done,
                 len(image_paths), path, stem, vmin, vmax, eta)
  return outcome


def main(argv):
  paths = argv[1:]
  if not _EXPORT_DIR.value or not _OUTPUT_DIR.value:
    raise app.UsageError("--export_dir and --output_dir are required")
  if not paths:
    raise app.UsageError("give one or more image files after the flags")
  if not tf.io.gfile.exists(os.path.join(_EXPORT_DIR.value, "saved_model.pb")):
    raise app.UsageError(f"--export_dir={_EXPORT_DIR.value} holds no SavedModel (saved_model.pb)")
  outcome = predict_files(_EXPORT_DIR.value, paths, _OUTPUT_DIR.value, ply=_PLY.value,
                          intrinsics_flags={"fx": _FX.value, "fy": _FY.value,
                                            "cx": _CX.value, "cy": _CY.value})
  failed = {p: e for p, e in outcome.items() if e}
  logging.info("%d of %d images done, outputs in %s", len(outcome) - len(failed), len(outcome),
               _OUTPUT_DIR.value)
  for message in failed.values():
    print(f"FAILED: {message}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  app.run(main)
