"""Progress lines with rate and time left, for every long job of the project.

Training steps, evaluation batches, benchmark phases, video frames and file
transfers all log through `Progress`: `done/total (pct), rate, elapsed, time
left`, at most every `every_seconds` (and always at the end). Pure Python (no
TensorFlow), thread-safe, so `launch/` uses it too.

The rate is measured from the first `update` on (`start_at_first_update`) when
the first unit of work includes one-off costs such as tf.function tracing,
which would otherwise make the first estimates far too pessimistic.
"""

import math
import threading
import time
from typing import Callable, Optional

from absl import logging


def format_seconds(seconds: float) -> str:
  """1h02m03s, 4m05s; '?' when unknown (NaN, inf)."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_mib(nbytes: float) -> str:
  return f"{nbytes / 2**20:.1f} MiB"


class Progress:
  """Counts work done towards `total` and logs rate and time left.

  Args:
    label: what is being done ("rough", "eval test", "upload").
    total: units of work in all (steps, images, bytes...).
    unit: name of the unit in the rate ("steps", "images"); with
      `format_amount`, how amounts are printed (e.g. `format_mib` for bytes).
    start: units already done before this run (a resumed stage): they count
      towards the percentage, not towards the rate.
    every_seconds: at most one line per this many seconds (0: every update).
    start_at_first_update: measure the rate from the first update on.
    log: where lines go (default absl logging.info).
    clock: time source (tests).
  """

  def __init__(self, label: str, total: float, unit: str = "steps", start: float = 0,
               every_seconds: float = 5.0, start_at_first_update: bool = False,
               format_amount: Optional[Callable[[float], str]] = None,
               log: Optional[Callable[[str], None]] = None,
               clock: Callable[[], float] = time.monotonic):
    self.label, self.total, self.unit = label, total, unit
    self.done = start
    self._format = format_amount or (lambda n: f"{n:.4g}")
    self._every = every_seconds
    self._log = log or (lambda line: logging.info("%s", line))
    self._clock = clock
    self._lock = threading.Lock()
    self._origin = None if start_at_first_update else (clock(), start)
    self._started = clock()
    self._last_log = -math.inf
    self.rate = 0.0  # units per second

  def seconds_left(self) -> float:
    if not self.rate:
      return float("nan")
    return max(0.0, self.total - self.done) / self.rate

  def line(self, suffix: str = "") -> str:
    percent = 100.0 * self.done / self.total if self.total else 100.0
    unit = f" {self.unit}" if self.unit else ""
    rate = f"{self._format(self.rate) if self.rate else '?'}{unit}/s"
    text = (f"{self.label}: {self._format(self.done)}/{self._format(self.total)} "
            f"({percent:.0f}%), {rate}, {format_seconds(self._clock() - self._started)} "
            f"elapsed, {format_seconds(self.seconds_left())} left")
    return f"{text} | {suffix}" if suffix else text

  def update(self, done: Optional[float] = None, add: float = 0, suffix: str = "",
             force: bool = False) -> None:
    """Sets (`done`) or advances (`add`) the count; logs when it is time to."""
    with self._lock:
      self.done = done if done is not None else self.done + add
      now = self._clock()
      if self._origin is None:
        self._origin = (now, self.done)
      else:
        t0, d0 = self._origin
        if now > t0 and self.done > d0:
          self.rate = (self.done - d0) / (now - t0)
      finished = self.done >= self.total
      if force or finished or now - self._last_log >= self._every:
        self._last_log = now
        self._log(self.line(suffix))
