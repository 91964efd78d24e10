"""Reading Record3D `.r3d` exports (the `r3d` config).

An `.r3d` file is a ZIP holding:
  metadata          JSON: w, h (RGB size), dw, dh (depth size), K (9 floats,
                    column-major, intrinsics for the RGB size), fps,
                    cameraType, poses, optional perFrameIntrinsicCoeffs
                    ([fx, fy, cx, cy] per frame).
  rgbd/{i}.jpg      RGB frame i.
  rgbd/{i}.depth    LZFSE-compressed float32 (dh, dw), row-major, meters.
  rgbd/{i}.conf     optional LZFSE-compressed uint8 (dh, dw), 0/1/2.
One file is one sequence named after the file's stem; `frame` is i.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from typing import Iterator

import lzfse
import numpy as np
from absl import logging
from etils import epath

from tfds_record3d import decoding
from tfds_record3d import depth_checks
from tfds_record3d.frame_example import frame_example
from tfds_record3d import intrinsics as intrinsics_lib
from tfds_record3d.validation import Problem

METADATA_NAME = "metadata"
REQUIRED_KEYS = ("w", "h", "dw", "dh", "K")
_FRAME_RE = re.compile(r"^rgbd/(\d+)\.(jpg|depth|conf)$")


@dataclasses.dataclass(frozen=True)
class R3dSequence:
  """One validated .r3d file."""
  path: epath.Path
  metadata: dict
  frames: tuple[int, ...]  # Frame indices i with both rgbd/{i}.jpg and .depth.
  has_confidence: tuple[bool, ...]  # Per frame.
  valid_pixels: tuple[int, ...]  # Valid depth pixels per frame (split checks).

  @property
  def name(self) -> str:
    return self.path.stem

  @property
  def depth_size(self) -> tuple[int, int]:
    return int(self.metadata["dh"]), int(self.metadata["dw"])

  def intrinsics(self, frame: int, image_size: tuple[int, int]) -> np.ndarray:
    """K (3, 3) float32 for frame `frame` at the decoded image size (H, W)."""
    meta = self.metadata
    coeffs = meta.get("perFrameIntrinsicCoeffs")
    if coeffs and frame < len(coeffs):
      fx, fy, cx, cy = coeffs[frame][:4]
      k = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float32)
    else:
      # Stored column-major: reshape gives K^T.
      k = np.asarray(meta["K"], dtype=np.float32).reshape(3, 3).T
    stated = (int(meta["h"]), int(meta["w"]))
    if tuple(image_size) != stated:
      k = intrinsics_lib.scale_intrinsics(k, stated, image_size)
    return k

  def read_frames(self, positions) -> Iterator[dict]:
    """Yields examples (feature dict of numpy values) for frame positions."""
    with self.path.open("rb") as f, zipfile.ZipFile(f) as archive:
      for position in positions:
        yield _read_frame(self, archive, position)


def _read_frame(sequence: R3dSequence, archive: zipfile.ZipFile, position: int) -> dict:
  frame = sequence.frames[position]
  image = decoding.decode_rgb(archive.read(f"rgbd/{frame}.jpg"))
  depth = _decode_depth(archive.read(f"rgbd/{frame}.depth"), sequence.depth_size)
  confidence = None
  if sequence.has_confidence[position]:
    confidence = _decode_confidence(archive.read(f"rgbd/{frame}.conf"), sequence.depth_size)
  return frame_example(image, depth, confidence, sequence.intrinsics(frame, image.shape[:2]),
                       sequence.name, frame)


def _decompress(data: bytes, what: str) -> bytes:
  try:
    return lzfse.decompress(data)
  except Exception as e:  # lzfse.error, or MemoryError on truncated streams
    raise decoding.DecodeError(f"{what} is not valid LZFSE data ({type(e).__name__})") from e


def _decode_depth(data: bytes, size: tuple[int, int]) -> np.ndarray:
  raw = _decompress(data, "depth")
  expected = size[0] * size[1] * 4
  if len(raw) != expected:
    raise decoding.DecodeError(
        f"depth decompresses to {len(raw)} bytes, expected {expected} "
        f"(float32 {size[0]}x{size[1]} from metadata dh x dw)")
  return decoding.clean_depth(np.frombuffer(raw, dtype="<f4").reshape(size))


def _decode_confidence(data: bytes, size: tuple[int, int]) -> np.ndarray:
  raw = _decompress(data, "confidence")
  expected = size[0] * size[1]
  if len(raw) != expected:
    raise decoding.DecodeError(
        f"confidence decompresses to {len(raw)} bytes, expected {expected} "
        f"(uint8 {size[0]}x{size[1]} from metadata dh x dw)")
  return decoding.check_confidence(np.frombuffer(raw, dtype=np.uint8).reshape(size).copy())


def _scan_file(path: epath.Path, problems: list[Problem]) -> R3dSequence | None:
  """Validates one .r3d completely (decodes every frame); appends problems."""
  start = len(problems)
  size = path.stat().length
  if not size:
    problems.append(Problem(str(path), "empty file (0 bytes): export it again from Record3D"))
    return None
  try:
    with path.open("rb") as f, zipfile.ZipFile(f) as archive:
      names = set(archive.namelist())
      if METADATA_NAME not in names:
        problems.append(Problem(str(path), "no 'metadata' entry: not a Record3D .r3d export"))
        return None
      try:
        metadata = json.loads(archive.read(METADATA_NAME))
        missing = [k for k in REQUIRED_KEYS if k not in metadata]
        if missing:
          raise ValueError(f"missing keys {missing}")
        depth_size = (int(metadata["dh"]), int(metadata["dw"]))
        if len(metadata["K"]) != 9:
          raise ValueError("K must have 9 values")
      except (ValueError, TypeError) as e:
        problems.append(Problem(f"{path}:{METADATA_NAME}", f"invalid metadata JSON ({e})"))
        return None

      parts: dict[int, set[str]] = {}
      for name in names:
        match = _FRAME_RE.match(name)
        if match:
          parts.setdefault(int(match.group(1)), set()).add(match.group(2))
      if not parts:
        problems.append(Problem(str(path), "no frames (rgbd/{i}.jpg + rgbd/{i}.depth)"))
        return None

      frames, has_confidence, frame_depths = [], [], []
      for frame in sorted(parts):
        kinds = parts[frame]
        for needed, partner in (("jpg", "depth"), ("depth", "jpg")):
          if needed in kinds and partner not in kinds:
            problems.append(Problem(
                f"{path}:rgbd/{frame}.{needed}", f"missing partner rgbd/{frame}.{partner}"))
        if not {"jpg", "depth"} <= kinds:
          continue
        entry = f"{path}:rgbd/{frame}"
        try:
          image_size = decoding.image_size(archive.read(f"rgbd/{frame}.jpg"))
          if not intrinsics_lib.same_aspect_ratio(image_size, depth_size):
            problems.append(Problem(
                f"{entry}.jpg",
                f"aspect ratio of RGB {image_size[0]}x{image_size[1]} differs from "
                f"depth {depth_size[0]}x{depth_size[1]}"))
        except decoding.DecodeError as e:
          problems.append(Problem(f"{entry}.jpg", str(e)))
        try:
          frame_depths.append(depth_checks.summarize(
              _decode_depth(archive.read(f"rgbd/{frame}.depth"), depth_size)))
        except decoding.DecodeError as e:
          problems.append(Problem(f"{entry}.depth", str(e)))
        if "conf" in kinds:
          try:
            _decode_confidence(archive.read(f"rgbd/{frame}.conf"), depth_size)
          except decoding.DecodeError as e:
            problems.append(Problem(f"{entry}.conf", str(e)))
        frames.append(frame)
        has_confidence.append("conf" in kinds)
  except zipfile.BadZipFile:
    # A copy cut short loses the ZIP directory, which sits at the end.
    problems.append(Problem(str(path), f"truncated or not a zip ({size} bytes, no complete ZIP "
                            "directory): copy or export the .r3d again"))
    return None
  except (OSError, EOFError) as e:
    problems.append(Problem(str(path), f"truncated or unreadable .r3d ({e})"))
    return None
  if len(problems) == start:
    problem = depth_checks.no_valid_depth(str(path), frame_depths)
    if problem is not None:
      problems.append(problem)
  if len(problems) > start:
    return None
  warning = depth_checks.scale_warning(
      path.stem, frame_depths, "an .r3d stores meters: is this a Record3D export?")
  if warning:
    logging.warning("%s", warning)
  return R3dSequence(path, metadata, tuple(frames), tuple(has_confidence),
                     tuple(f.valid_pixels for f in frame_depths))


def scan(manual_dir: epath.Path) -> tuple[list[R3dSequence], list[Problem]]:
  """Finds and fully validates every `*.r3d` directly in `manual_dir`."""
  problems: list[Problem] = []
  paths = sorted(p for p in manual_dir.iterdir() if p.suffix.lower() == ".r3d")
  if not paths:
    problems.append(Problem(str(manual_dir), "no .r3d files found"))
  sequences = []
  for path in paths:
    logging.info("Checking %s", path)
    sequence = _scan_file(path, problems)
    if sequence is not None:
      sequences.append(sequence)
  return sequences, problems
