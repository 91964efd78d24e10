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

Provenance per frame: `source` "kitchen.r3d:rgbd/12.jpg" (the file relative
to the manual folder, then the member); `timestamp` frameTimestamps[i]
(seconds), -1 without them; `pose` the 4x4 camera-to-world of poses[i]
(qx,qy,qz,qw,tx,ty,tz, OpenGL camera axes; see poses.py), the identity
without poses; `camera` "lidar" (cameraType 1), "truedepth" (0) or
"unknown". `poses` and `frameTimestamps`, when present and not empty, must
have one row per frame (i = 0 .. N-1): anything else is refused, since
frame i's pose could not be told apart from a neighbour's. RGB is stored as
the member's own JPEG bytes.

Frames are read by seeking to their members (offsets from the ZIP directory,
found while checking), so reading a frame needs no pass over the directory:
what a Beam worker does, one frame per element, even on gs://.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import zipfile
import zlib
from typing import Iterator

import lzfse
import numpy as np
from absl import logging
from etils import epath

from tfds_record3d import decoding
from tfds_record3d import depth_checks
from tfds_record3d import frame_example as frame_example_lib
from tfds_record3d.frame_example import frame_example
from tfds_record3d import intrinsics as intrinsics_lib
from tfds_record3d import poses as poses_lib
from tfds_record3d import validation
from tfds_record3d.validation import Problem

METADATA_NAME = "metadata"
REQUIRED_KEYS = ("w", "h", "dw", "dh", "K")
_FRAME_RE = re.compile(r"^rgbd/(\d+)\.(jpg|depth|conf)$")
CAMERA_TYPES = {1: "lidar", 0: "truedepth"}  # Record3D cameraType; else "unknown"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclasses.dataclass(frozen=True)
class Member:
  """Where one ZIP member's bytes are (from the ZIP directory)."""
  name: str
  offset: int  # of its local header
  compressed_size: int
  method: int  # zipfile.ZIP_STORED or ZIP_DEFLATED
  crc: int

  @classmethod
  def of(cls, info: zipfile.ZipInfo) -> "Member":
    return cls(info.filename, info.header_offset, info.compress_size, info.compress_type,
               info.CRC)

  def read(self, f) -> bytes:
    """The member's bytes from the open .r3d `f` (seekable), CRC-checked."""
    f.seek(self.offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
      raise decoding.DecodeError(f"{self.name}: no ZIP entry at offset {self.offset} "
                                 "(the file changed since it was checked?)")
    name_length, extra_length = _LOCAL_HEADER.unpack(header)[1:]
    f.seek(self.offset + _LOCAL_HEADER.size + name_length + extra_length)
    data = f.read(self.compressed_size)
    if self.method == zipfile.ZIP_DEFLATED:
      data = zlib.decompress(data, -15)  # raw deflate, as in ZIP files
    elif self.method != zipfile.ZIP_STORED:
      raise decoding.DecodeError(f"{self.name}: unsupported ZIP compression {self.method}")
    if zlib.crc32(data) != self.crc:
      raise decoding.DecodeError(f"{self.name}: CRC mismatch (the file changed since it "
                                 "was checked?)")
    return data


@dataclasses.dataclass(frozen=True)
class R3dFrameTask:
  """Everything needed to read one frame of an .r3d, and nothing more (a Beam
  build ships one per element)."""
  path: epath.Path
  sequence: str
  source: str
  frame: int
  members: tuple[Member, ...]  # jpg, depth[, conf]
  depth_size: tuple[int, int]
  intrinsics: np.ndarray  # K for `stated_size`
  stated_size: tuple[int, int]  # (h, w) from the metadata
  timestamp: float
  pose: np.ndarray | None
  camera: str

  def read(self, f=None) -> dict:
    """The frame's example; `f` an open handle on `path` (else opened here)."""
    if f is None:
      with self.path.open("rb") as f:
        return self.read(f)
    jpg, depth, *conf = (member.read(f) for member in self.members)
    image = decoding.stored_rgb(jpg)
    image_size = decoding.header_size(image)
    k = self.intrinsics
    if image_size != self.stated_size:
      k = intrinsics_lib.scale_intrinsics(k, self.stated_size, image_size)
    confidence = _decode_confidence(conf[0], self.depth_size) if conf else None
    return frame_example(image, decode_depth(depth, self.depth_size), confidence, k,
                         self.sequence, self.frame, source=self.source,
                         timestamp=self.timestamp, pose=self.pose, camera=self.camera)


@dataclasses.dataclass(frozen=True)
class R3dSequence:
  """One validated .r3d file."""
  path: epath.Path
  metadata: dict
  frames: tuple[int, ...]  # Frame indices i with both rgbd/{i}.jpg and .depth.
  has_confidence: tuple[bool, ...]  # Per frame.
  valid_pixels: tuple[int, ...]  # Valid depth pixels per frame (split checks).
  members: tuple[tuple[Member, ...], ...] = ()  # Per frame: jpg, depth[, conf].
  source_prefix: str = ""  # The file relative to the manual folder.

  @property
  def name(self) -> str:
    return self.path.stem

  @property
  def depth_size(self) -> tuple[int, int]:
    return int(self.metadata["dh"]), int(self.metadata["dw"])

  def intrinsics(self, frame: int, image_size: tuple[int, int]) -> np.ndarray:
    """K (3, 3) float32 for frame `frame` at the decoded image size (H, W)."""
    return frame_intrinsics(self.metadata, frame, image_size)

  @property
  def camera(self) -> str:
    return CAMERA_TYPES.get(self.metadata.get("cameraType"), "unknown")

  def frame_task(self, position: int) -> R3dFrameTask:
    meta = self.metadata
    frame = self.frames[position]
    stated = (int(meta["h"]), int(meta["w"]))
    poses = meta.get("poses") or ()
    timestamps = meta.get("frameTimestamps") or ()
    return R3dFrameTask(
        self.path, self.name, f"{self.source_prefix or self.path.name}:rgbd/{frame}.jpg",
        frame, self.members[position], self.depth_size, self.intrinsics(frame, stated),
        stated, float(timestamps[frame]) if timestamps else frame_example_lib.NO_TIMESTAMP,
        poses_lib.pose_matrix(*poses[frame]) if poses else None, self.camera)

  def read_frames(self, positions) -> Iterator[dict]:
    """Yields examples (feature dict of numpy values) for frame positions."""
    with self.path.open("rb") as f:
      for position in positions:
        yield self.frame_task(position).read(f)


def frame_intrinsics(metadata: dict, frame: int, image_size: tuple[int, int]) -> np.ndarray:
  """K (3, 3) float32 of frame `frame` at image size (H, W), from an .r3d's metadata:
  its perFrameIntrinsicCoeffs row when it has one, else K; scaled from (h, w)."""
  coeffs = metadata.get("perFrameIntrinsicCoeffs")
  if coeffs and frame < len(coeffs):
    fx, fy, cx, cy = coeffs[frame][:4]
    k = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float32)
  else:
    # Stored column-major: reshape gives K^T.
    k = np.asarray(metadata["K"], dtype=np.float32).reshape(3, 3).T
  stated = (int(metadata["h"]), int(metadata["w"]))
  if tuple(image_size) != stated:
    k = intrinsics_lib.scale_intrinsics(k, stated, image_size)
  return k


def _decompress(data: bytes, what: str) -> bytes:
  try:
    return lzfse.decompress(data)
  except Exception as e:  # lzfse.error, or MemoryError on truncated streams
    raise decoding.DecodeError(f"{what} is not valid LZFSE data ({type(e).__name__})") from e


def decode_depth(data: bytes, size: tuple[int, int]) -> np.ndarray:
  """float32 (dh, dw) meters of an rgbd/{i}.depth member's bytes, invalid pixels 0
  (decoding.clean_depth); DecodeError when not LZFSE or not dh x dw float32."""
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


def _per_frame_problems(path, metadata: dict, frames: list[int]) -> list[Problem]:
  """`poses` and `frameTimestamps` must give one row per frame i = 0..N-1."""
  problems = []
  where = f"{path}:{METADATA_NAME}"
  contiguous = frames == list(range(len(frames)))
  for key in ("poses", "frameTimestamps"):
    rows = metadata.get(key) or ()  # absent or empty: identity pose / timestamp -1
    if rows and (len(rows) != len(frames) or not contiguous):
      numbered = (f"frames rgbd/0..{len(frames) - 1}" if contiguous else
                  f"frames numbered {frames[0]}..{frames[-1]} with gaps")
      problems.append(Problem(where, f"{key} has {len(rows)} rows for {len(frames)} "
                              f"{numbered}: which row belongs to which frame is unknown; "
                              "export the capture again"))
  if metadata.get("poses") and not problems:
    try:
      poses_lib.pose_matrices(metadata["poses"])
    except ValueError as e:
      problems.append(Problem(where, f"invalid poses ({e})"))
  if metadata.get("frameTimestamps") and not problems:
    try:
      if not np.all(np.isfinite(np.asarray(metadata["frameTimestamps"], np.float64))):
        raise ValueError("not finite")
    except (ValueError, TypeError) as e:
      problems.append(Problem(where, f"invalid frameTimestamps ({e})"))
  return problems


def _scan_file(path: epath.Path, problems: list[Problem], check: bool = True,
               source_prefix: str = "") -> R3dSequence | None:
  """Validates one .r3d completely (decodes every frame); appends problems.

  check=False only reads the metadata and the ZIP directory (a Beam worker
  finding the frames the launcher already checked); valid_pixels is empty.
  """
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

      frames, has_confidence, frame_depths, members = [], [], [], []
      for frame in sorted(parts):
        kinds = parts[frame]
        for needed, partner in (("jpg", "depth"), ("depth", "jpg")):
          if needed in kinds and partner not in kinds:
            problems.append(Problem(
                f"{path}:rgbd/{frame}.{needed}", f"missing partner rgbd/{frame}.{partner}"))
        if not {"jpg", "depth"} <= kinds:
          continue
        kept = [k for k in ("jpg", "depth", "conf") if k in kinds]
        members.append(tuple(Member.of(archive.getinfo(f"rgbd/{frame}.{k}")) for k in kept))
        if not check:
          frames.append(frame)
          has_confidence.append("conf" in kinds)
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
              decode_depth(archive.read(f"rgbd/{frame}.depth"), depth_size)))
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
  if len(problems) == start:  # after a missing partner, a count mismatch is only noise
    problems += _per_frame_problems(path, metadata, frames)
  if not check:
    if len(problems) > start:
      return None
    return R3dSequence(path, metadata, tuple(frames), tuple(has_confidence), (),
                       tuple(members), source_prefix)
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
                     tuple(f.valid_pixels for f in frame_depths), tuple(members), source_prefix)


def load_sequence(path, manual_dir) -> R3dSequence:
  """One .r3d the launcher's `scan` already checked, read again without
  decoding (a Beam worker's view). Raises ValueError naming the file."""
  path, problems = epath.Path(path), []
  sequence = _scan_file(path, problems, check=False,
                        source_prefix=path.relative_to(manual_dir).as_posix())
  if sequence is None:
    raise ValueError(f"{path} changed since it was checked: "
                     + "; ".join(str(p) for p in problems))
  return sequence


def scan(manual_dir: epath.Path) -> tuple[list[R3dSequence], list[Problem]]:
  """Finds and fully validates every `*.r3d` directly in `manual_dir`."""
  problems: list[Problem] = []
  paths = sorted(p for p in manual_dir.iterdir() if p.suffix.lower() == ".r3d")
  if not paths:
    problems.append(Problem(str(manual_dir), "no .r3d files found"))
  def check(path, found):
    logging.info("Checking %s", path)
    return _scan_file(path, found, source_prefix=path.relative_to(manual_dir).as_posix())

  checked = validation.check_each(paths, check, "captures", problems)
  return [sequence for sequence in checked if sequence is not None], problems
