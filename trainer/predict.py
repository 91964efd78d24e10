r"""Depth for your own photos with an exported model: a library, and its CLI.

  python -m trainer.predict --export_dir M/export --output_dir O photo1.jpg photo2.png

For each image NAME it writes into O: NAME_depth.png (16-bit, millimeters),
NAME_depth_color.png (colourised, near = blue), NAME_depth.npy (float32 meters),
and with --ply NAME.ply (coloured point cloud). A missing or unreadable image
is reported by name and the others are still processed; the exit code is 1
when any image failed. Outputs never overwrite one another: two inputs with
the same NAME are refused before anything is written, and an existing output
file is replaced only with --overwrite. 16-bit greyscale images are scaled to
8 bits (logged); floating-point images are refused.

The library part (`read_rgb`, `write_depth_outputs`, `write_ply`,
`predict_files`) defines no flags; the CLI's flags are declared only when this
module runs as the program.
"""

import os
import sys
from typing import Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from tfds_record3d import intrinsics as intrinsics_lib
from trainer import depth_ops
from trainer import progress as progress_lib


def camera_intrinsics(height: int, width: int, fx=None, fy=None, cx=None, cy=None) -> np.ndarray:
  """3x3 K for an image of this size: the given values, else the dataset's
  iPhone-like default (`tfds_record3d.intrinsics.default_intrinsics`)."""
  k = intrinsics_lib.default_intrinsics(height, width)
  for (row, col), value in (((0, 0), fx), ((1, 1), fy), ((0, 2), cx), ((1, 2), cy)):
    if value is not None:
      k[row, col] = value
  return k


# PIL modes of 16-bit (and 32-bit integer) greyscale images: PIL's own
# convert("RGB") clips them to 255, turning a typical photo white.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
OUTPUT_SUFFIXES = ("_depth.png", "_depth_color.png", "_depth.npy", ".ply")


def read_rgb(path: str) -> np.ndarray:
  """uint8 [H,W,3]; raises ValueError naming the file when it is not a readable
  8-bit or 16-bit image."""
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such file")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{path}: empty file (0 bytes)")
  try:
    with Image.open(path) as image:
      image.load()  # truncated files fail here, not later
      mode = image.mode
      if mode == "F":
        raise ValueError(f"{path}: a floating-point image; give 8-bit or 16-bit RGB")
      if mode in _WIDE_GREY_MODES:
        raw = np.asarray(image).astype(np.int64)
        if raw.min() < 0 or raw.max() > 65535:
          raise ValueError(f"{path}: {mode} values {raw.min()}..{raw.max()} are not 16-bit")
        logging.warning("%s: 16-bit greyscale image, scaled to 8 bits (/257) as grey RGB", path)
        grey = np.round(raw / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
      return np.asarray(image.convert("RGB"))
  except (OSError, Image.DecompressionBombError, SyntaxError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from e


def output_stems(image_paths: Sequence[str], output_dir: str, overwrite: bool = False) -> dict:
  """{path: output stem}; ValueError naming the files when two inputs would write
  the same outputs, or (without `overwrite`) when outputs already exist."""
  stems = {p: os.path.join(output_dir, os.path.splitext(os.path.basename(p))[0])
           for p in image_paths}
  by_stem = {}
  for path, stem in stems.items():
    by_stem.setdefault(stem, []).append(path)
  clashes = [paths for paths in by_stem.values() if len(paths) > 1]
  if clashes:
    raise ValueError("these inputs would write the same outputs; rename them or predict "
                     "them in separate runs: " + "; ".join(" and ".join(c) for c in clashes))
  if not overwrite:
    existing = sorted(f"{stem}{suffix}" for stem in stems.values() for suffix in OUTPUT_SUFFIXES
                      if os.path.exists(f"{stem}{suffix}"))
    if existing:
      raise ValueError(f"{len(existing)} output file(s) already exist in {output_dir} (e.g. "
                       f"{existing[0]}); pass --overwrite to replace them, or choose another "
                       "--output_dir")
  return stems


def write_depth_outputs(stem: str, depth: np.ndarray) -> tuple:
  """STEM_depth.png (uint16 mm), STEM_depth_color.png, STEM_depth.npy (meters) for
  depth [H,W] meters; returns the colour scale (vmin, vmax) used."""
  millimeters = np.clip(np.round(depth * 1000.0), 0, 65535).astype(np.uint16)
  Image.fromarray(millimeters).save(f"{stem}_depth.png")
  vmin, vmax = depth_ops.depth_range(depth)
  Image.fromarray(depth_ops.colourize(depth, vmin, vmax)).save(f"{stem}_depth_color.png")
  np.save(f"{stem}_depth.npy", depth.astype(np.float32))
  return vmin, vmax


def write_ply(path: str, depth: np.ndarray, rgb: np.ndarray, intrinsics: np.ndarray) -> int:
  """Back-projects valid depth [H,W] with K into a binary little-endian PLY; returns points."""
  height, width = depth.shape
  v, u = np.mgrid[0:height, 0:width].astype(np.float32)
  valid = depth > 0
  z = depth[valid]
  # Pixel centres at +0.5, the convention of the dataset's intrinsics.
  x = (u[valid] + 0.5 - intrinsics[0, 2]) * z / intrinsics[0, 0]
  y = (v[valid] + 0.5 - intrinsics[1, 2]) * z / intrinsics[1, 1]
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
                  ply: bool = False, intrinsics: Optional[dict] = None,
                  overwrite: bool = False) -> dict:
  """Runs the SavedModel on each file; returns {path: error message or None}.

  `intrinsics`: optional {"fx", "fy", "cx", "cy"} in pixels of the input images.
  Raises ValueError before writing anything when outputs would clash or exist
  (see `output_stems`).
  """
  stems = output_stems(image_paths, output_dir, overwrite)
  serving = tf.saved_model.load(export_dir).signatures["serving_default"]
  os.makedirs(output_dir, exist_ok=True)
  outcome = {}
  progress = progress_lib.Progress("predict", len(image_paths), unit="images", every_seconds=0)
  for path in image_paths:
    try:
      rgb = read_rgb(path)
    except ValueError as e:
      logging.error("skipped %s", e)
      outcome[path] = str(e)
      progress.update(add=1, suffix=f"skipped {path}")
      continue
    depth = serving(images=tf.constant(rgb[None]))["depth"].numpy()[0]  # [H,W] meters
    stem = stems[path]
    vmin, vmax = write_depth_outputs(stem, depth)
    if ply:
      write_ply(f"{stem}.ply", depth, rgb, camera_intrinsics(*depth.shape, **(intrinsics or {})))
    outcome[path] = None
    progress.update(add=1, suffix=f"{path} -> {stem}_depth.png ({vmin:.2f}..{vmax:.2f} m)")
  return outcome


# ----------------------------------------------------------------------------
# The command line (flags are declared only when this module is the program).
# ----------------------------------------------------------------------------
def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("export_dir", None, "SavedModel written by trainer.main (M/export).")
  flags.DEFINE_string("output_dir", None, "Folder for the outputs (created).")
  flags.DEFINE_bool("ply", False, "Also write a coloured point cloud NAME.ply.")
  flags.DEFINE_float("fx", None, "Focal length x in pixels of the input image (default: iPhone-like).")
  flags.DEFINE_float("fy", None, "Focal length y in pixels (default: iPhone-like).")
  flags.DEFINE_float("cx", None, "Principal point x in pixels (default: image centre).")
  flags.DEFINE_float("cy", None, "Principal point y in pixels (default: image centre).")
  flags.DEFINE_bool("overwrite", False, "Replace outputs that already exist in --output_dir.")
  return flags.FLAGS


def main(argv, flag_values) -> int:
  paths = argv[1:]
  problem = None
  if not flag_values.export_dir or not flag_values.output_dir:
    problem = "--export_dir and --output_dir are required"
  elif not paths:
    problem = "give one or more image files after the flags"
  elif not tf.io.gfile.exists(os.path.join(flag_values.export_dir, "saved_model.pb")):
    problem = f"--export_dir={flag_values.export_dir} holds no SavedModel (saved_model.pb)"
  if problem:  # the message alone, not the help text (--help shows that)
    print(f"trainer.predict: error: {problem}", file=sys.stderr)
    return 2
  try:
    outcome = predict_files(flag_values.export_dir, paths, flag_values.output_dir,
                            ply=flag_values.ply, overwrite=flag_values.overwrite,
                            intrinsics={k: flag_values[k].value for k in ("fx", "fy", "cx", "cy")})
  except ValueError as e:  # clashing or existing outputs: nothing was written
    print(f"trainer.predict: error: {e}", file=sys.stderr)
    return 2
  failed = {p: e for p, e in outcome.items() if e}
  logging.info("%d of %d images done, outputs in %s", len(outcome) - len(failed), len(outcome),
               flag_values.output_dir)
  for message in failed.values():
    print(f"FAILED: {message}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(lambda argv: main(argv, FLAGS))
