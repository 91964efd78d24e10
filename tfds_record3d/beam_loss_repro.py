"""Does the local Beam runner lose examples? A TFDS Beam build with no depth2d code.

    python -m tfds_record3d.beam_loss_repro --examples=5120 --example_bytes=300000 \
        --workers=1 --runs=2 --data_dir=/tmp/beam_loss

Large `record3d` builds with the local DirectRunner in multi_processing mode
wrote fewer train examples than they were given here (README, "Beam builds";
the builder stops with LostExamplesError). This script builds a minimal TFDS
dataset the same way, with nothing of this project in it: `--examples` random
byte strings of `--example_bytes` each, split 81.25 / 9.375 / 9.375% like the
5,120-frame build, in record3d's shape (`--frames_per_capture` examples per
element, listed by a FlatMap, reshuffled, then made one by one; 0: one
element per example from the start), TFDS' own BeamWriter. After each run it
compares what TFDS recorded per split with what it was given. So
the loss can be reproduced (and reported upstream: Apache Beam / TFDS) apart
from the record3d builder, and a user can try their own runner set-up before a
big build.

`--workers=N` (N >= 1): `--runner=FnApiRunner --direct_num_workers=N
--direct_running_mode=multi_processing`; `--workers=0`: the in-memory
FnApiRunner (the Python runner Beam's DirectRunner falls back to when its
Prism runner cannot be fetched, as offline here). Exit status 1 when any run
lost examples, 0 when none did (a run without loss proves nothing about the
next one: the loss is intermittent).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app
from absl import flags
from absl import logging

# Fractions of the examples per split, as in the 5,120-frame record3d build
# (4,160 / 480 / 480).
SPLITS = (("train", 0.8125), ("validation", 0.09375), ("test", 0.09375))


@dataclasses.dataclass
class ReproConfig(tfds.core.BuilderConfig):
  """The build's settings (the flags' defaults are these)."""
  examples: int = 5120
  example_bytes: int = 300_000
  busy_ms: float = 0.0
  frames_per_capture: int = 160  # record3d's 5,120-frame builds: 32 captures x 160


DEFAULTS = ReproConfig(name="default")


def split_ranges(examples: int) -> dict:
  """{split: range of example indices}; every index in exactly one split."""
  out, start = {}, 0
  for index, (name, fraction) in enumerate(SPLITS):
    stop = examples if index == len(SPLITS) - 1 else start + int(examples * fraction)
    out[name] = range(start, stop)
    start = stop
  return out


def capture_starts(indices: range, per_capture: int) -> list:
  """The first example index of each "capture" of `per_capture` examples."""
  return list(range(indices.start, indices.stop, per_capture))


def capture_frames(start: int, stop: int, per_capture: int) -> range:
  """One capture's example indices: from `start`, at most `per_capture`, before `stop`."""
  return range(start, min(start + per_capture, stop))


def make_example(index: int, size: int, busy_ms: float = 0.0):
  """(key, example): `size` random bytes, seeded by the index (no state), after
  `busy_ms` of CPU time spent in a loop (a record3d frame's read and encode)."""
  end = time.process_time() + busy_ms / 1000.0
  while time.process_time() < end:
    pass
  return f"{index:08d}", {"data": np.random.default_rng(index).bytes(size), "index": index}


class BeamLossRepro(tfds.core.GeneratorBasedBuilder):
  """Random bytes of a record3d frame's size, in the record3d Beam build's shape."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Random bytes for the Beam loss check."}
  BUILDER_CONFIGS = [DEFAULTS]

  def _info(self):
    # DatasetInfo directly: dataset_info_from_configs reads a package folder,
    # which a builder run as `python -m` (in __main__) does not have.
    return tfds.core.DatasetInfo(builder=self, description=__doc__.splitlines()[0],
                                 features=tfds.features.FeaturesDict({
                                     "data": tfds.features.Tensor(shape=(), dtype=np.object_),
                                     "index": np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    beam = tfds.core.lazy_imports.apache_beam
    config = self.builder_config
    size, busy_ms, per_capture = config.example_bytes, config.busy_ms, config.frames_per_capture
    out = {}
    for name, indices in split_ranges(config.examples).items():
      if per_capture:  # record3d's shape: a capture per element, listed into its frames
        elements = (beam.Create(capture_starts(indices, per_capture))
                    | f"Frames_{name}" >> beam.FlatMap(capture_frames, stop=indices.stop,
                                                       per_capture=per_capture))
      else:
        elements = beam.Create(list(indices))
      # Reshuffle spreads the frames over the workers (beam_build does the same).
      out[name] = (elements | f"Spread_{name}" >> beam.Reshuffle()
                   | f"Make_{name}" >> beam.Map(make_example, size=size, busy_ms=busy_ms))
    return out

  def _generate_examples(self):
    raise NotImplementedError  # _split_generators returns Beam PCollections


def lost_per_split(expected: dict, written: dict) -> dict:
  """{split: examples given minus examples TFDS recorded}, only where > 0."""
  return {name: count - written.get(name, 0) for name, count in expected.items()
          if count > written.get(name, 0)}


def beam_flags(workers: int) -> list:
  """The local runner's flags: build_benchmark's beam_memory (0) / beam_N
  (tfds_record3d.beam_build.local_runner_flags), written here again so that
  this file stands alone in a report upstream. FnApiRunner: what Beam's
  DirectRunner falls back to offline, without its first try of Prism."""
  if workers == 0:
    return ["--runner=FnApiRunner"]
  return ["--runner=FnApiRunner", f"--direct_num_workers={workers}",
          "--direct_running_mode=multi_processing"]


def run_once(data_dir: str, workers: int, **settings) -> dict:
  """One build into a fresh `data_dir`, `settings` overriding ReproConfig's
  defaults: {"written", "expected", "lost", "seconds"}."""
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  shutil.rmtree(data_dir, ignore_errors=True)
  config = dataclasses.replace(DEFAULTS, name="build", **settings)
  builder = BeamLossRepro(config=config, data_dir=data_dir)
  start = time.perf_counter()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      beam_options=PipelineOptions(flags=beam_flags(workers))))
  seconds = time.perf_counter() - start
  expected = {name: len(r) for name, r in split_ranges(config.examples).items()}
  written = {name: split.num_examples for name, split in builder.info.splits.items()}
  return {"expected": expected, "written": written, "lost": lost_per_split(expected, written),
          "seconds": seconds}


def define_flags(values: flags.FlagValues = flags.FLAGS) -> flags.FlagValues:
  """Declared on `values` only when run as the program: the trainer has a
  --data_dir of its own, and tests import both."""
  v = {"flag_values": values}
  flags.DEFINE_integer("examples", DEFAULTS.examples,
                       "Examples in all (at least 3: one per split).", **v)
  flags.DEFINE_integer("example_bytes", DEFAULTS.example_bytes,
                       "Bytes per example (a 960x720 JPEG frame with its depth: ~300 KB).", **v)
  flags.DEFINE_integer("workers", 1, "FnApiRunner worker processes (multi_processing); "
                       "0: the in-memory FnApiRunner.", **v)
  flags.DEFINE_float("busy_ms", DEFAULTS.busy_ms, "CPU time each example costs its worker before it is "
                     "returned (a record3d frame: ~35 ms to read and encode).", **v)
  flags.DEFINE_integer("frames_per_capture", DEFAULTS.frames_per_capture,
                       "Examples per Beam element before a FlatMap lists them, as record3d's "
                       "captures are (its 5,120-frame builds: 32 x 160); 0: one element per "
                       "example from the start.", **v)
  flags.DEFINE_integer("runs", 2, "Builds, each into a fresh folder (the loss is intermittent).",
                       **v)
  flags.DEFINE_string("data_dir", None, "Where the builds go (default: a new temp dir); "
                      "each run replaces the last.", **v)
  return values


def main(argv, values: flags.FlagValues = flags.FLAGS) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for name, low in (("examples", len(SPLITS)), ("example_bytes", 1), ("workers", 0),
                    ("runs", 1), ("busy_ms", 0), ("frames_per_capture", 0)):
    if getattr(values, name) < low:
      raise app.UsageError(f"--{name}={getattr(values, name)}: must be at least {low}")
  data_dir = values.data_dir or tempfile.mkdtemp(prefix="beam_loss_repro_")
  any_lost = False
  for run in range(1, values.runs + 1):
    logging.info("run %d/%d: %d examples of %d bytes, %g ms CPU each, %d per capture, %s",
                 run, values.runs, values.examples, values.example_bytes, values.busy_ms,
                 values.frames_per_capture,
                 " ".join(beam_flags(values.workers)))
    result = run_once(os.path.join(data_dir, "build"), values.workers,
                      examples=values.examples, example_bytes=values.example_bytes,
                      busy_ms=values.busy_ms, frames_per_capture=values.frames_per_capture)
    lost = result["lost"]
    any_lost |= bool(lost)
    print(f"run {run}/{values.runs}: written {result['written']} of {result['expected']} in "
          f"{result['seconds']:.0f} s: "
          + (f"LOST {lost} (TFDS raised no error)" if lost else "nothing lost"), flush=True)
  return 1 if any_lost else 0


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
