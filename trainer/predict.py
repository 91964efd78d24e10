r"""Depth for your own photos and captures with an exported model: a library, and its CLI.

  python -m trainer.predict --export_dir M/export --output_dir O photo1.jpg photo2.png
  python -m trainer.predict --export_dir M/export --output_dir O --ply kitchen.r3d walk.mp4 frames/

--export_dir is a SavedModel folder or a .tflite file (`trainer.exported_model`).

For each image NAME it writes into O: NAME_depth.png (16-bit, millimeters),
NAME_depth_color.png (colourised, near = blue), NAME_depth.npy (float32 meters),
and with --ply NAME.ply (coloured point cloud). A missing or unreadable image
is reported by name and the others are still processed; the exit code is 1
when any image failed. Outputs never overwrite one another: two inputs with
the same NAME are refused before anything is written, and an existing output
file is replaced only with --overwrite. 16-bit greyscale images are scaled to
8 bits (logged); floating-point images are refused.

A capture NAME (a Record3D NAME.r3d, a video NAME.mp4/.mov/..., or a folder NAME/
of frames; `trainer.captures`) is predicted frame by frame into:
  O/NAME/FRAME_depth.png, FRAME_depth_color.png, FRAME_depth.npy (and FRAME.ply
      with --ply and --frame_ply): the per-image outputs, FRAME = 000012 (the
      .r3d's frame index, the video's frame number) or the frame file's stem;
  O/NAME_depth.mp4   RGB | colourised depth | colour bar in meters, one colour
      scale for the whole video (2nd..98th percentile of every frame's depth);
      needs the `video` extra (--novideo skips it);
  O/NAME_stability.json  the temporal-stability figure (`stability.StabilityMeter`),
      also printed;
  O/NAME_fused.ply (--ply, captures with poses: .r3d): every frame's predicted
      points in world coordinates, one point per --voxel_size voxel; beside it
      O/NAME_fused_lidar.ply, the same from the capture's own LiDAR depth.
A damaged capture (a .r3d or video cut short, an unreadable frame) is predicted
up to the damage; its video, stability and fused cloud cover those frames, the
error names the file and the frame, and the exit code is 1.

The library part (`read_rgb`, `write_depth_outputs`, `predict_files`,
`predict_capture`, `predict_paths`; point clouds and PLY files in
`trainer.pointclouds`) defines no flags; the CLI's flags are declared only when
this module runs as the program.
"""

import json
import os
import sys
from typing import Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image

from tfds_record3d import intrinsics as intrinsics_lib
from trainer import captures as captures_lib
from trainer import depth_ops
from trainer import exported_model
from trainer import pointclouds
from trainer import progress as progress_lib
from trainer import stability as stability_lib
from trainer.captures import read_rgb  # pylint: disable=unused-import  # part of this API


def camera_intrinsics(height: int, width: int, fx=None, fy=None, cx=None, cy=None,
                      base: Optional[np.ndarray] = None) -> np.ndarray:
  """3x3 K for an image of this size: the given values, else `base` (a capture's
  own K), else the dataset's iPhone-like default
  (`tfds_record3d.intrinsics.default_intrinsics`)."""
  k = (np.array(base, np.float32) if base is not None
       else intrinsics_lib.default_intrinsics(height, width))
  for (row, col), value in (((0, 0), fx), ((1, 1), fy), ((0, 2), cx), ((1, 2), cy)):
    if value is not None:
      k[row, col] = value
  return k


OUTPUT_SUFFIXES = ("_depth.png", "_depth_color.png", "_depth.npy", ".ply")
# Per-capture outputs beside the capture's folder O/NAME/.
CAPTURE_SUFFIXES = ("_depth.mp4", "_stability.json", "_fused.ply", "_fused_lidar.ply")


def output_stems(image_paths: Sequence[str], output_dir: str, overwrite: bool = False) -> dict:
  """{path: output stem}; ValueError naming the files when two inputs would write
  the same outputs, or (without `overwrite`) when outputs already exist."""
  stems = {p: os.path.join(output_dir, os.path.splitext(os.path.basename(p))[0])
           for p in image_paths}
  _refuse_clashes(stems)
  if not overwrite:
    _refuse_existing(output_dir, [f"{stem}{suffix}" for stem in stems.values()
                                  for suffix in OUTPUT_SUFFIXES])
  return stems


def capture_stems(capture_paths: Sequence[str], output_dir: str, overwrite: bool = False) -> dict:
  """{capture path: O/NAME} like `output_stems`; a capture's outputs exist when
  O/NAME/ holds any file or any O/NAME{CAPTURE_SUFFIXES} exists."""
  stems = {p: os.path.join(output_dir, captures_lib.capture_name(p)) for p in capture_paths}
  _refuse_clashes(stems)
  if not overwrite:
    existing = [f"{stem}{suffix}" for stem in stems.values() for suffix in CAPTURE_SUFFIXES]
    for stem in stems.values():
      if os.path.isdir(stem):
        existing += [os.path.join(stem, name) for name in sorted(os.listdir(stem))]
    _refuse_existing(output_dir, existing)
  return stems


def _refuse_clashes(stems: dict) -> None:
  by_stem = {}
  for path, stem in stems.items():
    by_stem.setdefault(stem, []).append(path)
  clashes = [paths for paths in by_stem.values() if len(paths) > 1]
  if clashes:
    raise ValueError("these inputs would write the same outputs; rename them or predict "
                     "them in separate runs: " + "; ".join(" and ".join(c) for c in clashes))


def _refuse_existing(output_dir: str, candidates: Sequence[str]) -> None:
  existing = sorted(p for p in candidates if os.path.exists(p))
  if existing:
    raise ValueError(f"{len(existing)} output file(s) already exist in {output_dir} (e.g. "
                     f"{existing[0]}); pass --overwrite to replace them, or choose another "
                     "--output_dir")


def write_depth_outputs(stem: str, depth: np.ndarray) -> tuple:
  """STEM_depth.png (uint16 mm), STEM_depth_color.png, STEM_depth.npy (meters) for
  depth [H,W] meters; returns the colour scale (vmin, vmax) used."""
  millimeters = np.clip(np.round(depth * 1000.0), 0, 65535).astype(np.uint16)
  Image.fromarray(millimeters).save(f"{stem}_depth.png")
  vmin, vmax = depth_ops.depth_range(depth)
  Image.fromarray(depth_ops.colourize(depth, vmin, vmax)).save(f"{stem}_depth_color.png")
  np.save(f"{stem}_depth.npy", depth.astype(np.float32))
  return vmin, vmax


def load_model(export: str) -> exported_model.ExportedModel:
  """A SavedModel folder or .tflite file (ValueError naming the path otherwise)."""
  return exported_model.load(export)


def predict_files(export_dir: str, image_paths: Sequence[str], output_dir: str,
                  ply: bool = False, intrinsics: Optional[dict] = None,
                  overwrite: bool = False, model=None) -> dict:
  """Runs the export on each file; returns {path: error message or None}.

  `intrinsics`: optional {"fx", "fy", "cx", "cy"} in pixels of the input images.
  `model`: an already loaded `exported_model` (else `export_dir` is loaded).
  Raises ValueError before writing anything when outputs would clash or exist
  (see `output_stems`).
  """
  stems = output_stems(image_paths, output_dir, overwrite)
  model = model or load_model(export_dir)
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
    depth = model.predict(rgb)  # [H,W] meters
    stem = stems[path]
    vmin, vmax = write_depth_outputs(stem, depth)
    if ply:
      pointclouds.write_ply(f"{stem}.ply", depth, rgb,
                            camera_intrinsics(*depth.shape, **(intrinsics or {})))
    outcome[path] = None
    progress.update(add=1, suffix=f"{path} -> {stem}_depth.png ({vmin:.2f}..{vmax:.2f} m)")
  return outcome


def predict_capture(model, capture_path: str, output_dir: str, stem: str, ply: bool = False,
                    frame_ply: bool = True, video: bool = True, intrinsics: Optional[dict] = None,
                    fps: Optional[float] = None,
                    voxel_size: float = pointclouds.DEFAULT_VOXEL_SIZE) -> dict:
  """Predicts every frame of one capture into `stem`/ and the per-capture outputs
  `stem`_depth.mp4, _stability.json, _fused.ply, _fused_lidar.ply (see the module doc).

  Returns {"frames": n, "error": message or None, "stability": summary,
  "outputs": [paths]}. A damaged capture (`captures.CaptureError`) ends the
  frame loop; everything is still written for the frames before the damage.
  Other ValueErrors (not a capture, unreadable metadata) propagate.
  """
  capture = captures_lib.open_capture(capture_path)
  writer_module = None
  if video:
    from trainer import video as video_lib  # pylint: disable=import-outside-toplevel
    video_lib.require_imageio(f"writing {stem}_depth.mp4 (or pass --novideo)")
    writer_module = video_lib
  os.makedirs(stem, exist_ok=True)
  meter = stability_lib.StabilityMeter()
  scale = writer_module.ColourScale() if writer_module else None
  fused = pointclouds.VoxelFuser(voxel_size) if ply else None
  fused_lidar = pointclouds.VoxelFuser(voxel_size) if ply else None
  progress = progress_lib.Progress(f"predict {capture.name}", capture.expected_frames or 0,
                                   unit="frames", every_seconds=5, start_at_first_update=True)
  names, error, posed = [], None, 0
  try:
    for frame in capture.frames():
      depth = model.predict(frame.rgb)  # [H,W] meters at the frame's size
      frame_stem = os.path.join(stem, frame.name)
      write_depth_outputs(frame_stem, depth)
      k = camera_intrinsics(*depth.shape, base=frame.intrinsics, **(intrinsics or {}))
      if ply and frame_ply:
        pointclouds.write_ply(f"{frame_stem}.ply", depth, frame.rgb, k)
      if fused is not None and frame.pose is not None:
        posed += 1
        pointclouds.fuse_frame(fused, depth, frame.rgb, k, frame.pose)
        if frame.depth is not None:
          k_depth = intrinsics_lib.scale_intrinsics(k, depth.shape, frame.depth.shape)
          pointclouds.fuse_frame(fused_lidar, frame.depth, frame.rgb, k_depth, frame.pose)
      meter.add(frame.rgb, depth, frame.depth)
      if scale is not None:
        scale.add(depth)
      names.append(frame.name)
      progress.total = max(progress.total, len(names))
      progress.update(done=len(names), suffix=f"{frame_stem}_depth.png")
  except captures_lib.CaptureError as e:
    error = str(e)
    logging.error("%s; writing the outputs of the %d frame(s) read", e, len(names))
  if not names:
    return {"frames": 0, "error": error or f"{capture_path}: no frames", "stability": None,
            "outputs": []}
  outputs = [stem + os.sep]
  stability = meter.summary()
  record = {"capture": capture_path, "model": model.path, "frames": len(names),
            "complete": error is None, "error": error,
            "definition": " ".join(stability_lib.StabilityMeter.__doc__.split()), **stability}
  with open(f"{stem}_stability.json", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  outputs.append(f"{stem}_stability.json")
  if fused is not None:
    if posed:
      for fuser, suffix in ((fused, "_fused.ply"), (fused_lidar, "_fused_lidar.ply")):
        if fuser.frames:
          xyz, rgb, _ = fuser.points()
          count = pointclouds.write_points_ply(f"{stem}{suffix}", xyz, rgb)
          logging.info("%s%s: %d points (%g m voxels) from %d frames", stem, suffix, count,
                       voxel_size, fuser.frames)
          outputs.append(f"{stem}{suffix}")
    else:
      logging.warning("%s: no poses (a %s capture): no fused point cloud", capture_path,
                      capture.kind)
  if writer_module is not None:
    outputs.append(_write_video(writer_module, capture, stem, names, scale.range(),
                                fps or capture.fps or 30.0))
  return {"frames": len(names), "error": error, "stability": stability, "outputs": outputs}


def _write_video(video_lib, capture, stem: str, names: Sequence[str], colour_range: tuple,
                 fps: float) -> str:
  """Second pass over the capture: RGB from the capture, depth from the .npy files."""
  path = f"{stem}_depth.mp4"
  vmin, vmax = colour_range
  progress = progress_lib.Progress(f"video {capture.name}", len(names), unit="frames",
                                   every_seconds=5, start_at_first_update=True)
  frames = capture.frames()
  with video_lib.VideoWriter(path, fps) as writer:
    try:
      for frame, name in zip(frames, names):  # stops before the damage, if any
        depth = np.load(os.path.join(stem, f"{name}_depth.npy"))
        writer.append(video_lib.compose(frame.rgb, depth, vmin, vmax, label=name))
        progress.update(add=1, suffix=path)
    finally:
      frames.close()
  logging.info("%s: %d frames at %g fps, colours %.2f..%.2f m", path, writer.frames, fps,
               vmin, vmax)
  return path


def predict_paths(export: str, paths: Sequence[str], output_dir: str, ply: bool = False,
                  intrinsics: Optional[dict] = None, overwrite: bool = False,
                  frame_ply: bool = True, video: bool = True, fps: Optional[float] = None,
                  voxel_size: float = pointclouds.DEFAULT_VOXEL_SIZE) -> dict:
  """Images and captures together; returns {path: error message or None}.

  Every output of every input is checked for clashes and existing files
  before anything is written (ValueError naming them).
  """
  capture_paths = [p for p in paths if captures_lib.capture_kind(p)]
  image_paths = [p for p in paths if p not in capture_paths]
  output_stems(image_paths, output_dir, overwrite)
  stems = capture_stems(capture_paths, output_dir, overwrite)
  if video and capture_paths:  # before any work, not after the first capture's frames
    from trainer import video as video_lib  # pylint: disable=import-outside-toplevel
    video_lib.require_imageio("the depth video of a capture (or pass --novideo)")
  model = load_model(export)
  outcome = {}
  if image_paths:
    outcome.update(predict_files(export, image_paths, output_dir, ply=ply, intrinsics=intrinsics,
                                 overwrite=overwrite, model=model))
  os.makedirs(output_dir, exist_ok=True)
  for path in capture_paths:
    try:
      result = predict_capture(model, path, output_dir, stems[path], ply=ply, frame_ply=frame_ply,
                               video=video, intrinsics=intrinsics, fps=fps, voxel_size=voxel_size)
    except ValueError as e:  # not readable as a capture at all
      logging.error("skipped %s", e)
      outcome[path] = str(e)
      continue
    if result["stability"]:
      print(stability_lib.stability_line(captures_lib.capture_name(path), result["stability"]))
    logging.info("%s: %d frames -> %s", path, result["frames"], ", ".join(result["outputs"]))
    outcome[path] = result["error"]
  return outcome


# ----------------------------------------------------------------------------
# The command line (flags are declared only when this module is the program).
# ----------------------------------------------------------------------------
def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("export_dir", None, "SavedModel written by trainer.main (M/export), or "
                      "one of its .tflite files.")
  flags.DEFINE_string("output_dir", None, "Local folder for the outputs (created).")
  flags.DEFINE_bool("ply", False, "Also write a coloured point cloud NAME.ply; for a capture "
                    "with poses (.r3d) also NAME_fused.ply in world coordinates.")
  flags.DEFINE_bool("frame_ply", True, "With --ply on a capture, also one PLY per frame "
                    "(large: ~10 MB per 720x960 frame); --noframe_ply: the fused cloud only.")
  flags.DEFINE_float("voxel_size", pointclouds.DEFAULT_VOXEL_SIZE, "Voxel edge in meters of "
                     "the fused point cloud (one point per voxel).")
  flags.DEFINE_bool("video", True, "Write NAME_depth.mp4 for each capture (needs the video "
                    "extra: pip install -e \".[video]\").")
  flags.DEFINE_float("fps", None, "Frame rate of the depth video (default: the capture's, "
                     "else 30).")
  flags.DEFINE_float("fx", None, "Focal length x in pixels of the input image (default: the "
                     ".r3d's own, else iPhone-like).")
  flags.DEFINE_float("fy", None, "Focal length y in pixels (default: as --fx).")
  flags.DEFINE_float("cx", None, "Principal point x in pixels (default: the .r3d's, else the "
                     "image centre).")
  flags.DEFINE_float("cy", None, "Principal point y in pixels (default: as --cx).")
  flags.DEFINE_bool("overwrite", False, "Replace outputs that already exist in --output_dir.")
  return flags.FLAGS


def main(argv, flag_values) -> int:
  paths = argv[1:]
  problem = None
  if not flag_values.export_dir or not flag_values.output_dir:
    problem = "--export_dir and --output_dir are required"
  elif "://" in flag_values.output_dir:
    # os.makedirs would make a local folder named "gs:" instead.
    problem = (f"--output_dir={flag_values.output_dir}: must be a local folder (trainer.predict "
               "writes local files); copy the outputs up afterwards, e.g. with "
               "`python -m launch.stage upload`")
  elif not paths:
    problem = "give one or more images or captures (.r3d, video, folder of frames) after the flags"
  elif flag_values.voxel_size <= 0:
    problem = f"--voxel_size={flag_values.voxel_size} must be > 0 meters"
  elif flag_values.fps is not None and flag_values.fps <= 0:
    problem = f"--fps={flag_values.fps} must be > 0"
  elif "://" not in flag_values.export_dir and not os.path.exists(flag_values.export_dir):
    problem = f"--export_dir={flag_values.export_dir}: no such SavedModel folder or .tflite file"
  if problem:  # the message alone, not the help text (--help shows that)
    print(f"trainer.predict: error: {problem}", file=sys.stderr)
    return 2
  try:
    outcome = predict_paths(flag_values.export_dir, paths, flag_values.output_dir,
                            ply=flag_values.ply, overwrite=flag_values.overwrite,
                            frame_ply=flag_values.frame_ply, video=flag_values.video,
                            fps=flag_values.fps, voxel_size=flag_values.voxel_size,
                            intrinsics={k: flag_values[k].value for k in ("fx", "fy", "cx", "cy")})
  except (ValueError, ImportError) as e:  # clashing/existing outputs, a bad export, no imageio
    print(f"trainer.predict: error: {e}", file=sys.stderr)
    return 2
  failed = {p: e for p, e in outcome.items() if e}
  logging.info("%d of %d inputs done, outputs in %s", len(outcome) - len(failed), len(outcome),
               flag_values.output_dir)
  for message in failed.values():
    print(f"FAILED: {message}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(lambda argv: main(argv, FLAGS))
