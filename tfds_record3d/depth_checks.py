"""Plausibility of a sequence's depth, checked while scanning (before writing).

A file can decode fine and still be useless or wrongly scaled: every pixel
invalid, or uint16 depth read at the wrong units per meter (a TUM folder,
5000 per meter, read at the default 1000 gives a median of ~7 m). These
checks see one summary per frame, so a scan never keeps the depth maps.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from tfds_record3d.validation import Problem

# Median depth (m) outside this range is almost surely a wrong scale for the
# indoor scenes an iPhone LiDAR sees (its range ends near 5 m).
PLAUSIBLE_MEDIAN_M = (0.2, 6.0)


@dataclasses.dataclass(frozen=True)
class FrameDepth:
  valid_pixels: int
  median_m: float | None  # None when no pixel is valid


def summarize(depth_m: np.ndarray) -> FrameDepth:
  """One frame's valid pixel count and median (depth in meters, 0 = invalid)."""
  valid = depth_m[depth_m > 0]
  return FrameDepth(int(valid.size), float(np.median(valid)) if valid.size else None)


def sequence_median(frames: Sequence[FrameDepth]) -> float | None:
  """Median over the frames' medians: robust, and needs no pixel kept."""
  medians = [f.median_m for f in frames if f.median_m is not None]
  return float(np.median(medians)) if medians else None


def no_valid_depth(where: str, frames: Sequence[FrameDepth]) -> Problem | None:
  """A Problem when not one pixel of the sequence is valid depth."""
  if frames and not any(f.valid_pixels for f in frames):
    return Problem(where, f"no valid depth in any of its {len(frames)} frame(s) "
                   "(every pixel is 0, NaN, inf or 65535): nothing to learn from")
  return None


def scale_warning(name: str, frames: Sequence[FrameDepth], fix: str) -> str | None:
  """A warning when the sequence's median depth is implausible; `fix` says what to set."""
  median = sequence_median(frames)
  low, high = PLAUSIBLE_MEDIAN_M
  if median is None or low <= median <= high:
    return None
  return (f"sequence {name}: median depth {median:.2f} m is outside the usual "
          f"{low}..{high} m of indoor captures, the depth scale is probably wrong; {fix}")


def split_problems(plan: Mapping[str, list], valid_pixels: Mapping[str, Sequence[int]]
                   ) -> list[Problem]:
  """Problems of a split plan: an empty split, or one without valid depth.

  Args:
    plan: splits.SplitPlan, split -> [(sequence name, frame positions)].
    valid_pixels: sequence name -> valid pixel count per frame position.
  """
  problems = []
  frames = sum(len(v) for v in valid_pixels.values())
  empty = [split for split, parts in plan.items() if not parts]
  if empty:
    problems.append(Problem(
        "(all input)", f"{frames} frames in {len(valid_pixels)} sequence(s) leave "
        f"split(s) {empty} empty; need 3+ frames"))
  for split, parts in plan.items():
    if parts and not any(valid_pixels[name][p] for name, positions in parts for p in positions):
      names = ", ".join(name for name, _ in parts)
      problems.append(Problem(
          f"(split {split})", f"no valid depth in any of its frames (from {names}): "
          "it could neither train nor evaluate anything"))
  return problems
