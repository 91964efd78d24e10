r"""Whole captures for `trainer.predict`: reading their frames, and per-capture figures.

A capture is one of:
  NAME.r3d       a Record3D export (ZIP: metadata + rgbd/{i}.jpg, rgbd/{i}.depth,
                 rgbd/{i}.conf; see tfds_record3d/r3d_format.py). Frames come with
                 their intrinsics, the LiDAR depth (ground truth) and the pose.
  NAME/          a folder of image files (.jpg .jpeg .png .bmp .tif .tiff .webp), in
                 natural order of their names (frame2 before frame10); a folder
                 holding no images but an `rgb/` subfolder reads that one.
  NAME.mp4       a video (.mp4 .mov .m4v .avi .mkv), read with imageio-ffmpeg (the
                 `video` extra).

`open_capture(path).frames()` yields `Frame`s in order. A damaged capture yields
every frame before the damage, then raises `CaptureError` naming the file and the
frame: a `.r3d` cut short (its ZIP directory, at the end, is lost) is read entry
by entry from the start; an `.mp4` cut short is noticed when fewer frames decode
than its header's duration says.

Per-capture figures live in `trainer.stability` (the flicker figure) and
`trainer.pointclouds` (the fused world-frame cloud).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import zipfile
import zlib
from typing import Iterator, Optional

from absl import logging
import numpy as np
from PIL import Image

from tfds_record3d import decoding
from tfds_record3d import poses as poses_lib
from tfds_record3d import r3d_format

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".avi", ".mkv")
R3D_SUFFIX = ".r3d"

# PIL modes of 16-bit (and 32-bit integer) greyscale images: PIL's own
# convert("RGB") clips them to 255, turning a typical photo white.
_WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


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


class CaptureError(ValueError):
  """A capture is damaged at frame `frame`; the `frames_read` frames before it were read."""

  def __init__(self, path: str, frame, frames_read: int, why: str):
    self.path, self.frame, self.frames_read = path, frame, frames_read
    super().__init__(f"{path}: frame {frame}: {why} ({frames_read} frame(s) before it were read)")


@dataclasses.dataclass
class Frame:
  """One frame of a capture."""
  position: int  # 0, 1, ... in reading order
  name: str  # output stem inside the capture's folder: "000012" or the image's stem
  rgb: np.ndarray  # uint8 [H, W, 3]
  intrinsics: Optional[np.ndarray] = None  # K [3, 3] for the RGB size, when the capture has it
  depth: Optional[np.ndarray] = None  # ground truth float32 [dh, dw] meters, 0 = invalid
  pose: Optional[np.ndarray] = None  # camera-to-world float32 [4, 4], OpenGL camera axes


def capture_kind(path: str) -> Optional[str]:
  """"r3d", "video" or "frames" for a capture path, None for a single image."""
  if os.path.isdir(path):
    return "frames"
  suffix = os.path.splitext(path)[1].lower()
  if suffix == R3D_SUFFIX:
    return "r3d"
  if suffix in VIDEO_SUFFIXES:
    return "video"
  return None


def capture_name(path: str) -> str:
  """The output stem of a capture: the file's stem, or the folder's name."""
  return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


class Capture:
  """Common part of the three kinds; `frames()` may be called more than once."""

  kind = ""

  def __init__(self, path: str):
    self.path = path
    self.name = capture_name(path)
    self.fps: Optional[float] = None  # frames per second, when the capture says
    self.expected_frames: Optional[int] = None  # when known before reading

  def frames(self) -> Iterator[Frame]:
    raise NotImplementedError


def open_capture(path: str) -> Capture:
  """A Capture for a .r3d, a video file or a folder of frames; ValueError otherwise."""
  kind = capture_kind(path)
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such file or folder")
  if kind == "r3d":
    return R3dCapture(path)
  if kind == "video":
    return VideoCapture(path)
  if kind == "frames":
    return FolderCapture(path)
  raise ValueError(f"{path}: not a capture (want a .r3d, a folder of frames or one of "
                   f"{', '.join(VIDEO_SUFFIXES)})")


# ----------------------------------------------------------------------------
# A folder of frames.
# ----------------------------------------------------------------------------
def _natural_key(name: str):
  return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class FolderCapture(Capture):
  """Image files of one folder (or of its rgb/ subfolder), in natural name order."""

  kind = "frames"

  def __init__(self, path: str):
    super().__init__(path)
    folder = path
    files = self._images(folder)
    if not files and os.path.isdir(os.path.join(path, "rgb")):
      folder = os.path.join(path, "rgb")  # the `pairs` layout: rgb/ beside depth/
      files = self._images(folder)
    if not files:
      raise ValueError(f"{path}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
    self.files = [os.path.join(folder, f) for f in files]
    self.expected_frames = len(self.files)

  @staticmethod
  def _images(folder):
    return sorted((f for f in os.listdir(folder)
                   if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
                   and os.path.isfile(os.path.join(folder, f))), key=_natural_key)

  def frames(self):
    size = None
    for position, file in enumerate(self.files):
      try:
        rgb = read_rgb(file)
      except ValueError as e:
        raise CaptureError(self.path, f"{position} ({os.path.basename(file)})", position,
                           str(e)) from e
      if size is not None and rgb.shape[:2] != size:
        raise CaptureError(self.path, f"{position} ({os.path.basename(file)})", position,
                           f"size {rgb.shape[0]}x{rgb.shape[1]} differs from the first frame's "
                           f"{size[0]}x{size[1]}: one capture has one frame size")
      size = rgb.shape[:2]
      yield Frame(position, os.path.splitext(os.path.basename(file))[0], rgb)


# ----------------------------------------------------------------------------
# A video file.
# ----------------------------------------------------------------------------
class VideoCapture(Capture):
  """Frames of a video file through imageio-ffmpeg."""

  kind = "video"

  def __init__(self, path: str):
    super().__init__(path)
    from trainer import video  # pylint: disable=import-outside-toplevel  # optional extra
    self._imageio = video.require_imageio(f"reading {path}")
    if os.path.getsize(path) == 0:
      raise ValueError(f"{path}: empty file (0 bytes)")

  def _open(self):
    try:
      reader = self._imageio.get_reader(self.path, format="ffmpeg")
      meta = reader.get_meta_data()
    except Exception as e:  # pylint: disable=broad-except  # OSError, RuntimeError...
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CaptureError(self.path, 0, 0, f"not a readable video ({first_line}; a file cut "
                         "short before its index (moov atom) was written cannot be read)") from e
    fps = meta.get("fps")
    self.fps = float(fps) if fps and math.isfinite(fps) else None
    duration = meta.get("duration")
    if self.fps and duration and math.isfinite(duration):
      self.expected_frames = int(round(duration * self.fps))
    return reader

  def frames(self):
    reader = self._open()
    position = 0
    try:
      iterator = iter(reader)
      while True:
        try:
          rgb = next(iterator)
        except StopIteration:
          break
        except Exception as e:  # pylint: disable=broad-except  # ffmpeg died mid-file
          raise CaptureError(self.path, position, position, f"undecodable ({e})") from e
        rgb = np.asarray(rgb)
        if rgb.ndim == 2:
          rgb = np.repeat(rgb[..., None], 3, axis=-1)
        yield Frame(position, f"{position:06d}", np.ascontiguousarray(rgb[..., :3], np.uint8))
        position += 1
    finally:
      reader.close()
    # ffmpeg stops quietly where a file is cut short: compare with the header.
    # One frame of slack: durations are rounded.
    if self.expected_frames is not None and position < self.expected_frames - 1:
      raise CaptureError(self.path, position, position,
                         f"the video ends early: its header says {self.expected_frames} frames "
                         f"({self.expected_frames / self.fps:.2f} s at {self.fps:g} fps); "
                         "truncated or damaged file?")
    if position == 0:
      raise CaptureError(self.path, 0, 0, "no frame decodes")


# ----------------------------------------------------------------------------
# A Record3D .r3d export, intact or cut short.
# ----------------------------------------------------------------------------
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # ZIP local file header, 30 bytes
_LOCAL_SIGNATURE = 0x04034B50


@dataclasses.dataclass(frozen=True)
class _Entry:
  offset: int  # of the (compressed) data
  size: int  # compressed bytes
  method: int  # 0 stored, 8 deflate
  crc: int


def _scan_local_headers(f, file_size: int) -> tuple[dict, str]:
  """{name: _Entry} of the complete entries from the start of a ZIP whose central
  directory is lost, and why the scan stopped (where the damage is)."""
  entries, position = {}, 0
  while True:
    f.seek(position)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size:
      return entries, f"the file ends at byte {file_size}, inside a ZIP entry header"
    (signature, _, flags, method, _, _, crc, size, _, name_length,
     extra_length) = _LOCAL_HEADER.unpack(header)
    if signature != _LOCAL_SIGNATURE:  # the central directory, or garbage
      return entries, f"no further ZIP entry at byte {position}"
    name = f.read(name_length).decode("utf-8", "replace")
    extra = f.read(extra_length)
    if size == 0xFFFFFFFF:  # ZIP64: the sizes are in extra field 0x0001
      size = _zip64_compressed_size(extra, size)
    if flags & 0x8 and size == 0:
      return entries, (f"entry {name!r} has its size after the data (streamed ZIP): it cannot "
                       "be recovered without the ZIP directory")
    data_offset = position + _LOCAL_HEADER.size + name_length + extra_length
    if data_offset + size > file_size:
      return entries, f"the file ends at byte {file_size}, inside entry {name!r}"
    entries[name] = _Entry(data_offset, size, method, crc)
    position = data_offset + size + (16 if flags & 0x8 else 0)  # data descriptor with signature


def _zip64_compressed_size(extra: bytes, size: int) -> int:
  at = 0
  while at + 4 <= len(extra):
    kind, length = struct.unpack_from("<HH", extra, at)
    if kind == 0x0001 and length >= 16:
      return struct.unpack_from("<QQ", extra, at + 4)[1]  # uncompressed, compressed
    at += 4 + length
  return size


class _ZipEntries:
  """`names` and `read(name)` of an .r3d: through its ZIP directory when intact,
  else through the local headers from the start (`damage` says where it ends)."""

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "rb")  # pylint: disable=consider-using-with  # closed in close()
    self.damage = None
    try:
      self._zip = zipfile.ZipFile(self._file)
      self.names = set(self._zip.namelist())
    except zipfile.BadZipFile:
      # A copy cut short loses the ZIP directory, which sits at the end.
      self._zip = None
      self._entries, why = _scan_local_headers(self._file, os.path.getsize(path))
      self.names = set(self._entries)
      self.damage = f"truncated: no ZIP directory at the end of the file, and {why}"

  def read(self, name: str) -> bytes:
    """The entry's bytes; ValueError when it does not decompress or fails its CRC."""
    try:
      if self._zip is not None:
        return self._zip.read(name)
      entry = self._entries[name]
      self._file.seek(entry.offset)
      data = self._file.read(entry.size)
      if entry.method == 8:
        data = zlib.decompressobj(-15).decompress(data)
      elif entry.method != 0:
        raise ValueError(f"ZIP compression method {entry.method} is not supported")
      if zlib.crc32(data) != entry.crc:
        raise ValueError("CRC check failed")
      return data
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
      raise ValueError(f"{name} is damaged ({e})") from e

  def close(self):
    if self._zip is not None:
      self._zip.close()
    self._file.close()


_JPG_RE = re.compile(r"^rgbd/(\d+)\.jpg$")


class R3dCapture(Capture):
  """A Record3D .r3d: RGB, LiDAR depth, intrinsics and pose per frame."""

  kind = "r3d"

  def __init__(self, path: str):
    super().__init__(path)
    if os.path.getsize(path) == 0:
      raise ValueError(f"{path}: empty file (0 bytes): export it again from Record3D")
    entries = _ZipEntries(path)
    try:
      if r3d_format.METADATA_NAME not in entries.names:
        why = (f" ({entries.damage})" if entries.damage else "")
        raise ValueError(f"{path}: no readable 'metadata' entry: not a Record3D .r3d export, or "
                         f"damaged before it{why}")
      try:
        self.metadata = json.loads(entries.read(r3d_format.METADATA_NAME))
        missing = [k for k in r3d_format.REQUIRED_KEYS if k not in self.metadata]
        if missing:
          raise ValueError(f"missing keys {missing}")
        self.depth_size = (int(self.metadata["dh"]), int(self.metadata["dw"]))
      except (ValueError, TypeError) as e:
        raise ValueError(f"{path}:{r3d_format.METADATA_NAME}: invalid metadata JSON ({e})") from e
      self.damage = entries.damage
      self.indices = sorted(int(m.group(1)) for m in map(_JPG_RE.match, entries.names) if m)
      self._has_depth = any(n.endswith(".depth") for n in entries.names)
    finally:
      entries.close()
    fps = self.metadata.get("fps")
    self.fps = float(fps) if isinstance(fps, (int, float)) and fps > 0 else None
    self.poses = self._poses()
    counts = [len(self.metadata[k]) for k in ("poses", "frameTimestamps")
              if isinstance(self.metadata.get(k), list) and self.metadata[k]]
    # A cut file's frame count comes from the metadata; an intact one's from the ZIP.
    self.expected_frames = max(counts) if self.damage and counts else len(self.indices)

  def _poses(self) -> Optional[np.ndarray]:
    rows = self.metadata.get("poses")
    if not rows:
      logging.warning("%s: no poses in the metadata: no fused point cloud", self.path)
      return None
    try:
      return poses_lib.pose_matrices(rows)
    except ValueError as e:
      logging.warning("%s: metadata poses unusable (%s): no fused point cloud", self.path, e)
      return None

  def frames(self):
    entries = _ZipEntries(self.path)
    try:
      for position, index in enumerate(self.indices):
        if entries.damage and position != index:
          break  # a gap in a cut file: the damage, reported below
        jpg, depth_name = f"rgbd/{index}.jpg", f"rgbd/{index}.depth"
        if entries.damage and self._has_depth and depth_name not in entries.names:
          break  # the cut fell between this frame's RGB and its depth
        try:
          rgb = decoding.decode_rgb(entries.read(jpg))
        except ValueError as e:  # DecodeError is a ValueError
          raise CaptureError(self.path, index, position, f"{jpg}: {e}") from e
        depth = None
        if depth_name in entries.names:
          try:
            depth = r3d_format.decode_depth(entries.read(depth_name), self.depth_size)
          except ValueError as e:
            raise CaptureError(self.path, index, position, f"{depth_name}: {e}") from e
        pose = None
        if self.poses is not None and index < len(self.poses):
          pose = self.poses[index]
        yield Frame(position, f"{index:06d}", rgb,
                    intrinsics=r3d_format.frame_intrinsics(self.metadata, index, rgb.shape[:2]),
                    depth=depth, pose=pose)
      else:
        position = len(self.indices)
      if entries.damage:
        total = f"; the metadata lists {self.expected_frames} frames" if self.expected_frames \
            else ""
        raise CaptureError(self.path, position, position, f"{entries.damage}{total}")
    finally:
      entries.close()
