"""Apache Beam generation of the `pairs` and `r3d` configs (TFDS' Beam rules).

Used when the build is given Beam options (`tfds build ...
--beam_pipeline_options=...`, or `DownloadConfig(beam_options=...)`); the
builder's `_split_generators` then returns `split_transform(...)` per split
instead of a Python generator, and TFDS runs them in one pipeline.

Per split, the pipeline is
  Create(one SequenceRef per capture part)       small: names and frame positions
  | FlatMap(list_frames)     one capture per element: list it again (no decode)
  | Reshuffle                spreads the frames over the workers
  | Map(ReadFrame(split))    one frame per element: read, yield (key, example)
so the job graph holds a few hundred bytes per capture, not the frame lists
(Dataflow refuses graphs over ~10 MB; a million frames would be far more).

The launcher has already checked every file (the builder's `_scan`, before
anything is written). A worker re-lists its capture and refuses, naming it,
when the frame count differs from what was checked (files changed during the
build). Nothing here holds or mutates the builder: workers get only these
small picklable objects. Split statistics come back as Beam metrics
(split_stats.record_metrics / from_metrics).

Beam is imported lazily (tfds.core.lazy_imports), so an in-process build
never imports it.
"""

from __future__ import annotations

import dataclasses
import math
import os

import tensorflow_datasets as tfds

from tfds_record3d import pairs_format
from tfds_record3d import r3d_format
from tfds_record3d import split_stats


@dataclasses.dataclass(frozen=True)
class SequenceRef:
  """One capture's share of a split: the first stage's element."""
  source: str  # "pairs" | "r3d"
  name: str
  location: str  # the sequence folder (pairs) or the .r3d file
  manual_dir: str
  positions: range  # frame positions in this split
  frame_count: int  # frames the launcher's check found in the whole capture


def sequence_refs(source: str, manual_dir, parts) -> list[SequenceRef]:
  """parts: [(PairsSequence | R3dSequence, positions)] of one split."""
  refs = []
  for sequence, positions in parts:
    location = sequence.folder if source == "pairs" else sequence.path
    refs.append(SequenceRef(source, sequence.name, str(location), str(manual_dir),
                            positions, len(sequence.frames)))
  return refs


def list_frames(ref: SequenceRef):
  """The frame tasks of one capture part (runs on a worker)."""
  if ref.source == "pairs":
    sequence = pairs_format.load_sequence(ref.name, ref.location, ref.manual_dir)
  else:
    sequence = r3d_format.load_sequence(ref.location, ref.manual_dir)
  if len(sequence.frames) != ref.frame_count:
    raise ValueError(
        f"{ref.location} changed since it was checked: it now holds "
        f"{len(sequence.frames)} frames, {ref.frame_count} were checked; build again")
  for position in ref.positions:
    yield sequence.frame_task(position)


def example_key(example: dict) -> str:
  """The key of an example in both builds: unique per (sequence, frame)."""
  return f"{example['sequence']}/{int(example['frame']):06d}"


class ReadFrame:
  """Reads one frame task into (key, example) and reports its statistics.

  A plain callable (not a beam.DoFn subclass) so that this module imports
  without Beam.
  """

  def __init__(self, split: str):
    self.split = split

  def __call__(self, task):
    example = task.read()
    split_stats.record_metrics(self.split, split_stats.frame_stats(example))
    return example_key(example), example


def split_transform(split: str, source: str, manual_dir, parts):
  """The PTransform (no input -> (key, example)) generating one split."""
  beam = tfds.core.lazy_imports.apache_beam
  return (
      beam.Create(sequence_refs(source, manual_dir, parts))
      | "ListFrames" >> beam.FlatMap(list_frames)
      | "Spread" >> beam.Reshuffle()
      | "ReadFrames" >> beam.Map(ReadFrame(split)))


# TFDS' BeamWriter counters (namespace "BeamWriter"), summed over the splits:
# what a lost-examples error reports, to tell where examples went missing.
WRITER_COUNTERS = {"serialized_examples": "serialized", "NumberOfShards": "shards_planned",
                   "written_shards": "shards_written"}
# (The unordered writer, NoShuffleBeamWriter, reports "serialized_examples" only.)


def writer_counters(pipeline_result) -> dict:
  """{serialized, shards_planned, shards_written} of a finished pipeline."""
  totals = split_stats.counter_totals(split_stats.query_metrics(pipeline_result, "BeamWriter"))
  return {ours: totals[theirs] for theirs, ours in WRITER_COUNTERS.items() if theirs in totals}


# The local runner every measurement here ran on. Beam's `DirectRunner` (2.77)
# first tries its Prism runner, a Go binary it downloads from GitHub at run
# time, and falls back to the FnApiRunner only when that fails (it did, offline,
# here). `FnApiRunner` names the Python runner directly: it honours
# direct_num_workers / direct_running_mode and never downloads anything.
LOCAL_RUNNER = "FnApiRunner"
_DIRECT_RUNNER_NAMES = (None, "DirectRunner", "direct", "SwitchingDirectRunner")


def local_runner_flags(workers: int) -> list:
  """The local runner's flags: in memory in this process (0), or `workers`
  worker processes (the documented local command)."""
  if workers == 0:
    return [f"--runner={LOCAL_RUNNER}"]
  return [f"--runner={LOCAL_RUNNER}", f"--direct_num_workers={workers}",
          "--direct_running_mode=multi_processing"]


def _options(download_config) -> dict:
  options = getattr(download_config, "beam_options", None)
  return {} if options is None else options.get_all_options()


def local_multi_processing(download_config) -> bool:
  """Beam options asking for the local runner's multi_processing mode: the
  mode that lost examples of large builds here (check_written_counts)."""
  values = _options(download_config)
  return (values.get("direct_running_mode") == "multi_processing"
          and values.get("runner") in _DIRECT_RUNNER_NAMES + (LOCAL_RUNNER,))


def local_workers(download_config):
  """Worker processes of a local multi_processing build; None for any other."""
  if not local_multi_processing(download_config):
    return None
  workers = _options(download_config).get("direct_num_workers")
  return (os.cpu_count() or 1) if workers == 0 else int(workers or 1)


# Beam's local runner hands each worker its share of a grouped PCollection
# (the writer's shuffle: every example's bytes) as ONE gRPC message, and gRPC
# refuses messages over 2 GiB. Measured: a 10,240-frame `r3d` build (2.7 GB of
# captures, a ~2.2 GB train split) with 1 worker process failed after its
# reading with "Buffer size 2249688554 exceeds GRPC limit 2147483548".
GRPC_MESSAGE_LIMIT = 2**31 - 100
SIZE_WARNING_FRACTION = 0.8  # the estimate below is from file sizes, not exact


def message_size_problem(split_frames: dict, manual_bytes: int, workers: int):
  """None, or why a local build of these splits may hit the gRPC limit.

  The largest split's share of the manual folder's bytes (built examples
  are about as large as their source files: 1.4 GB built from 1.4 GB of
  `.r3d` here), divided over the workers.
  """
  total_frames = sum(split_frames.values())
  if not total_frames or not workers:
    return None
  split, frames = max(split_frames.items(), key=lambda item: item[1])
  split_bytes = manual_bytes * frames / total_frames
  per_worker_budget = SIZE_WARNING_FRACTION * GRPC_MESSAGE_LIMIT
  if split_bytes / workers <= per_worker_budget:
    return None
  needed = math.ceil(split_bytes / per_worker_budget)
  return (f"split {split!r} holds ~{split_bytes / 1e9:.1f} GB of examples ({frames} frames, "
          f"estimated from the manual folder's size), ~{split_bytes / workers / 1e9:.1f} GB per "
          f"worker process with direct_num_workers={workers}: Beam's local runner sends each "
          f"worker its share in one gRPC message, which fails above "
          f"{GRPC_MESSAGE_LIMIT / 1e9:.1f} GB (\"Buffer size ... "
          f"exceeds GRPC limit\"). Use direct_num_workers={needed} or more, build in process "
          "(no --beam_pipeline_options), or on Dataflow")


def may_try_prism(download_config) -> bool:
  """Beam options naming the DirectRunner (or no runner): Beam may first try
  to download and run Prism instead of the runner measured here."""
  values = _options(download_config)
  return bool(values) and values.get("runner") in _DIRECT_RUNNER_NAMES


def unordered_writer(download_config) -> bool:
  """Did the user ask for TFDS' unordered Beam writer (`--nondeterministic_order`)?

  That writer (NoShuffleBeamWriter: Reshuffle, serialize, Beam's TFRecord
  sink, whose grouping by shard feeds one stage) has no grouping read by two
  stages as TFDS' default writer's shard grouping is, and lost no example
  in the local multi_processing builds of 5,120 frames where the default
  writer lost some in most (counts: the builder's warning, README Big
  builds). Examples are then stored in no fixed order.
  """
  return bool(download_config is not None and download_config.nondeterministic_order)


def check_unordered_options(download_config) -> None:
  """The unordered writer needs a shard count: TFDS 4.9 hands `num_shards=None`
  to Beam's WriteToTFRecord, which Beam 2.77 refuses with a bare TypeError
  deep in pipeline construction. Said here, before anything is checked or
  written."""
  if unordered_writer(download_config) and not download_config.num_shards:
    raise ValueError(
        "--nondeterministic_order (DownloadConfig(nondeterministic_order=True)) with Beam "
        "needs --num_shards N (DownloadConfig(num_shards=N)): TFDS' unordered Beam writer "
        "cannot choose a shard count itself with this Beam version. N files are written "
        "for every split: a 960x720 JPEG frame with its depth takes ~270 KB, so 16 files "
        "of 4,000 frames are ~70 MB each")


def uses_beam(download_config) -> bool:
  """Did the user ask for a Beam build (options or a runner)?"""
  return bool(download_config is not None and
              (download_config.beam_options is not None or
               download_config.beam_runner is not None))
