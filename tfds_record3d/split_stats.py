"""User-facing statistics of a split (`info.metadata["stats"][split]`).

Each frame is summarised as integers first (`frame_stats`: depth in whole
micrometers), then frames are combined by sums, minima and maxima only. The
in-process build adds them up in Python (`SplitStats`); a Beam build, whose
workers must not touch the builder, reports the same integers as Beam
metrics (counters and distributions, `record_metrics`) and the launcher
reads them back after the pipeline (`from_metrics`). Integers make the two
exactly equal (no float sums in a different order).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from tfds_record3d import decoding

METRICS_NAMESPACE = "record3d"
_UM_PER_M = 1_000_000


@dataclasses.dataclass(frozen=True)
class FrameStats:
  valid: int  # valid depth pixels
  pixels: int
  depth_min_um: int  # 0 when no valid pixel
  depth_max_um: int
  depth_sum_um: int
  image_size: tuple[int, int]
  depth_size: tuple[int, int]


def frame_stats(example: dict) -> FrameStats:
  depth = example["depth"]
  valid_um = np.round(depth[depth > 0].astype(np.float64) * _UM_PER_M).astype(np.int64)
  image = example["image"]
  # Encoded bytes (stored as the source gave them): the header has the size.
  image_size = (decoding.header_size(image) if isinstance(image, bytes)
                else tuple(int(v) for v in image.shape[:2]))
  return FrameStats(
      valid=int(valid_um.size), pixels=int(depth.size),
      depth_min_um=int(valid_um.min()) if valid_um.size else 0,
      depth_max_um=int(valid_um.max()) if valid_um.size else 0,
      depth_sum_um=int(valid_um.sum()),
      image_size=tuple(int(v) for v in image_size),
      depth_size=tuple(int(v) for v in depth.shape))


def summary(frames: int, sequences: int, valid: int, pixels: int, depth_min_um, depth_max_um,
            depth_sum_um: int, image_sizes, depth_sizes) -> dict:
  def meters(um):
    return round(um / _UM_PER_M, 4) if valid else None
  return {
      "frames": frames,
      "sequences": sequences,
      "depth_min_m": meters(depth_min_um),
      "depth_max_m": meters(depth_max_um),
      "depth_mean_m": round(depth_sum_um / _UM_PER_M / valid, 4) if valid else None,
      "valid_fraction": round(valid / max(pixels, 1), 4),
      "image_sizes": sorted(tuple(s) for s in image_sizes),
      "depth_sizes": sorted(tuple(s) for s in depth_sizes),
  }


class SplitStats:
  """Running statistics of one split, in process."""

  def __init__(self):
    self.frames = 0
    self.sequences: set[str] = set()
    self.valid = self.pixels = self.depth_sum_um = 0
    self.depth_min_um, self.depth_max_um = None, None
    self.image_sizes: set[tuple[int, int]] = set()
    self.depth_sizes: set[tuple[int, int]] = set()

  def add(self, example: dict) -> None:
    stats = frame_stats(example)
    self.frames += 1
    self.sequences.add(example["sequence"])
    if stats.valid:
      self.depth_min_um = (stats.depth_min_um if self.depth_min_um is None
                           else min(self.depth_min_um, stats.depth_min_um))
      self.depth_max_um = (stats.depth_max_um if self.depth_max_um is None
                           else max(self.depth_max_um, stats.depth_max_um))
    self.valid += stats.valid
    self.pixels += stats.pixels
    self.depth_sum_um += stats.depth_sum_um
    self.image_sizes.add(stats.image_size)
    self.depth_sizes.add(stats.depth_size)

  def summary(self) -> dict:
    return summary(self.frames, len(self.sequences), self.valid, self.pixels,
                   self.depth_min_um, self.depth_max_um, self.depth_sum_um,
                   self.image_sizes, self.depth_sizes)


# --- Beam: the same numbers as metrics --------------------------------------

def record_metrics(split: str, stats: FrameStats) -> None:
  """Reports one frame's statistics as Beam metrics (on a worker)."""
  metrics = tfds.core.lazy_imports.apache_beam.metrics.Metrics
  for name, value in (("frames", 1), ("valid", stats.valid), ("pixels", stats.pixels),
                      ("depth_sum_um", stats.depth_sum_um)):
    metrics.counter(METRICS_NAMESPACE, f"{split}/{name}").inc(value)
  if stats.valid:
    metrics.distribution(METRICS_NAMESPACE, f"{split}/depth_min_um").update(stats.depth_min_um)
    metrics.distribution(METRICS_NAMESPACE, f"{split}/depth_max_um").update(stats.depth_max_um)
  # A counter per size: a handful of sizes in practice (one per camera mode).
  h, w = stats.image_size
  metrics.counter(METRICS_NAMESPACE, f"{split}/image_size/{h}x{w}").inc()
  h, w = stats.depth_size
  metrics.counter(METRICS_NAMESPACE, f"{split}/depth_size/{h}x{w}").inc()


def metric_value(result):
  """A metric's value: committed where the runner has them (Dataflow); the
  DirectRunner only has attempted values, which are exact when no bundle was
  retried."""
  return result.committed if result.committed is not None else result.attempted


def query_metrics(pipeline_result, namespace: str) -> dict:
  """A finished pipeline's metrics of one namespace (`counters`, `distributions`)."""
  beam = tfds.core.lazy_imports.apache_beam
  return pipeline_result.metrics().query(
      beam.metrics.metric.MetricsFilter().with_namespace(namespace))


def counter_totals(query: dict) -> dict[str, int]:
  """{counter name: total over every step that reported it}."""
  counters: dict[str, int] = {}
  for result in query["counters"]:
    counters[result.key.metric.name] = (counters.get(result.key.metric.name, 0)
                                        + int(metric_value(result)))
  return counters


def from_metrics(pipeline_result, split: str, sequences: int) -> dict:
  """The summary of `split` from a finished pipeline's metrics (on the launcher).

  `sequences` comes from the split plan (a set of names is no metric).
  """
  query = query_metrics(pipeline_result, METRICS_NAMESPACE)
  counters = counter_totals(query)
  lows, highs = [], []
  for result in query["distributions"]:
    value = metric_value(result)
    if result.key.metric.name == f"{split}/depth_min_um" and value.count:
      lows.append(value.min)
    elif result.key.metric.name == f"{split}/depth_max_um" and value.count:
      highs.append(value.max)

  def sizes(kind):
    prefix = f"{split}/{kind}/"
    return {tuple(int(v) for v in name[len(prefix):].split("x"))
            for name, count in counters.items() if name.startswith(prefix) and count}

  return summary(counters.get(f"{split}/frames", 0), sequences,
                 counters.get(f"{split}/valid", 0), counters.get(f"{split}/pixels", 0),
                 min(lows) if lows else None, max(highs) if highs else None,
                 counters.get(f"{split}/depth_sum_um", 0), sizes("image_size"),
                 sizes("depth_size"))
