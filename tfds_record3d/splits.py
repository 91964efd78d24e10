"""Train / validation / test assignment by sequence.

Neighbouring frames of one capture are near duplicates, so splitting frames
at random leaks test images into training (one reason the seed overfit).
Whole sequences go to one split instead. The assignment depends only on the
sequence names and lengths (not on listing order), so it is deterministic.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

SPLIT_NAMES = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}

# A split assignment: split name -> list of (sequence name, frame positions),
# positions being indices into that sequence's ordered frames.
SplitPlan = dict[str, list[tuple[str, range]]]


def _stable_rank(name: str) -> bytes:
  """Pseudo-random but reproducible order key (Python's hash() is salted)."""
  return hashlib.sha256(name.encode("utf-8")).digest()


def split_sequences(frame_counts: Mapping[str, int]) -> SplitPlan:
  """Assigns sequences to splits, ~80/10/10 of the frames.

  Args:
    frame_counts: sequence name -> number of frames.

  Returns:
    A SplitPlan. With 3+ sequences every split gets at least one whole
    sequence: validation and test each take one first (in hash order), then
    each remaining sequence goes to the split furthest below its share of
    the frames. With fewer than 3 sequences, each sequence is cut into
    contiguous blocks (first 80% train, next 10% validation, last 10% test).
  """
  counts = {name: n for name, n in frame_counts.items() if n > 0}
  plan: SplitPlan = {split: [] for split in SPLIT_NAMES}
  if len(counts) < 3:
    for name in sorted(counts):
      for split, block in split_contiguous(counts[name]).items():
        if len(block):
          plan[split].append((name, block))
    return plan

  order = sorted(counts, key=_stable_rank)
  total = sum(counts.values())
  assigned = {split: 0 for split in SPLIT_NAMES}
  for name in order:
    empty = [s for s in ("validation", "test") if assigned[s] == 0]
    if empty:
      split = empty[0]
    else:
      split = max(SPLIT_NAMES, key=lambda s: SPLIT_FRACTIONS[s] * total - assigned[s])
    assigned[split] += counts[name]
    plan[split].append((name, range(counts[name])))
  for split in SPLIT_NAMES:
    plan[split].sort()
  return plan


def split_contiguous(num_frames: int) -> dict[str, range]:
  """Cuts one sequence into train / validation / test blocks, in order.

  Validation and test each get round(10%) of the frames but at least one
  frame when there are 3+ frames; train gets the rest (at least one).
  """
  if num_frames < 3:
    return {"train": range(num_frames), "validation": range(0), "test": range(0)}
  held_out = max(1, round(num_frames * SPLIT_FRACTIONS["validation"]))
  num_train = num_frames - 2 * held_out
  return {
      "train": range(0, num_train),
      "validation": range(num_train, num_train + held_out),
      "test": range(num_train + held_out, num_frames),
  }
