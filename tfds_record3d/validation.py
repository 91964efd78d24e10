"""Collecting every problem of a manual input before anything is written.

Format scanners (pairs_format, r3d_format) append a `Problem` per offending
file instead of raising at the first one; the builder raises a single
`ManualInputError` listing them all, before TFDS touches `data_dir`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from etils import epath


@dataclasses.dataclass(frozen=True)
class Problem:
  path: str  # The offending file or folder (for .r3d: "capture.r3d:rgbd/3.depth").
  reason: str

  def __str__(self) -> str:
    return f"{self.path}: {self.reason}"


class ManualInputError(ValueError):
  """The manual input cannot be built; `problems` lists every reason."""

  def __init__(self, manual_dir, problems: Iterable[Problem], instructions: str = ""):
    self.problems = list(problems)
    lines = [
        f"Cannot build record3d from {manual_dir}: {len(self.problems)} problem(s), "
        "nothing was written:"
    ]
    lines += [f"  - {problem}" for problem in self.problems]
    if instructions:
      lines += ["", "Expected layout:", instructions.strip()]
    super().__init__("\n".join(lines))


def check_manual_dir(manual_dir: epath.Path) -> list[Problem]:
  """Problems with the manual folder itself (absent, not a folder, empty)."""
  if not manual_dir.exists():
    return [Problem(str(manual_dir), "manual folder does not exist")]
  if not manual_dir.is_dir():
    return [Problem(str(manual_dir), "manual folder is not a directory")]
  if not any(not p.name.startswith(".") for p in manual_dir.iterdir()):
    return [Problem(str(manual_dir), "manual folder is empty")]
  return []
