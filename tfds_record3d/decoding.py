"""Decoding RGB images and normalising depth, shared by the file formats."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Raw uint16 depth value that sensors and exporters use for "saturated".
UINT16_SATURATED = 65535


class DecodeError(ValueError):
  """A file could not be decoded; the message says why (no path: callers add it)."""


def decode_rgb(data: bytes) -> np.ndarray:
  """JPEG/PNG bytes -> uint8 (H, W, 3). Raises DecodeError if unreadable or truncated."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # Forces a full decode: truncated files fail here.
      if image.mode not in ("RGB", "RGBA", "L", "P"):
        raise DecodeError(f"unsupported image mode {image.mode!r}, expected RGB")
      return np.asarray(image.convert("RGB"), dtype=np.uint8)
  except DecodeError:
    raise
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError...
    raise DecodeError(f"unreadable or truncated image ({e})") from e


def image_size(data: bytes) -> tuple[int, int]:
  """(H, W) of an encoded image, decoding it fully (so truncation is caught)."""
  return decode_rgb(data).shape[:2]


def clean_depth(depth_m: np.ndarray) -> np.ndarray:
  """float depth in meters -> float32 with every invalid value (NaN, inf, <= 0) as 0."""
  depth = np.asarray(depth_m, dtype=np.float32)
  return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


def depth_from_uint16(raw: np.ndarray, units_per_meter: float) -> np.ndarray:
  """uint16 depth (e.g. millimeters) -> float32 meters; 0 and 65535 become 0."""
  raw = np.asarray(raw)
  valid = (raw > 0) & (raw < UINT16_SATURATED)
  return np.where(valid, raw.astype(np.float32) / np.float32(units_per_meter), 0.0).astype(np.float32)
