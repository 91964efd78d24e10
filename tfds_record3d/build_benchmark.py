"""Times `record3d/r3d` builds of one folder: in process against Apache Beam.

    python -m tfds_record3d.build_benchmark --frames=1280 --captures=16 \
        --modes=in_process,beam_1,beam_2 --workdir=/tmp/build_bench --json=build.json

Writes `--captures` Record3D `.r3d` files of real-size frames (960x720 JPEG RGB,
256x192 LZFSE depth and confidence; HxW, as everywhere in the project;
`tfds_record3d.writers.write_r3d`) under
`--workdir` (reused when present), then builds them once per mode into a fresh
data dir, each mode after the same launcher check (`Builder._scan`, timed once,
apart: every mode pays it before it writes). Modes:

  in_process   no Beam options: TFDS' Python writer in this process
  beam_memory  `--runner=FnApiRunner` (Beam in this process, in memory)
  beam_N       `--runner=FnApiRunner --direct_num_workers=N
                --direct_running_mode=multi_processing` (N worker processes)
  *_unordered  a Beam mode with TFDS' unordered writer
                (`--nondeterministic_order --num_shards=--num_shards`)
(FnApiRunner: what `--runner=DirectRunner` falls back to offline; see
beam_build.LOCAL_RUNNER.)

`--rounds=R` runs the modes R times in turn (ABAB..., so a drift in the
machine's speed reaches every mode alike); the ratios use each mode's median.

Per mode: frames written (the builder itself refuses a build that lost a
frame with LostExamplesError: reported as LOST, with the error's counts),
wall seconds, frames/s, and the CPU seconds of this process and of every
child process (the Beam workers), sampled with psutil
every 0.2 s: CPU ms per frame and cores busy. From the CPU cost it also gives
the frames/s this machine's cores could reach at best (nproc / CPU per frame),
which says whether a ratio such as "2 workers >= 1.6x one" is possible here
at all. For Beam modes, where the time goes: Beam's local runner runs the
pipeline's fused stages one after another and logs each (DEBUG); their start
times and the CPU samples give each phase's wall seconds and the cores the
launcher (the runner: every element between stages passes through it) and
the workers kept busy in it (PHASES).

The frames are `--distinct_frames` rendered ones (tfds_record3d.synthetic at
the real size, ~1 s each), cycled: every frame of every capture is written,
checked, read and encoded like any other, so the build cost per frame is that
of distinct captures (JPEG bytes are stored as they are, depth is compressed).
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import shutil
import statistics
import tempfile
import threading
import time

import numpy as np
import psutil
import tensorflow_datasets as tfds
import tqdm
from absl import app
from absl import flags
from absl import logging
from etils import epath

import tfds_record3d  # noqa: F401  (registers record3d)
from tfds_record3d import beam_build
from tfds_record3d import sizes
from tfds_record3d import synthetic
from tfds_record3d import writers
from tfds_record3d.record3d import record3d_dataset_builder as record3d_builder

FLAGS = flags.FLAGS
MODES_HELP = ("in_process, beam_memory or beam_N with N >= 1 worker processes; a Beam mode "
              "+ '_unordered' uses TFDS' unordered writer (e.g. beam_2_unordered)")
UNORDERED = "_unordered"
SAMPLE_SECONDS = 0.2


def beam_flags(mode: str):
  """A mode's Beam pipeline flags; None for the in-process build."""
  if mode == "in_process":
    return None
  base = mode.removesuffix(UNORDERED)
  if base == "beam_memory":
    return beam_build.local_runner_flags(0)
  if base.startswith("beam_") and base[5:].isdigit() and int(base[5:]) >= 1:
    return beam_build.local_runner_flags(int(base[5:]))
  raise ValueError(f"--modes: unknown mode {mode!r}; expected {MODES_HELP}")


def unordered(mode: str) -> bool:
  """Does the mode use TFDS' unordered Beam writer (--nondeterministic_order)?"""
  return mode.endswith(UNORDERED)


# ----------------------------------------------------------------------------
# The folder: real-size captures.
# ----------------------------------------------------------------------------
def write_captures(manual_dir: epath.Path, frames: int, captures: int, distinct: int,
                   image_size, depth_size) -> None:
  """Untimed: `captures` .r3d files holding `frames` frames in all (reused when
  the folder already holds them)."""
  per_capture = [frames // captures + (i < frames % captures) for i in range(captures)]
  paths = [manual_dir / f"capture_{i:03d}.r3d" for i in range(captures)]
  marker = manual_dir / "frames.json"
  wanted = {"frames": per_capture, "distinct": distinct, "image_size": list(image_size),
            "depth_size": list(depth_size)}
  if marker.exists() and json.loads(marker.read_text()) == wanted and all(p.exists() for p in paths):
    logging.info("Reusing the %d captures in %s", captures, manual_dir)
    return
  if manual_dir.exists():
    shutil.rmtree(manual_dir)
  logging.info("Rendering %d distinct frames at %dx%d (depth %dx%d, HxW)", distinct,
               *image_size, *depth_size)
  rendered = list(tqdm.tqdm(synthetic.render_sequence(seed=900, num_frames=distinct,
                                                      image_size=tuple(image_size),
                                                      depth_size=tuple(depth_size)),
                            total=distinct, desc="render", unit="frame"))
  with tqdm.tqdm(total=frames, desc="write .r3d", unit="frame") as bar:
    for path, count in zip(paths, per_capture):
      writers.write_r3d(path, [rendered[i % distinct] for i in range(count)])
      bar.update(count)
  marker.write_text(json.dumps(wanted))


# ----------------------------------------------------------------------------
# CPU of this process and its children (the Beam workers).
# ----------------------------------------------------------------------------
class TreeCpu:
  """CPU seconds used by this process and every descendant while it runs.

  Children are sampled every SAMPLE_SECONDS (the last sample of a worker that
  exits is kept), this process is read exactly at start and stop. `timeline`
  holds every sample: (perf_counter, own CPU s, children's CPU s), both
  counted from the start.
  """

  def __init__(self):
    self._me = psutil.Process()
    self._children = {}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self.timeline = []

  def _own(self) -> float:
    times = self._me.cpu_times()
    return times.user + times.system - self._own_start

  def _children_total(self) -> float:
    return sum(cpu for pid, cpu in self._children.items() if pid not in self._existing)

  def _sample(self):
    while not self._stop.is_set():
      for child in self._me.children(recursive=True):
        try:
          times = child.cpu_times()
          self._children[child.pid] = times.user + times.system
        except psutil.Error:  # exited between listing and reading
          pass
      self.timeline.append((time.perf_counter(), self._own(), self._children_total()))
      self._stop.wait(SAMPLE_SECONDS)

  def __enter__(self):
    times = self._me.cpu_times()
    self._own_start = times.user + times.system
    self._existing = {c.pid for c in self._me.children(recursive=True)}
    self.timeline.append((time.perf_counter(), 0.0, 0.0))
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.own_seconds = self._own()
    self.children_seconds = self._children_total()
    self.timeline.append((time.perf_counter(), self.own_seconds, self.children_seconds))
    self.worker_processes = len(set(self._children) - self._existing)


# ----------------------------------------------------------------------------
# Where a Beam build's time goes: the runner's stages.
# ----------------------------------------------------------------------------
# Beam's FnApiRunner logs (at DEBUG) every bundle it starts, with its fused
# stage's name: the labels of the transforms fused into it.
BUNDLE_LOGGER = "apache_beam.runners.portability.fn_api_runner.fn_runner.run_bundle"
# A stage's phase: the first of these labels it holds (beam_build.split_transform's
# and TFDS' writers'), else "other stages". With the unordered writer the
# frames' stage ends in the writer's Reshuffle, the next one serializes and
# groups by shard, the next writes; with the default writer the frames' stage
# also serializes, and the shards are grouped and written after it.
PHASES = (("ReadFrames", "read + encode frames"), ("Serialize", "serialize, group by shard"),
          ("WriteBundles", "write shards"), ("GroupShards", "group + write shards"))
STARTUP = "pipeline set-up (before the first stage)"
FIRST = "first stage (the worker processes start)"  # a tiny Create: its time is the start
LAST = "last stage, then TFDS' split info"
OTHER = "other stages"


def phase_of(stage_name: str) -> str:
  return next((phase for label, phase in PHASES if label in stage_name), OTHER)


class StageLog(std_logging.Handler):
  """Collects (perf_counter, stage name) of every bundle the runner starts."""

  def __init__(self):
    super().__init__(std_logging.DEBUG)
    self.starts = []

  def emit(self, record):
    if record.msg.startswith("Running bundle for stage"):
      self.starts.append((time.perf_counter(), str(record.args[0])))

  def __enter__(self):
    self._logger = std_logging.getLogger(BUNDLE_LOGGER)
    self._saved = (self._logger.level, self._logger.propagate)
    self._logger.setLevel(std_logging.DEBUG)
    self._logger.propagate = False  # its DEBUG lines stay out of the log
    self._logger.addHandler(self)
    return self

  def __exit__(self, *exc):
    self._logger.removeHandler(self)
    self._logger.setLevel(self._saved[0])
    self._logger.propagate = self._saved[1]


def phases(starts, timeline, start: float, stop: float) -> list:
  """[{phase, seconds, launcher_cores, worker_cores}] in order of first
  appearance: each stage lasts until the next one starts (the last until the
  build returns), CPU from the samples (linear between them)."""
  times, own, children = (np.array(column) for column in zip(*timeline))
  cpu = lambda column, t: float(np.interp(t, times, column))
  named = [(t, FIRST if i == 0 else LAST if i == len(starts) - 1 else phase_of(name))
           for i, (t, name) in enumerate(starts)]
  edges = [(start, STARTUP)] + named + [(stop, None)]
  totals = {}
  for (begin, phase), (end, _) in zip(edges, edges[1:]):
    row = totals.setdefault(phase, [0.0, 0.0, 0.0])
    row[0] += end - begin
    row[1] += cpu(own, end) - cpu(own, begin)
    row[2] += cpu(children, end) - cpu(children, begin)
  return [{"phase": phase, "seconds": seconds,
           "launcher_cores": own_cpu / seconds if seconds else 0.0,
           "worker_cores": workers / seconds if seconds else 0.0}
          for phase, (seconds, own_cpu, workers) in totals.items()]


# ----------------------------------------------------------------------------
# One build.
# ----------------------------------------------------------------------------
def time_build(mode: str, manual_dir: epath.Path, data_dir: epath.Path, frames: int,
               num_shards: int) -> dict:
  """One build of the folder into a fresh `data_dir`, timed with its CPU. A build
  that lost frames (LostExamplesError, nothing kept) is reported as such.
  num_shards: files per split of the unordered writer's modes."""
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  options = beam_flags(mode)
  if data_dir.exists():
    shutil.rmtree(data_dir)
  builder = tfds.builder("record3d/r3d", data_dir=os.fspath(data_dir))
  config = tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir),
      beam_options=PipelineOptions(flags=options) if options else None,
      nondeterministic_order=unordered(mode), num_shards=num_shards if unordered(mode) else None)
  lost = None
  with TreeCpu() as cpu, StageLog() as stages:
    start = time.perf_counter()
    try:
      builder.download_and_prepare(download_config=config)
    except record3d_builder.LostExamplesError as e:  # a result to report, not a crash
      lost = str(e)
      logging.warning("%s: %s", mode, lost)
    stop = time.perf_counter()
  seconds = stop - start
  # A build that lost frames is not kept: its rate counts the frames it was given.
  written = frames if lost else sum(split.num_examples for split in builder.info.splits.values())
  cpu_seconds = cpu.own_seconds + cpu.children_seconds
  nproc = os.cpu_count() or 1
  return {"mode": mode, "beam_flags": options, "unordered": unordered(mode),
          "frames": written, "lost": lost,
          "seconds": seconds,
          "frames_per_s": written / seconds, "cpu_seconds": cpu_seconds,
          "launcher_cpu_seconds": cpu.own_seconds, "worker_cpu_seconds": cpu.children_seconds,
          "worker_processes": cpu.worker_processes,
          "cpu_ms_per_frame": 1000.0 * cpu_seconds / written,
          "cores_busy": cpu_seconds / seconds,
          "frames_per_s_bound": nproc * written / cpu_seconds,
          "phases": phases(stages.starts, cpu.timeline, start, stop) if options else []}


def check_folder(manual_dir: epath.Path, frames: int) -> dict:
  """The launcher's check (every file decoded), once: every mode runs it
  before it writes, and it is cached per folder, so it is timed apart."""
  builder = tfds.builder("record3d/r3d", data_dir=os.fspath(manual_dir.parent / "check"))
  start = time.perf_counter()
  builder._scan(manual_dir)  # pylint: disable=protected-access
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "frames_per_s": frames / seconds}


def median_rates(builds) -> dict:
  """mode -> median frames/s over its rounds."""
  modes = dict.fromkeys(b["mode"] for b in builds)
  return {m: statistics.median(b["frames_per_s"] for b in builds if b["mode"] == m) for m in modes}


def format_table(result: dict) -> str:
  rounds = max(b.get("round", 1) for b in result["builds"])
  lines = ["| build | frames | s | frames/s | CPU ms/frame (launcher + workers) | cores busy "
           "| frames/s the cores allow | vs in process |",
           "|---|---|---|---|---|---|---|---|"]
  medians = median_rates(result["builds"])
  base = medians.get("in_process")
  for r in result["builds"]:
    versus = f"{r['frames_per_s'] / base:.2f}x" if base else "-"
    frames = f"LOST frames of {r['frames']}" if r["lost"] else r["frames"]
    name = r["mode"] + (f" (round {r['round']})" if rounds > 1 else "")
    lines.append(
        f"| {name} | {frames} | {r['seconds']:.1f} | {r['frames_per_s']:.1f} | "
        f"{r['cpu_ms_per_frame']:.1f} ({1000 * r['launcher_cpu_seconds'] / r['frames']:.1f} + "
        f"{1000 * r['worker_cpu_seconds'] / r['frames']:.1f}) | {r['cores_busy']:.2f} | "
        f"{r['frames_per_s_bound']:.1f} | {versus} |")
  lines.append("")
  if rounds > 1:
    lines.append("Medians over %d rounds, frames/s: %s." % (rounds, ", ".join(
        f"{mode} {rate:.1f}" + (f" ({rate / base:.2f}x in process)" if base else "")
        for mode, rate in medians.items())))
  for suffix in ("", UNORDERED):
    one, two = f"beam_1{suffix}", f"beam_2{suffix}"
    if one in medians and two in medians:
      bound = statistics.median(b["frames_per_s_bound"] for b in result["builds"]
                                if b["mode"] == two)
      lines.append(
          f"{two} / {one}: {medians[two] / medians[one]:.2f}x; at {two}'s CPU cost the "
          f"{result['machine']['cpus']} cores allow at most {bound / medians[one]:.2f}x "
          f"{one}'s frames/s.")
  lost = [b for b in result["builds"] if b["lost"]]
  lines.extend(f"{b['mode']}: {b['lost']}" for b in lost)
  lines.append(f"Builds that lost frames: {len(lost)} of {len(result['builds'])}"
               + (" (" + ", ".join(sorted({b['mode'] for b in lost})) + ")" if lost else "") + ".")
  lines.extend(format_phases(result["builds"], rounds))
  check = result["check"]
  lines.append(f"Launcher check (every file decoded, before any build writes): "
               f"{check['seconds']:.1f} s, {check['frames_per_s']:.1f} frames/s.")
  return "\n".join(lines)


def format_phases(builds, rounds: int) -> list:
  """Lines of the Beam builds' phases table (none without a Beam build)."""
  rows = [(b, p) for b in builds for p in b.get("phases", [])]
  if not rows:
    return []
  lines = ["", "Where the Beam builds' time goes (the runner's stages, in order; cores "
           "busy in each, of the launcher and of the worker processes):",
           "| build | phase | s | of the build | launcher cores | worker cores |",
           "|---|---|---|---|---|---|"]
  for build, phase in rows:
    name = build["mode"] + (f" (round {build['round']})" if rounds > 1 else "")
    lines.append(f"| {name} | {phase['phase']} | {phase['seconds']:.1f} | "
                 f"{100 * phase['seconds'] / build['seconds']:.0f}% | "
                 f"{phase['launcher_cores']:.2f} | {phase['worker_cores']:.2f} |")
  return lines + [""]


def define_flags() -> None:
  """Declared only when run as a program: trainer.benchmark has flags of the
  same names (--workdir, --json) and tests import both modules."""
  flags.DEFINE_integer("frames", 1280, "Frames in all, split evenly over --captures.")
  flags.DEFINE_integer("captures", 16, "Number of .r3d captures (one sequence each).")
  flags.DEFINE_integer("distinct_frames", 8, "Frames actually rendered, cycled to fill the captures.")
  flags.DEFINE_list("modes", ["in_process", "beam_1", "beam_2"],
                    "Builds to time, in order: in_process, beam_memory, beam_N (N workers); "
                    "+_unordered: TFDS' unordered writer (beam_2_unordered).")
  flags.DEFINE_integer("rounds", 1, "Times to run the modes in turn (medians are compared).")
  flags.DEFINE_integer("num_shards", 16, "Files per split for the *_unordered modes "
                       "(tfds build --num_shards).")
  flags.DEFINE_string("image_size", "960,720", "H,W of the RGB frames (the phone's, portrait).")
  flags.DEFINE_string("depth_size", "256,192", "H,W of depth and confidence (LiDAR: 256,192).")
  flags.DEFINE_string("workdir", None, "Where the captures and the builds go (default: a new temp dir).")
  flags.DEFINE_string("json", None, "Also write every figure to this JSON file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for mode in FLAGS.modes:
    try:
      beam_flags(mode)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  try:
    image_size = sizes.parse_image_size(FLAGS.image_size, "--image_size")
    depth_size = sizes.parse_image_size(FLAGS.depth_size, "--depth_size")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.captures < 1 or FLAGS.frames < 10 * FLAGS.captures:
    raise app.UsageError(f"--frames={FLAGS.frames} --captures={FLAGS.captures}: need at least "
                         "1 capture and 10 frames per capture (splits are made by capture)")
  if FLAGS.distinct_frames < 1:
    raise app.UsageError("--distinct_frames must be at least 1")
  if FLAGS.rounds < 1 or FLAGS.num_shards < 1:
    raise app.UsageError(f"--rounds={FLAGS.rounds} --num_shards={FLAGS.num_shards}: both must "
                         "be at least 1")
  workdir = epath.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="record3d_build_"))
  manual_dir = workdir / f"captures_{FLAGS.frames}_{FLAGS.captures}"
  started = time.perf_counter()
  frames = FLAGS.frames
  write_captures(manual_dir, frames, FLAGS.captures, FLAGS.distinct_frames, image_size,
                 depth_size)
  load_start = os.getloadavg()[0]
  result = {"machine": {"cpus": os.cpu_count(), "load_average_start": load_start},
            "frames": frames, "captures": FLAGS.captures, "image_size": list(image_size),
            "depth_size": list(depth_size), "distinct_frames": FLAGS.distinct_frames,
            "check": check_folder(manual_dir, frames), "builds": []}
  rates = []
  runs = [(round_, mode) for round_ in range(1, FLAGS.rounds + 1) for mode in FLAGS.modes]
  for index, (round_, mode) in enumerate(runs):
    left = (len(runs) - index) * frames / statistics.mean(rates) if rates else None
    logging.info("=== build %d/%d: %s, round %d (%.0f s since start%s)", index + 1, len(runs),
                 mode, round_, time.perf_counter() - started,
                 f", ~{left:.0f} s left at the rate so far" if left else "")
    build = time_build(mode, manual_dir, workdir / f"build_{mode}", frames, FLAGS.num_shards)
    build["round"] = round_
    rates.append(build["frames_per_s"])
    logging.info("%s: %d frames in %.1f s, %.1f frames/s, %.1f CPU ms/frame, %.2f cores busy",
                 mode, build["frames"], build["seconds"], build["frames_per_s"],
                 build["cpu_ms_per_frame"], build["cores_busy"])
    result["builds"].append(build)
  result["machine"]["load_average_end"] = os.getloadavg()[0]
  table = format_table(result)
  print(f"{frames} frames in {FLAGS.captures} .r3d captures ({image_size[0]}x{image_size[1]} JPEG, "
        f"{depth_size[0]}x{depth_size[1]} depth, HxW), {os.cpu_count()} CPUs, load average "
        f"{load_start:.2f} at start, {result['machine']['load_average_end']:.2f} at end:\n{table}")
  if FLAGS.json:
    epath.Path(FLAGS.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
