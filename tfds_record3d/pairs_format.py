"""Reading folders of RGB / depth pairs (the `pairs` config).

Layout (M is the manual folder):
  M/<sequence>/rgb/0001.jpg       RGB (.jpg, .jpeg or .png); the seed's `X/` works too
  M/<sequence>/depth/0001.png     depth, same stem; the seed's `Y/` works too
  M/<sequence>/confidence/0001.png  optional uint8 (H_d, W_d), 0/1/2
  M/<sequence>/depth2d.json       optional manifest (else M/depth2d.json)
`rgb/` + `depth/` directly in M make one sequence named after M.

Depth files:
  .png  16-bit, `depth_scale` units per meter (default 1000 = millimeters;
        TUM RGB-D uses 5000). Raw 0 and 65535 are invalid.
  .npy  float32 (H_d, W_d) in meters.
  .exr  one float channel in meters (Record3D's EXR export).
Invalid depth (NaN, inf, <= 0, 0 / 65535 raw) becomes 0.

Manifest `depth2d.json` (all keys optional):
  {"depth_scale": 5000,                      # units per meter for .png depth
   "intrinsics": {"fx": .., "fy": .., "cx": .., "cy": ..},  # or a 3x3 list
   "image_size": [H, W],                     # size K refers to (default: the images')
   "pair_by": "stem"}                        # "stem" | "order" | "timestamp"
`pair_by`: "stem" matches equal file stems; "order" zips the sorted lists
(the seed's notebook; counts must be equal); "timestamp" reads stems as
seconds and matches each RGB to the nearest depth within 20 ms (TUM).

Per frame: `frame` is the RGB file's stem when it is all digits
(000012.jpg -> 12), else the frame's position in the sequence (0, 1, ...
in pairing order); `source` is the RGB file relative to M
("kitchen/rgb/000012.jpg"); `timestamp` is the stem read as seconds when it
is a decimal number with a fraction (TUM: 1305031102.175304) or when
pair_by is "timestamp", else -1; `pose` is the identity and `camera`
"unknown" (a folder of pairs carries neither).
RGB is stored as the file's own bytes (see decoding.stored_rgb).
A Record3D EXR export's `metadata.json` in the sequence folder also
provides intrinsics (its column-major `K`). Without any, intrinsics default
to fx = fy = 0.755 * max(H, W), principal point at the image centre.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from typing import Iterator

import numpy as np
import OpenEXR
from absl import logging
from etils import epath

from tfds_record3d import decoding
from tfds_record3d import depth_checks
from tfds_record3d.frame_example import NO_TIMESTAMP
from tfds_record3d.frame_example import frame_example
from tfds_record3d import intrinsics as intrinsics_lib
from tfds_record3d import validation
from tfds_record3d.validation import Problem

RGB_DIRS = ("rgb", "X")
DEPTH_DIRS = ("depth", "Y")
CONFIDENCE_DIR = "confidence"
MANIFEST_NAME = "depth2d.json"
RECORD3D_METADATA_NAME = "metadata.json"
RGB_SUFFIXES = (".jpg", ".jpeg", ".png")
DEPTH_SUFFIXES = (".png", ".npy", ".exr")
CONFIDENCE_SUFFIXES = (".png", ".npy")
DEFAULT_DEPTH_SCALE = 1000.0  # units per meter: millimeters
TIMESTAMP_TOLERANCE_S = 0.02
_DECIMAL_STEM = re.compile(r"^\d+\.\d+$")  # TUM: 1305031102.175304


@dataclasses.dataclass(frozen=True)
class PairsFrame:
  frame: int
  rgb: epath.Path
  depth: epath.Path
  confidence: epath.Path | None
  source: str = ""  # rgb relative to the manual folder
  timestamp: float = NO_TIMESTAMP


@dataclasses.dataclass(frozen=True)
class PairsFrameTask:
  """Everything needed to read one frame, and nothing more: a Beam build ships
  one of these per element (the sequence's whole frame list would be copied
  into every element)."""
  sequence: str
  frame: PairsFrame
  depth_scale: float
  intrinsics: np.ndarray | None
  intrinsics_size: tuple[int, int] | None

  def read(self) -> dict:
    frame = self.frame
    image = decoding.stored_rgb(frame.rgb.read_bytes())
    image_size = decoding.header_size(image)
    depth = read_depth(frame.depth, self.depth_scale)
    confidence = None
    if frame.confidence is not None:
      confidence = read_confidence(frame.confidence)
    return frame_example(image, depth, confidence,
                         _intrinsics_for(self.intrinsics, self.intrinsics_size, image_size),
                         self.sequence, frame.frame, source=frame.source,
                         timestamp=frame.timestamp)


def _intrinsics_for(k, k_size, image_size) -> np.ndarray:
  if k is None:
    return intrinsics_lib.default_intrinsics(*image_size)
  return intrinsics_lib.scale_intrinsics(k, k_size or image_size, image_size)


@dataclasses.dataclass(frozen=True)
class PairsSequence:
  name: str
  folder: epath.Path
  frames: tuple[PairsFrame, ...]
  depth_scale: float
  # K (3, 3) as given and the (H, W) it refers to; None -> documented default.
  intrinsics: np.ndarray | None
  intrinsics_size: tuple[int, int] | None
  valid_pixels: tuple[int, ...]  # valid depth pixels per frame (split checks)

  def intrinsics_for(self, image_size: tuple[int, int]) -> np.ndarray:
    return _intrinsics_for(self.intrinsics, self.intrinsics_size, image_size)

  def frame_task(self, position: int) -> PairsFrameTask:
    return PairsFrameTask(self.name, self.frames[position], self.depth_scale,
                          self.intrinsics, self.intrinsics_size)

  def read_frames(self, positions) -> Iterator[dict]:
    for position in positions:
      yield self.frame_task(position).read()


def read_depth(path: epath.Path, depth_scale: float = DEFAULT_DEPTH_SCALE) -> np.ndarray:
  """Depth file -> float32 (H_d, W_d) meters, 0 = invalid. Raises DecodeError."""
  suffix = path.suffix.lower()
  data = path.read_bytes()
  if not data:
    raise decoding.DecodeError("empty depth file (0 bytes)")
  if suffix == ".png":
    with decoding.open_image(data, "depth PNG") as image:
      mode = image.mode
      raw = np.asarray(image)
    if mode not in ("I;16", "I;16B", "I;16L", "I") or raw.ndim != 2:
      raise decoding.DecodeError(
          f"depth PNG must be single-channel 16-bit, got mode {mode!r} "
          f"(an 8-bit PNG loses the depth precision)")
    return decoding.depth_from_uint16(raw, depth_scale)
  if suffix == ".npy":
    try:
      array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
      raise decoding.DecodeError(f"unreadable .npy ({e})") from e
    if array.dtype != np.float32 or array.ndim != 2:
      raise decoding.DecodeError(
          f"depth .npy must be float32 (H, W) meters, got {array.dtype} {array.shape}")
    return decoding.clean_depth(array)
  if suffix == ".exr":
    try:
      with OpenEXR.File(io.BytesIO(data)) as exr:
        channels = {name: ch.pixels for name, ch in exr.channels().items()}
    except Exception as e:
      raise decoding.DecodeError(f"unreadable .exr ({e})") from e
    if len(channels) != 1:
      raise decoding.DecodeError(f"depth .exr must have one channel, found {sorted(channels)}")
    (array,) = channels.values()
    if array.ndim != 2 or array.dtype.kind != "f":
      raise decoding.DecodeError(f"depth .exr must hold floats (H, W), got {array.dtype} {array.shape}")
    return decoding.clean_depth(array)
  raise decoding.DecodeError(f"unsupported depth file type {suffix!r}")


def read_confidence(path: epath.Path) -> np.ndarray:
  """Confidence file (.png 8-bit or .npy uint8) -> uint8 (H_d, W_d) of 0/1/2."""
  data = path.read_bytes()
  if path.suffix.lower() == ".npy":
    if not data:
      raise decoding.DecodeError("empty confidence file (0 bytes)")
    try:
      array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
      raise decoding.DecodeError(f"unreadable confidence file ({e})") from e
  else:
    with decoding.open_image(data, "confidence PNG") as image:
      array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 2:
    raise decoding.DecodeError(f"confidence must be uint8 (H, W), got {array.dtype} {array.shape}")
  return decoding.check_confidence(array)


def _natural_key(stem: str):
  """'2' < '10'; digit runs compare as numbers."""
  return [(0, int(part), "") if part.isdigit() else (1, 0, part)
          for part in re.split(r"(\d+)", stem) if part]


def _files_by_stem(folder: epath.Path, suffixes, problems) -> dict[str, epath.Path]:
  """stem -> file; two files with one stem (000001.jpg and 000001.png) are a
  Problem each: which one is the frame cannot be guessed. (The first one
  stays in the map, so its partner is not reported missing as well.)"""
  by_stem: dict[str, list[epath.Path]] = {}
  for p in sorted(folder.iterdir()):
    if p.suffix.lower() in suffixes and not p.name.startswith("."):
      by_stem.setdefault(p.stem, []).append(p)
  for stem, paths in by_stem.items():
    if len(paths) > 1:
      others = ", ".join(p.name for p in paths)
      problems += [Problem(str(p), f"several files share the stem '{stem}' ({others}): "
                           "keep one per frame") for p in paths]
  return {stem: paths[0] for stem, paths in by_stem.items()}


def _find_dir(folder: epath.Path, candidates) -> epath.Path | None:
  for name in candidates:
    if (folder / name).is_dir():
      return folder / name
  return None


def _load_manifest(folder: epath.Path, manual_dir: epath.Path, problems) -> dict:
  """The sequence's depth2d.json, else M's, plus intrinsics from metadata.json."""
  manifest = {}
  for candidate in (manual_dir / MANIFEST_NAME, folder / MANIFEST_NAME):
    if candidate.exists():  # the sequence's own manifest wins
      try:
        manifest.update(json.loads(candidate.read_text()))
      except ValueError as e:
        problems.append(Problem(str(candidate), f"invalid JSON ({e})"))
  record3d_meta = folder / RECORD3D_METADATA_NAME
  if "intrinsics" not in manifest and record3d_meta.exists():
    try:
      meta = json.loads(record3d_meta.read_text())
      manifest["intrinsics"] = np.asarray(meta["K"], np.float32).reshape(3, 3).T.tolist()
      manifest["image_size"] = [int(meta["h"]), int(meta["w"])]
    except (ValueError, KeyError, TypeError) as e:
      problems.append(Problem(str(record3d_meta), f"cannot read K, w, h ({e})"))
  return manifest


def _parse_intrinsics(value) -> np.ndarray:
  if isinstance(value, dict):
    return np.array([[value["fx"], 0, value["cx"]], [0, value["fy"], value["cy"]], [0, 0, 1]],
                    dtype=np.float32)
  k = np.asarray(value, dtype=np.float32)
  if k.shape != (3, 3):
    raise ValueError(f"intrinsics must be 3x3 or {{fx, fy, cx, cy}}, got shape {k.shape}")
  return k


def _pair(rgb: dict, depth: dict, pair_by: str, rgb_dir, depth_dir, problems):
  """Matches RGB and depth files; returns [(stem, rgb_path, depth_path)]."""
  if pair_by == "order":
    if len(rgb) != len(depth):
      problems.append(Problem(
          str(depth_dir), f"pair_by 'order' needs as many depth files ({len(depth)}) "
          f"as RGB files ({len(rgb)}) in {rgb_dir}"))
      return []
    return [(r, rgb[r], depth[d]) for r, d in zip(sorted(rgb, key=_natural_key),
                                                    sorted(depth, key=_natural_key))]
  if pair_by == "timestamp":
    try:
      depth_times = sorted((float(stem), stem) for stem in depth)
      rgb_times = sorted((float(stem), stem) for stem in rgb)
    except ValueError as e:
      problems.append(Problem(str(rgb_dir), f"pair_by 'timestamp' needs numeric stems ({e})"))
      return []
    times = np.array([t for t, _ in depth_times])
    pairs = []
    for time, stem in rgb_times:
      nearest = int(np.argmin(np.abs(times - time))) if len(times) else -1
      if nearest >= 0 and abs(times[nearest] - time) <= TIMESTAMP_TOLERANCE_S:
        pairs.append((stem, rgb[stem], depth[depth_times[nearest][1]]))
      else:
        logging.warning("No depth within %.3f s of %s; frame skipped.",
                        TIMESTAMP_TOLERANCE_S, rgb[stem])
    return pairs
  if pair_by != "stem":
    problems.append(Problem(str(rgb_dir), f"unknown pair_by {pair_by!r}"))
    return []
  for stem in sorted(set(rgb) - set(depth), key=_natural_key):
    problems.append(Problem(str(rgb[stem]), f"missing partner: no depth file '{stem}.*' in {depth_dir}"))
  for stem in sorted(set(depth) - set(rgb), key=_natural_key):
    problems.append(Problem(str(depth[stem]), f"missing partner: no RGB file '{stem}.*' in {rgb_dir}"))
  return [(s, rgb[s], depth[s]) for s in sorted(set(rgb) & set(depth), key=_natural_key)]


def _stem_timestamp(stem: str, pair_by: str) -> float:
  if pair_by == "timestamp" or _DECIMAL_STEM.match(stem):
    return float(stem)
  return NO_TIMESTAMP


def _relative(path: epath.Path, manual_dir: epath.Path) -> str:
  return path.relative_to(manual_dir).as_posix()


def _scan_sequence(name, folder, manual_dir, problems, check=True) -> PairsSequence | None:
  """Lists, pairs and (when `check`) fully decodes one sequence folder.

  check=False only lists and pairs (what a Beam worker redoes to find the
  frames the launcher already checked); `valid_pixels` is then empty.
  """
  start = len(problems)
  rgb_dir = _find_dir(folder, RGB_DIRS)
  depth_dir = _find_dir(folder, DEPTH_DIRS)
  manifest = _load_manifest(folder, manual_dir, problems)
  try:
    depth_scale = float(manifest.get("depth_scale", DEFAULT_DEPTH_SCALE))
    if depth_scale <= 0:
      raise ValueError("depth_scale must be > 0")
    k = _parse_intrinsics(manifest["intrinsics"]) if "intrinsics" in manifest else None
    k_size = tuple(manifest["image_size"]) if "image_size" in manifest else None
  except (ValueError, KeyError, TypeError) as e:
    problems.append(Problem(str(folder / MANIFEST_NAME), f"invalid manifest ({e})"))
    return None

  rgb = _files_by_stem(rgb_dir, RGB_SUFFIXES, problems)
  depth = _files_by_stem(depth_dir, DEPTH_SUFFIXES, problems)
  if not rgb and not depth:
    if len(problems) == start:
      problems.append(Problem(str(rgb_dir), "no RGB or depth files"))
    return None
  confidence_dir = folder / CONFIDENCE_DIR
  confidence = (_files_by_stem(confidence_dir, CONFIDENCE_SUFFIXES, problems)
                if confidence_dir.is_dir() else {})

  frames, frame_depths = [], []
  pair_by = manifest.get("pair_by", "stem")
  for position, (stem, rgb_path, depth_path) in enumerate(
      _pair(rgb, depth, pair_by, rgb_dir, depth_dir, problems)):
    confidence_path = confidence.get(stem)
    frame_number = int(stem) if stem.isdigit() else position
    frames.append(PairsFrame(frame_number, rgb_path, depth_path, confidence_path,
                             _relative(rgb_path, manual_dir), _stem_timestamp(stem, pair_by)))
    if not check:
      continue
    try:
      image_size = decoding.image_size(rgb_path.read_bytes())
    except decoding.DecodeError as e:
      problems.append(Problem(str(rgb_path), str(e)))
      image_size = None
    try:
      depth_m = read_depth(depth_path, depth_scale)
      depth_shape = depth_m.shape
      frame_depths.append(depth_checks.summarize(depth_m))
    except decoding.DecodeError as e:
      problems.append(Problem(str(depth_path), str(e)))
      depth_shape = None
    if image_size and depth_shape and not intrinsics_lib.same_aspect_ratio(image_size, depth_shape):
      problems.append(Problem(
          str(rgb_path), f"aspect ratio of RGB {image_size[0]}x{image_size[1]} differs from "
          f"depth {depth_path.name} {depth_shape[0]}x{depth_shape[1]}"))
    if confidence_path is not None:
      try:
        confidence_shape = read_confidence(confidence_path).shape
        if depth_shape and confidence_shape != depth_shape:
          problems.append(Problem(str(confidence_path),
                                  f"shape {confidence_shape} differs from depth {depth_shape}"))
      except decoding.DecodeError as e:
        problems.append(Problem(str(confidence_path), str(e)))
  if not check:
    if len(problems) > start:
      return None
    return PairsSequence(name, folder, tuple(frames), depth_scale, k, k_size, ())
  if len(problems) == start:
    if not frames:
      problems.append(Problem(str(folder), "no RGB/depth pairs"))
    elif (problem := depth_checks.no_valid_depth(str(folder), frame_depths)) is not None:
      problems.append(problem)
  if len(problems) > start:
    return None
  warning = depth_checks.scale_warning(name, frame_depths, _scale_fix(folder, frames, depth_scale))
  if warning:
    logging.warning("%s", warning)
  return PairsSequence(name, folder, tuple(frames), depth_scale, k, k_size,
                       tuple(f.valid_pixels for f in frame_depths))


def _scale_fix(folder: epath.Path, frames, depth_scale: float) -> str:
  """What to change when the depth scale looks wrong (only PNG depth has one)."""
  if any(f.depth.suffix.lower() == ".png" for f in frames):
    return (f"set \"depth_scale\" (units per meter, now {depth_scale:g}) in "
            f"{folder / MANIFEST_NAME}, e.g. 5000 for TUM RGB-D, 1000 for millimeters")
  return "its .npy / .exr depth must be in meters"


def _is_sequence_folder(folder: epath.Path) -> bool:
  return _find_dir(folder, RGB_DIRS) is not None and _find_dir(folder, DEPTH_DIRS) is not None


def load_sequence(name: str, folder, manual_dir) -> PairsSequence:
  """The frames of one sequence the launcher's `scan` already checked, listed
  again without decoding (a Beam worker's view). Raises ValueError naming the
  files if the folder no longer pairs up."""
  problems: list[Problem] = []
  sequence = _scan_sequence(name, epath.Path(folder), epath.Path(manual_dir), problems,
                            check=False)
  if sequence is None:
    raise ValueError(f"{folder} changed since it was checked: "
                     + "; ".join(str(p) for p in problems))
  return sequence


def scan(manual_dir: epath.Path) -> tuple[list[PairsSequence], list[Problem]]:
  """Finds and fully validates every sequence under `manual_dir`."""
  problems: list[Problem] = []
  if _is_sequence_folder(manual_dir):
    folders = [(manual_dir.name, manual_dir)]
  else:
    folders = []
    for child in sorted(manual_dir.iterdir()):
      if not child.is_dir() or child.name.startswith((".", "__")):
        continue
      if _is_sequence_folder(child):
        folders.append((child.name, child))
      else:
        problems.append(Problem(
            str(child), "not a sequence: needs rgb/ (or X/) and depth/ (or Y/) subfolders"))
    if not folders and not problems:
      problems.append(Problem(str(manual_dir),
                              "no sequence folders (<sequence>/rgb + <sequence>/depth)"))
  def check(named_folder, found):
    name, folder = named_folder
    logging.info("Checking sequence %s", folder)
    return _scan_sequence(name, folder, manual_dir, found)

  checked = validation.check_each(folders, check, "sequences", problems)
  return [sequence for sequence in checked if sequence is not None], problems
