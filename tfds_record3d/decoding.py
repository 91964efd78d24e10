"""Decoding RGB images and normalising depth, shared by the file formats."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

# Raw uint16 depth value that sensors and exporters use for "saturated".
UINT16_SATURATED = 65535
# Valid Record3D confidence levels: 0 low, 1 medium, 2 high.
CONFIDENCE_LEVELS = (0, 1, 2)


class DecodeError(ValueError):
  """A file could not be decoded; the message says why (no path: callers add it)."""


def open_image(data: bytes, what: str = "image") -> Image.Image:
  """Fully decoded PIL image. Raises DecodeError naming the cause.

  PIL's own message for an empty or unknown file names a BytesIO object
  ("cannot identify image file <_io.BytesIO object at 0x...>"), which tells
  the user nothing: say "empty" or "not a JPEG or PNG" instead.
  """
  if not data:
    raise DecodeError(f"empty {what} file (0 bytes)")
  try:
    image = Image.open(io.BytesIO(data))
    image.load()  # Forces a full decode: truncated files fail here.
    return image
  except UnidentifiedImageError as e:
    raise DecodeError(f"not a JPEG or PNG {what} ({len(data)} bytes of another format)") from e
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError...
    raise DecodeError(f"unreadable or truncated {what} ({e})") from e


def decode_rgb(data: bytes) -> np.ndarray:
  """JPEG/PNG bytes -> uint8 (H, W, 3). Raises DecodeError if unreadable or truncated."""
  with open_image(data) as image:
    if image.mode not in ("RGB", "RGBA", "L", "P"):
      raise DecodeError(f"unsupported image mode {image.mode!r}, expected RGB")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def image_size(data: bytes) -> tuple[int, int]:
  """(H, W) of an encoded image, decoding it fully (so truncation is caught)."""
  return decode_rgb(data).shape[:2]


def header_size(data: bytes) -> tuple[int, int]:
  """(H, W) from the image's header only (no decode: for files already checked)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError...
    raise DecodeError(f"not a JPEG or PNG image ({len(data)} bytes; {e})") from e
  return height, width


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stored_rgb(data: bytes) -> bytes:
  """The bytes the dataset stores for an RGB file that passed `decode_rgb`.

  JPEG and 8-bit PNG: the file's own bytes, unchanged (no decode and
  re-encode: faster, smaller, and no second JPEG generation loss). TFDS'
  Image feature decodes either with `tf.image.decode_image(channels=3)`,
  which turns grey, palette and RGBA images into RGB as PIL's
  `convert("RGB")` does. A 16-bit PNG is the exception: TF and PIL reduce it
  to 8 bits differently, so it is decoded here and stored as an 8-bit PNG.
  """
  if data.startswith(_JPEG_MAGIC):
    return data
  # PNG: IHDR is the first chunk; its bit depth is byte 24 of the file.
  if data.startswith(_PNG_MAGIC) and len(data) > 24 and data[24] <= 8:
    return data
  buffer = io.BytesIO()
  Image.fromarray(decode_rgb(data)).save(buffer, format="PNG")
  return buffer.getvalue()


def clean_depth(depth_m: np.ndarray) -> np.ndarray:
  """float depth in meters -> float32 with every invalid value (NaN, inf, <= 0) as 0."""
  depth = np.asarray(depth_m, dtype=np.float32)
  return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


def depth_from_uint16(raw: np.ndarray, units_per_meter: float) -> np.ndarray:
  """uint16 depth (e.g. millimeters) -> float32 meters; 0 and 65535 become 0."""
  raw = np.asarray(raw)
  valid = (raw > 0) & (raw < UINT16_SATURATED)
  return np.where(valid, raw.astype(np.float32) / np.float32(units_per_meter), 0.0).astype(np.float32)


def check_confidence(confidence: np.ndarray) -> np.ndarray:
  """Returns `confidence` if every value is 0, 1 or 2; else raises DecodeError.

  Anything else is a mask in another convention (e.g. 0/255), which would
  otherwise pass silently as "high" everywhere downstream.
  """
  bad = np.setdiff1d(np.unique(confidence), CONFIDENCE_LEVELS)
  if bad.size:
    shown = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if bad.size > 5 else "")
    raise DecodeError(f"confidence values must be 0, 1 or 2 (low, medium, high), found {shown}")
  return confidence
