"""Progress lines with rate and ETA for file transfers (thread-safe)."""

import threading
import time
from typing import Callable, Optional

from absl import logging


def _mib(nbytes: float) -> str:
  return f"{nbytes / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


class TransferProgress:
  """Counts finished files and bytes; logs at most every `interval_s` seconds.

  The ETA is bytes left over the average rate so far: transfers here are
  bandwidth bound, and per-file counts would mislead when sizes vary (a
  TFDS directory mixes multi-MB shards with tiny JSON files).
  """

  def __init__(self, label: str, total_files: int, total_bytes: int,
               interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
               log: Optional[Callable[[str], None]] = None):
    self.label = label
    self.total_files = total_files
    self.total_bytes = total_bytes
    self.files = 0
    self.bytes = 0
    self._interval_s = interval_s
    self._clock = clock
    self._start = clock()
    self._last_log = self._start
    self._lock = threading.Lock()
    self._log = log or (lambda line: logging.info("%s", line))

  def line(self) -> str:
    elapsed = max(self._clock() - self._start, 1e-9)
    rate = self.bytes / elapsed
    percent = 100.0 * self.bytes / self.total_bytes if self.total_bytes else 100.0
    left = self.total_bytes - self.bytes
    eta = _duration(left / rate) if rate > 0 else "?"
    return (f"{self.label}: {self.files}/{self.total_files} files, "
            f"{_mib(self.bytes)}/{_mib(self.total_bytes)} ({percent:.0f}%), "
            f"{_mib(rate)}/s, ETA {eta}")

  def add(self, nbytes: int, files: int = 1) -> None:
    with self._lock:
      self.files += files
      self.bytes += nbytes
      now = self._clock()
      if now - self._last_log >= self._interval_s or self.files == self.total_files:
        self._last_log = now
        self._log(self.line())
