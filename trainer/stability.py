"""The temporal-stability ("flicker") figure of a predicted depth video (pure numpy).

`StabilityMeter` defines it (its doc string is written into NAME_stability.json);
`stability_line` is the line `trainer.predict` prints for a capture.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from trainer import sampling

RGB_STATIC_LEVELS = 8  # a pixel is RGB-static when no channel changes by more (of 255)
GT_STATIC_RELATIVE = 0.01  # ground truth changes by at most 1% between the frames
MIN_STATIC_FRACTION = 0.005  # frame pairs with fewer static pixels are not counted
MIN_STATIC_PIXELS = 16
STABILITY_LONG_SIDE = 320  # frames are sampled on a grid of at most this long side


def relative_change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """|a - b| / ((a + b) / 2) per pixel; NaN where either is not valid (finite, > 0)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  valid = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
  mean = np.where(valid, (a + b) / 2.0, 1.0)
  return np.where(valid, np.abs(a - b) / mean, np.nan)


class StabilityMeter:
  r"""The temporal-stability ("flicker") figure of a predicted depth video.

  For each pair of consecutive frames (t-1, t), with predicted depths p and
  (when the capture has it) ground-truth depth g:

    r(x) = |p_t(x) - p_{t-1}(x)| / ((p_t(x) + p_{t-1}(x)) / 2)

  is the relative frame-to-frame depth change at pixel x (pixels where either
  prediction is not positive and finite are left out). Two pixel sets:
    * RGB-static: no 8-bit RGB channel changed by more than 8 levels
      (|I_t - I_{t-1}| <= 8 in R, G and B), on the prediction's grid (frames
      larger than 320 px on the long side are sampled on an every-s-th-pixel
      grid first);
    * ground-truth-static (.r3d only): both LiDAR depths valid and
      |g_t - g_{t-1}| / ((g_t + g_{t-1}) / 2) <= 1%, on the depth grid
      (the prediction is sampled at the depth pixels' centres).
  The pair's value is the median of r over the set's pixels; a pair with fewer
  than max(16, 0.5% of the grid) such pixels is not counted. The capture's
  figure, `median`, is the median of the pair values; also reported: their
  90th percentile `p90`, `pairs_used` of `pairs`, and `static_fraction` (the
  mean fraction of static pixels over the counted pairs). 0 = perfectly
  stable; 0.01 = depth moves by 1% per frame where the scene did not.

  Caveat: a moving camera changes the true depth of untextured surfaces that
  look the same (a wall while walking towards it), so the RGB-static figure has
  a floor set by the camera's motion; compare models on the same capture. The
  ground-truth-static figure has no such floor.
  """

  def __init__(self):
    self._previous = None  # (rgb on grid, prediction on grid, prediction at depth size, gt)
    self._values = {"rgb_static": [], "ground_truth_static": []}
    self._fractions = {"rgb_static": [], "ground_truth_static": []}
    self.pairs = 0
    self._has_gt = False

  def add(self, rgb: np.ndarray, prediction: np.ndarray, ground_truth: Optional[np.ndarray] = None):
    """rgb uint8 [H,W,3], prediction float32 [H,W] meters, ground_truth [h,w] or None."""
    rows, cols = sampling.grid_indices(prediction.shape, STABILITY_LONG_SIDE)
    grid = np.ix_(rows, cols)
    current = (rgb[grid].astype(np.int16), prediction[grid],
               None if ground_truth is None
               else sampling.resample_nearest(prediction, ground_truth.shape),
               ground_truth)
    if self._previous is not None:
      self.pairs += 1
      old_rgb, old_p, old_p_gt, old_gt = self._previous
      if old_rgb.shape == current[0].shape:
        static = np.all(np.abs(current[0] - old_rgb) <= RGB_STATIC_LEVELS, axis=-1)
        self._count("rgb_static", relative_change(current[1], old_p), static)
      if ground_truth is not None and old_gt is not None and old_gt.shape == ground_truth.shape:
        self._has_gt = True
        static = relative_change(ground_truth, old_gt) <= GT_STATIC_RELATIVE  # NaN -> False
        self._count("ground_truth_static", relative_change(current[2], old_p_gt), static)
    self._previous = current

  def _count(self, key, change, static):
    static = static & np.isfinite(change)
    if static.sum() < max(MIN_STATIC_PIXELS, MIN_STATIC_FRACTION * static.size):
      return
    self._values[key].append(float(np.median(change[static])))
    self._fractions[key].append(float(static.mean()))

  def summary(self) -> dict:
    """{"rgb_static": {...}, "ground_truth_static": {...} or None} (see the class doc);
    `median` and `p90` are None when no pair counted."""
    out = {}
    for key, values in self._values.items():
      if key == "ground_truth_static" and not self._has_gt:
        out[key] = None
        continue
      out[key] = {
          "median": float(np.median(values)) if values else None,
          "p90": float(np.percentile(values, 90)) if values else None,
          "pairs_used": len(values), "pairs": self.pairs,
          "static_fraction": float(np.mean(self._fractions[key])) if values else None,
      }
    out["rgb_static_levels"] = RGB_STATIC_LEVELS
    out["ground_truth_static_relative"] = GT_STATIC_RELATIVE
    return out


def stability_line(name: str, stability: dict) -> str:
  """One printed line of a capture's stability figures."""
  def part(key, what):
    value = (stability or {}).get(key)
    if not value:
      return None
    if value["median"] is None:
      return f"{what}: no frame pair with enough static pixels"
    return (f"{value['median']:.4f} over {what} pixels ({value['pairs_used']} of "
            f"{value['pairs']} frame pairs)")
  parts = [p for p in (part("rgb_static", "RGB-static"),
                       part("ground_truth_static", "ground-truth-static")) if p]
  return f"{name}: flicker (median frame-to-frame relative depth change) " + "; ".join(parts)
