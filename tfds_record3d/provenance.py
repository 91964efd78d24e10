"""Where a build came from: stored in `info.metadata["provenance"]`.

A prepared build is reused as is, whatever `--manual_dir` now holds, so a
user who added or re-exported captures would train on stale data without a
word. The build records when it was made, from which manual folder, and a
fingerprint of that folder; a later run compares the fingerprint with the
folder it is given (trainer/datasets.py).

The fingerprint covers every file under the folder except hidden ones
(.DS_Store, editor files): relative name, size and mtime (nanoseconds on a
local disk, seconds on gs://). It is a cheap stat walk, not a content hash:
a copy that resets mtimes reads as a change (rebuild once); an edit keeping
the size within the mtime's resolution does not.
"""

from __future__ import annotations

import datetime
import hashlib
import os

from etils import epath

KEY = "provenance"


def fingerprint(manual_dir) -> dict:
  """{"digest": sha256 hex, "files": count, "bytes": total size} of `manual_dir`."""
  root = epath.Path(manual_dir)
  entries = []
  for folder, dirs, files in root.walk():
    dirs[:] = [d for d in dirs if not d.startswith(".")]  # prunes the walk
    for name in files:
      if name.startswith("."):
        continue
      path = epath.Path(folder) / name
      entries.append((path.relative_to(root).as_posix(), *_size_and_mtime(path)))
  digest = hashlib.sha256()
  for name, size, mtime in sorted(entries):
    digest.update(f"{name}\0{size}\0{mtime}\n".encode("utf-8"))
  return {"digest": digest.hexdigest(), "files": len(entries),
          "bytes": sum(size for _, size, _ in entries)}


def _size_and_mtime(path: epath.Path) -> tuple[int, int]:
  if _is_remote(path):
    stat = path.stat()
    return int(stat.length), int(stat.mtime)
  # epath's stat rounds mtime to seconds: too coarse for a file rewritten
  # right after the build (tests, scripts).
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns


def _is_remote(path) -> bool:
  return "://" in str(path)


def record(manual_dir) -> dict:
  """The provenance of a build made now from `manual_dir` (None: no input files)."""
  built_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  if manual_dir is None:
    return {"built_at": built_at, "manual_dir": None}
  folder = epath.Path(manual_dir).expanduser()
  if not _is_remote(folder):  # resolve() is for local paths only
    folder = folder.resolve()
  return {"built_at": built_at, "manual_dir": str(folder), "fingerprint": fingerprint(folder)}


def describe(provenance: dict | None) -> str:
  """'built 2026-12-01T10:00:00+00:00 from /m (12 files, 0.3 MB)' for logs and errors."""
  if not provenance:
    return "with no provenance recorded (built before depth2d recorded it, or not by record3d)"
  fp = provenance.get("fingerprint")
  if not fp:
    return f"built {provenance.get('built_at', '?')} (no input files)"
  return (f"built {provenance.get('built_at', '?')} from {provenance.get('manual_dir', '?')} "
          f"({fp.get('files', '?')} files, {fp.get('bytes', 0) / 1e6:.1f} MB)")
