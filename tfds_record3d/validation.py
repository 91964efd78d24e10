"""Collecting every problem of a manual input before anything is written.

Format scanners (pairs_format, r3d_format) append a `Problem` per offending
file instead of raising at the first one; the builder raises a single
`ManualInputError` listing them all, before TFDS touches `data_dir`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Callable, Iterable, Sequence, TypeVar

import tqdm
from absl import app
from etils import epath

T = TypeVar("T")
R = TypeVar("R")

# Captures checked at once: the check is mostly reading (slow and parallel on
# gs://) and decoding in C (JPEG, PNG, LZFSE, zlib: the GIL is released).
CHECK_WORKERS = min(32, (os.cpu_count() or 1) + 4)


@dataclasses.dataclass(frozen=True)
class Problem:
  path: str  # The offending file or folder (for .r3d: "capture.r3d:rgbd/3.depth").
  reason: str

  def __str__(self) -> str:
    return f"{self.path}: {self.reason}"


class ManualInputError(ValueError, app.UsageError):
  """The manual input cannot be built; `problems` lists every reason.

  Also an absl `UsageError`: a program run by `absl.app.run` (the `tfds`
  command line, the trainer) then prints the message after a short usage
  line instead of a ~25-line traceback, and exits with status 1. The user's
  input is at fault, not the code, so the traceback would only hide the list.
  """

  def __init__(self, manual_dir, problems: Iterable[Problem], instructions: str = ""):
    self.problems = list(problems)
    self.exitcode = 1  # UsageError's; ValueError.__init__ does not set it.
    lines = [
        f"Cannot build record3d from {manual_dir}: {len(self.problems)} problem(s), "
        "nothing was written (a dataset already prepared in data_dir is kept):"
    ]
    lines += [f"  - {problem}" for problem in self.problems]
    if instructions:
      lines += ["", "Expected layout:", instructions.strip()]
    super().__init__("\n".join(lines))


def check_manual_dir(manual_dir: epath.Path) -> list[Problem]:
  """Problems with the manual folder itself (absent, unreadable, not a folder, empty)."""
  remote = "://" in str(manual_dir)
  try:
    if not manual_dir.exists():
      hint = (" (check the bucket and folder names; on gs:// an empty \"folder\" does "
              "not exist)" if remote else "")
      return [Problem(str(manual_dir), f"manual folder does not exist{hint}")]
    if not manual_dir.is_dir():
      return [Problem(str(manual_dir), "manual folder is not a directory")]
    if not any(not p.name.startswith(".") for p in manual_dir.iterdir()):
      return [Problem(str(manual_dir), "manual folder is empty")]
  except Exception as e:  # pylint: disable=broad-except
    # gs:// errors come from TF's filesystem (tf.errors.PermissionDeniedError,
    # NotFoundError, ...) or fsspec (OSError); local ones are OSError.
    hint = (": check that these credentials may list and read the bucket "
            "(gcloud auth application-default login, or the job's service account "
            "needs roles/storage.objectViewer)" if remote else "")
    return [Problem(str(manual_dir), f"cannot read the manual folder "
                    f"({type(e).__name__}: {str(e).strip()[:300]}){hint}")]
  return []


def check_each(items: Sequence[T], check: Callable[[T, list[Problem]], R], what: str,
               problems: list[Problem], workers: int = CHECK_WORKERS) -> list[R]:
  """`check(item, its_problems)` for every item (a capture, a sequence folder)
  on `workers` threads, with a progress bar; returns the results and appends
  the problems in the order of `items`, as a sequential loop would."""
  found = [[] for _ in items]
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    futures = [pool.submit(check, item, mine) for item, mine in zip(items, found)]
    for _ in tqdm.tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                       desc=f"checking {what}", unit=what, disable=len(futures) < 2):
      pass
    results = [future.result() for future in futures]  # re-raises a check's crash
  for mine in found:
    problems.extend(mine)
  return results
