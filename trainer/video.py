"""The side-by-side depth video of a capture: RGB | colourised depth | colour bar in meters.

Needs the optional `video` extra (imageio with imageio-ffmpeg, which ships its
own ffmpeg binary): `pip install -e ".[video]"`. One colour scale for the whole
video (`ColourScale`: robust percentiles over every frame), so colours mean the
same distance in every frame and flicker is visible as flicker.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from trainer import depth_ops

INSTALL_HINT = 'pip install -e ".[video]"  (imageio and imageio-ffmpeg)'
LOW_PERCENTILE, HIGH_PERCENTILE = 2.0, 98.0  # the video's colour scale
_SAMPLES_PER_FRAME = 4096
_BLOCK = 16  # frame sizes are padded to multiples of 16: what H.264 players expect


def require_imageio(purpose: str):
  """imageio.v2 with a working ffmpeg; ImportError naming the extra otherwise."""
  try:
    import imageio.v2 as imageio  # pylint: disable=import-outside-toplevel
    import imageio_ffmpeg  # pylint: disable=import-outside-toplevel
    imageio_ffmpeg.get_ffmpeg_exe()  # raises when the wheel has no binary for this platform
  except (ImportError, RuntimeError) as e:
    raise ImportError(f"{purpose} needs the optional video extra: {INSTALL_HINT} ({e})") from e
  return imageio


class ColourScale:
  """Collects a sample of valid depths from every frame; `range()` is the
  (LOW, HIGH) percentile pair over all of them, the video's one colour scale."""

  def __init__(self, seed: int = 0):
    self._samples = []
    self._rng = np.random.default_rng(seed)

  def add(self, depth: np.ndarray) -> None:
    valid = depth[np.isfinite(depth) & (depth > 0)]
    if valid.size > _SAMPLES_PER_FRAME:  # a fixed-size sample per frame: memory stays small
      valid = self._rng.choice(valid, _SAMPLES_PER_FRAME, replace=False)
    self._samples.append(valid.astype(np.float32))

  def range(self) -> tuple:
    values = np.concatenate(self._samples) if self._samples else np.zeros(0, np.float32)
    if not values.size:
      return 0.0, 1.0
    low, high = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high - low < 1e-3:  # a flat prediction: still a usable scale
      low, high = low - 0.05, high + 0.05
    return float(low), float(high)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)  # FreeType when Pillow has it (scalable)
  except (TypeError, OSError):
    return ImageFont.load_default()


def _ticks(vmin: float, vmax: float, count: int = 6) -> tuple:
  """(round tick values in [vmin, vmax], 1, 2 or 5 times a power of ten apart;
  the decimals that print them)."""
  raw = max((vmax - vmin) / max(count - 1, 1), 1e-6)
  power = 10.0 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = math.ceil(vmin / step) * step
  ticks = [first + i * step for i in range(int((vmax - first) / step + 1e-9) + 1)]
  return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


def colour_bar(height: int, vmin: float, vmax: float, width: int = 0) -> np.ndarray:
  """uint8 [height, width, 3]: the colour table (near at the top) with ticks in meters."""
  font_size = max(10, min(24, height // 18))
  width = width or 4 * font_size + 28
  bar = np.full((height, width, 3), 255, np.uint8)
  top, bottom = font_size, height - font_size  # room for the end labels
  values = np.linspace(vmin, vmax, bottom - top, dtype=np.float32)[:, None]
  strip = depth_ops.colourize(np.repeat(values, 12, axis=1), vmin, vmax)
  bar[top:bottom, 4:16] = strip
  image = Image.fromarray(bar)
  draw = ImageDraw.Draw(image)
  font = _font(font_size)
  ticks, digits = _ticks(vmin, vmax)
  for value in ticks:
    y = top + (value - vmin) / max(vmax - vmin, 1e-12) * (bottom - top - 1)
    draw.line([(16, y), (21, y)], fill=(0, 0, 0))
    draw.text((24, y), f"{value:.{digits}f}", fill=(0, 0, 0), font=font, anchor="lm")
  draw.text((width // 2, 1), "m", fill=(0, 0, 0), font=font, anchor="mt")
  return np.asarray(image)


def panel_height(image_height: int) -> int:
  """The video's row height: the frame's own, within [256, 720] (tiny frames are
  enlarged so labels stay readable, big ones shrunk so files stay small)."""
  return int(min(720, max(256, image_height)))


def compose(rgb: np.ndarray, depth: np.ndarray, vmin: float, vmax: float,
            label: str = "", height: Optional[int] = None) -> np.ndarray:
  """uint8 [H', W', 3]: RGB | colourised depth | colour bar, H' and W' multiples of 16."""
  height = height or panel_height(rgb.shape[0])
  width = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
  left = Image.fromarray(rgb).resize((width, height), Image.BILINEAR)
  # Nearest keeps the depth panel honest (no invented in-between depths at edges).
  right = Image.fromarray(depth_ops.colourize(depth, vmin, vmax)).resize(
      (width, height), Image.NEAREST)
  bar = colour_bar(height, vmin, vmax)
  row = np.concatenate([np.asarray(left), np.asarray(right), bar], axis=1)
  padded = np.full((_round_up(row.shape[0]), _round_up(row.shape[1]), 3), 255, np.uint8)
  padded[:row.shape[0], :row.shape[1]] = row
  if label:
    image = Image.fromarray(padded)
    draw = ImageDraw.Draw(image)
    font = _font(max(10, height // 24))
    for x, text in ((4, f"RGB  {label}"), (width + 4, "predicted depth")):
      draw.text((x, 4), text, fill=(255, 255, 255), font=font, stroke_width=2,
                stroke_fill=(0, 0, 0))
    padded = np.asarray(image)
  return padded


def _round_up(n: int) -> int:
  return -(-n // _BLOCK) * _BLOCK


class VideoWriter:
  """H.264 .mp4 writer (imageio-ffmpeg); every frame must have the first one's size."""

  def __init__(self, path: str, fps: float):
    imageio = require_imageio(f"writing {path}")
    self.path = path
    self.frames = 0
    # quality 8 of 10 (ffmpeg crf ~ 18): depth colours stay clean. yuv420p and
    # +faststart: plays in browsers and phones, and the index comes first.
    self._writer = imageio.get_writer(path, format="ffmpeg", fps=fps, codec="libx264",
                                      quality=8, pixelformat="yuv420p", macro_block_size=_BLOCK,
                                      ffmpeg_log_level="error",
                                      ffmpeg_params=["-movflags", "+faststart"])

  def append(self, frame: np.ndarray) -> None:
    self._writer.append_data(frame)
    self.frames += 1

  def close(self) -> None:
    self._writer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
