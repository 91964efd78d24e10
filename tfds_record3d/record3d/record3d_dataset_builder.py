"""The `record3d` TFDS dataset: RGB images with metric depth (iPhone LiDAR).

Configs:
  synthetic (default)  procedurally rendered rooms with LiDAR-like depth; no files needed.
  synthetic_target     a second rendered domain, unlike `synthetic` (synthetic_target.py).
  pairs                folders of RGB + depth files (manual_dir), see pairs_format.py.
  r3d                  Record3D `.r3d` exports (manual_dir), see r3d_format.py.

Note: this module must not use `os` or `open` (TFDS tests forbid them here,
everything goes through epath so that gs:// paths work).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from tfds_record3d import beam_build
from tfds_record3d import cli_guard
from tfds_record3d import depth_checks
from tfds_record3d import frame_example
from tfds_record3d import pairs_format
from tfds_record3d import provenance
from tfds_record3d import r3d_format
from tfds_record3d import split_stats
from tfds_record3d import splits
from tfds_record3d import synthetic
from tfds_record3d import synthetic_target
from tfds_record3d import validation

_DESCRIPTION = """\
RGB images paired with metric depth maps, as captured by an iPhone LiDAR
with the Record3D app, for single-image depth estimation.

Features: `image` uint8 (H, W, 3); `depth` float32 (Hd, Wd) in meters, 0 =
invalid (NaN, 0 and saturated 65535 in the source all become 0), at the
sensor's own resolution (never resampled; LiDAR is 256x192); `confidence`
uint8 (Hd, Wd), 0 low / 1 medium / 2 high (2 when the source has none);
`intrinsics` float32 (3, 3) pinhole K for the IMAGE size (pixel centres at
+0.5; multiply the first two rows by Wd/W, Hd/H for the depth size);
`sequence` (capture name) and `frame` (index in the capture).

The `synthetic` and `synthetic_target` configs are rendered rooms whose
`depth` is what an iPhone LiDAR would report (noise growing with distance,
wrong "flying pixel" depth at occluding edges, nothing beyond 6.5 m) and
whose `confidence` marks the unreliable pixels (0 at edges, at grazing
angles over 78 degrees and beyond 5 m; 1 over 66 degrees and beyond 4 m).
`synthetic_target` has other layouts, materials, lighting, a lower camera
and a wider field of view: rooms unlike those of `synthetic`, for
measuring generalisation.

Splits train / validation / test (~80/10/10 of frames) are made by
sequence, never by frame, so near-identical neighbouring frames cannot leak
across splits; a single sequence is cut into contiguous blocks instead.

Statistics (frames and sequences per split, depth range, valid fraction)
are computed while building and stored in `info.metadata["stats"]`; when,
and from which manual folder (with a fingerprint of its files), in
`info.metadata["provenance"]`.
"""

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Config `r3d`: in the Record3D app, open the Library, pick a recording and
use "Export" -> "Export as .r3d" (LiDAR or TrueDepth). Copy the .r3d files
into one folder, one file per sequence (named by the file's stem):
  M/kitchen.r3d
  M/office.r3d

Config `pairs`: one folder per sequence with RGB and depth files matched by
file stem (a capture tool using Record3D's USB streaming can save frames this
way; the seed notebook's `X/` and `Y/` names are accepted too):
  M/<sequence>/rgb/000001.jpg        (.jpg/.jpeg/.png)
  M/<sequence>/depth/000001.png      (uint16, 1000 units per meter by default),
                                     or .npy float32 meters, or .exr (one channel, meters)
  M/<sequence>/confidence/000001.png (optional, uint8 0/1/2)
  M/<sequence>/depth2d.json          (optional: {"depth_scale": 5000,
                                      "intrinsics": {"fx":..,"fy":..,"cx":..,"cy":..},
                                      "pair_by": "stem" | "order" | "timestamp"})
`rgb/` and `depth/` directly in M make one sequence. A Record3D EXR export
(rgb/, depth/*.exr, metadata.json) can be used as a sequence folder as is.
TUM RGB-D: add {"depth_scale": 5000, "pair_by": "timestamp"}.
Intrinsics default to fx = fy = 0.755 * max(H, W), principal point at the centre.

Then: tfds build record3d --imports tfds_record3d --config pairs --manual_dir M --data_dir DIR
"""


@dataclasses.dataclass(eq=False)
class Record3dConfig(tfds.core.BuilderConfig):
  """A source of frames; the synthetic fields only matter for `synthetic`."""
  source: str = "synthetic"  # "synthetic" | "pairs" | "r3d"
  num_frames: int = synthetic.NUM_FRAMES
  image_size: tuple[int, int] = synthetic.IMAGE_SIZE  # (H, W)
  depth_size: tuple[int, int] = synthetic.DEPTH_SIZE  # (H, W)
  image_encoding: str = "jpeg"  # how `image` is stored: "jpeg" or "png"
  synthetic_domain: str = "source"  # synthetic rooms: "source" or "target" (synthetic.domain)


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for the record3d dataset."""

  # A build of an older version keeps loading when asked for by version:
  # tfds.builder("record3d/r3d:1.0.0", data_dir=...) (or version="1.0.0")
  # reads that build's own features.json (TFDS loads "from files" whenever a
  # version is given), so old versions need no SUPPORTED_VERSIONS entry (that
  # would claim this code can still generate them; it cannot).
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: synthetic, pairs and r3d configs.",
      "1.1.0": (
          "New features source (file relative to the manual folder), timestamp "
          "(float64 s, -1 unknown), pose (float32 4x4 camera-to-world, OpenGL axes, "
          "identity unknown), camera (ClassLabel lidar/truedepth/unknown). pairs, r3d: "
          "RGB that arrives as JPEG or 8-bit PNG is stored as the source's own bytes "
          "(no decode + re-encode; `image` encoding_format None); Apache Beam builds "
          "(--beam_pipeline_options); manual_dir on gs://. synthetic: depth is "
          "LiDAR-like sensor depth (noise 0.008 z + 0.002 z^2 m, flying pixels at "
          "occluding edges, none beyond 6.5 m) with a real confidence map, RGB "
          "unchanged, timestamp frame/30, its own camera poses, camera lidar. New "
          "config synthetic_target: 600 frames in 20 rooms of another style, same "
          "features and sensor model."),
  }
  BUILDER_CONFIGS = [
      Record3dConfig(
          name="synthetic",
          description=(
              "1059 rendered frames in ~30 room walk-throughs, RGB 320x240, LiDAR-like "
              "depth and confidence 256x192; needs no files."),
          source="synthetic",
      ),
      Record3dConfig(
          name="synthetic_target",
          description=(
              "600 rendered frames in 20 rooms unlike `synthetic`'s (layouts, materials, "
              "lighting, lower camera, 80-degree field of view, depth up to ~5 m), "
              "same sensor model and sizes; needs no files."),
          source="synthetic",
          num_frames=synthetic_target.NUM_FRAMES,
          synthetic_domain="target",
      ),
      Record3dConfig(
          name="pairs",
          description="Folders of RGB images and depth maps matched by file stem (manual_dir).",
          source="pairs",
          image_encoding="png",  # sources are often lossless already
      ),
      Record3dConfig(
          name="r3d",
          description="Record3D .r3d exports, one sequence per file (manual_dir).",
          source="r3d",
      ),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "synthetic"
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 derives this from the package's resource path and, for a
    # plain (editable or site-packages) install, imports the `importlib_resources`
    # backport it does not declare (setup.py now does); without it every build
    # fails. This file is the answer TFDS would compute anyway (dummy_data/ and
    # checksums.tsv sit next to it), so builds work even with --no-deps installs.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    if config.source == "synthetic":  # static shapes when they are known
      image_shape = (*config.image_size, 3)
      depth_shape = tuple(config.depth_size)
      encoding = config.image_encoding  # rendered arrays, encoded by TFDS
    else:
      image_shape, depth_shape = (None, None, 3), (None, None)
      # Manual input is stored as the source's own JPEG or PNG bytes, so a
      # `pairs` folder may mix both: None declares "as given" (TFDS decodes
      # either; arrays, which our readers never hand over, would become PNG).
      encoding = None
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=image_shape, dtype=np.uint8, encoding_format=encoding),
            # Depth and confidence are zlib-compressed raw tensors (lossless).
            "depth": tfds.features.Tensor(
                shape=depth_shape, dtype=np.float32, encoding=tfds.features.Encoding.ZLIB),
            "confidence": tfds.features.Tensor(
                shape=depth_shape, dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
            "intrinsics": tfds.features.Tensor(shape=(3, 3), dtype=np.float32),
            "sequence": tfds.features.Text(),
            "frame": np.int32,
            # Provenance (1.1.0): the file relative to the manual folder
            # ("kitchen.r3d:rgbd/12.jpg", "kitchen/rgb/000012.jpg"; "" when
            # rendered), seconds (-1 when unknown), camera-to-world 4x4 in
            # Record3D's OpenGL camera axes (identity when unknown).
            "source": tfds.features.Text(),
            "timestamp": np.float64,  # float32 cannot hold TUM's 1305031102.175304
            "pose": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
            "camera": tfds.features.ClassLabel(names=frame_example.CAMERAS),
        }),
        supervised_keys=("image", "depth"),
        homepage="https://record3d.app",
        metadata=tfds.core.MetadataDict(),
    )

  # --- Validation before anything is written ------------------------------
  # Every check of the manual input runs in `_scan`, before TFDS may delete a
  # prepared build: in `__init__` under `tfds build --overwrite` (the CLI
  # deletes right after constructing the builder), else in
  # `download_and_prepare`. A rebuild that still fails later (files changed
  # during the build, disk full, Ctrl-C) puts the previous build back.

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    if self.builder_config.source == "synthetic":
      return
    cli = cli_guard.overwrite_download_config(self.name)
    if cli is not None and self.data_path.exists() and self.is_prepared():  # what the CLI tests
      manual_dir = self._manual_dir(*cli)
      logging.info("tfds build --overwrite: checking %s before the prepared %s is replaced",
                   manual_dir, self.data_path)
      self._scan(manual_dir)

  def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
    """Validates manual input first, so a bad input never deletes a prepared
    dataset (TFDS removes it before generating when asked to overwrite)."""
    download_config = download_config or tfds.download.DownloadConfig()
    mode = download_config.download_mode
    exists = self.data_path.exists()
    will_generate = (not exists or mode.overwrite_dataset) and (
        mode != tfds.download.GenerateMode.UPDATE_DATASET_INFO)
    if self.builder_config.source != "synthetic" and will_generate:
      if beam_build.uses_beam(download_config):
        beam_build.check_unordered_options(download_config)
      self._scan(self._manual_dir(download_dir, download_config))
    prepare = functools.partial(super().download_and_prepare, download_dir=download_dir,
                                download_config=download_config, **kwargs)
    if will_generate and exists:
      with _kept_until_success(self.data_path):
        return prepare()
    _warn_if_interrupted_rebuild(self.data_path)
    return prepare()

  def _manual_dir(self, download_dir, download_config) -> epath.Path:
    """The folder TFDS's DownloadManager would hand to _split_generators."""
    if download_config.manual_dir:
      return epath.Path(download_config.manual_dir)
    # No explicit folder: ask a DownloadManager (TFDS's default location,
    # or whatever a test harness patched in).
    dl_manager = self._make_download_manager(
        download_dir=download_dir, download_config=download_config)
    try:
      return epath.Path(dl_manager.manual_dir)
    except AssertionError:  # TFDS: absent or empty; our scan says which precisely.
      return epath.Path(download_dir or self.data_dir_root / "downloads") / "manual"

  def _scan(self, manual_dir: epath.Path) -> "_Scan":
    """The validated manual input: sequences, split plan, provenance.

    Raises validation.ManualInputError listing every problem. Cached per
    folder and fingerprint across builders: `tfds build --overwrite` makes a
    second builder after its deletion, and decoding every file twice would
    double the check.
    """
    config = self.builder_config
    problems = validation.check_manual_dir(manual_dir)
    if problems:
      raise validation.ManualInputError(manual_dir, problems, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    origin = provenance.record(manual_dir)
    key = (config.source, str(manual_dir), origin["fingerprint"]["digest"])
    if key in _SCANS:
      return dataclasses.replace(_SCANS[key], provenance=origin)
    started = time.time()
    reader = pairs_format if config.source == "pairs" else r3d_format
    sequences, problems = reader.scan(manual_dir)
    plan = splits.split_sequences({s.name: len(s.frames) for s in sequences})
    if not problems:  # a split check over half the sequences would mislead
      problems = depth_checks.split_problems(plan, {s.name: s.valid_pixels for s in sequences})
    if problems:
      raise validation.ManualInputError(manual_dir, problems, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    logging.info("record3d/%s: %s holds %d sequences, %d frames (checked in %.1f s)",
                 config.name, manual_dir, len(sequences),
                 sum(len(s.frames) for s in sequences), time.time() - started)
    _SCANS.clear()  # one entry: a build reads one folder
    _SCANS[key] = _Scan({s.name: s for s in sequences}, plan, origin)
    return _SCANS[key]

  # --- Generation ----------------------------------------------------------

  def _download_and_prepare(self, dl_manager, download_config):
    # Set before generation starts (never during it): does `_split_generators`
    # hand TFDS Beam transforms or Python generators?
    self._beam_plan = None
    self._use_beam = (beam_build.uses_beam(download_config)
                      and self.builder_config.source != "synthetic")
    if beam_build.uses_beam(download_config) and not self._use_beam:
      logging.info("record3d/%s renders in process: Beam options are used by the "
                   "pairs and r3d configs only", self.builder_config.name)
    if self._use_beam and beam_build.may_try_prism(download_config):
      logging.info("record3d/%s: runner=DirectRunner: Beam first tries its Prism runner "
                   "(downloaded from GitHub at run time) and falls back to the FnApiRunner when "
                   "that fails; runner=%s runs the local runner this project measured, with "
                   "no download", self.builder_config.name, beam_build.LOCAL_RUNNER)
    if self._use_beam and beam_build.unordered_writer(download_config):
      logging.info("record3d/%s: TFDS' unordered Beam writer (--nondeterministic_order): "
                   "%d files per split, examples in no fixed order (read with shuffle_files=False "
                   "they come in another order than from an in-process build, so a seeded "
                   "shuffle gives other batches)", self.builder_config.name,
                   download_config.num_shards)
    elif self._use_beam and beam_build.local_multi_processing(download_config):
      logging.warning(
          "record3d/%s: with TFDS' default Beam writer, the local runner's "
          "multi_processing mode lost train examples in 10 of 12 builds of 5,120 frames on this "
          "project's machine (none at 1,280); with --nondeterministic_order --num_shards=N it "
          "lost none in 12 (README, Big builds). This build is counted and stops with "
          "LostExamplesError if it loses any.", self.builder_config.name)
    self._local_workers = beam_build.local_workers(download_config) if self._use_beam else None
    self._planned_frames = None
    self._writer_counters = None
    result = super()._download_and_prepare(dl_manager, download_config)
    # Raised here, the build stays in TFDS' incomplete folder, which TFDS
    # removes: nothing that loads is left (and an earlier build is kept).
    check_written_counts(self.builder_config.name, self._planned_frames,
                         {name: split.num_examples for name, split in self.info.splits.items()},
                         self._use_beam, self._writer_counters)
    return result

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    if config.source == "synthetic":
      sequences = {
          p.name: _SyntheticSequence(p, config.image_size, config.depth_size)
          for p in synthetic.plan_sequences(config.num_frames, domain_name=config.synthetic_domain)
      }
      plan = splits.split_sequences({name: len(s.frames) for name, s in sequences.items()})
      self.info.metadata[provenance.KEY] = provenance.record(None)
    else:
      scan = self._scan(epath.Path(dl_manager.manual_dir))
      sequences, plan = scan.sequences, scan.plan
      self.info.metadata[provenance.KEY] = scan.provenance
    for split, parts in plan.items():
      logging.info("record3d/%s: split %s = %d sequences, %d frames", config.name, split,
                   len(parts), sum(len(positions) for _, positions in parts))
    self.info.metadata["stats"] = {}
    parts_of = {split: [(sequences[name], positions) for name, positions in parts]
                for split, parts in plan.items()}
    self._planned_frames = {split: sum(len(positions) for _, positions in parts)
                            for split, parts in plan.items()}
    if getattr(self, "_use_beam", False):
      # Workers must not touch the builder: statistics return as Beam metrics,
      # read in `_process_pipeline_result` once the pipeline has finished.
      self._beam_plan = {split: len(parts) for split, parts in plan.items()}
      workers = getattr(self, "_local_workers", None)
      problem = workers and beam_build.message_size_problem(
          self._planned_frames, scan.provenance["fingerprint"]["bytes"], workers)
      if problem:
        logging.warning("record3d/%s: this local Beam build may fail: %s", config.name, problem)
      return {split: beam_build.split_transform(split, config.source, dl_manager.manual_dir,
                                                parts)
              for split, parts in parts_of.items()}
    return {split: self._generate_examples(split, parts) for split, parts in parts_of.items()}

  def _generate_examples(self, split: str, parts):
    stats = split_stats.SplitStats()
    started = time.time()
    for sequence, positions in parts:
      for example in sequence.read_frames(positions):
        stats.add(example)
        if stats.frames % 100 == 0:
          logging.info("record3d/%s %s: %d frames (%.1f s)", self.builder_config.name,
                       split, stats.frames, time.time() - started)
        yield beam_build.example_key(example), example
    summary = stats.summary()
    self.info.metadata["stats"][split] = summary
    logging.info("record3d/%s %s done in %.1f s: %s", self.builder_config.name, split,
                 time.time() - started, summary)

  def _process_pipeline_result(self, pipeline_result):
    """After a Beam build (on the launcher): the split statistics from metrics,
    and TFDS' writer counters for check_written_counts."""
    self._writer_counters = beam_build.writer_counters(pipeline_result)
    for split, sequences in (getattr(self, "_beam_plan", None) or {}).items():
      self.info.metadata["stats"][split] = split_stats.from_metrics(
          pipeline_result, split, sequences)
      logging.info("record3d/%s %s (Beam): %s", self.builder_config.name, split,
                   self.info.metadata["stats"][split])


class LostExamplesError(RuntimeError):
  """A build wrote fewer (or more) examples than the checked folder holds."""


def check_written_counts(config: str, planned, written: dict, beam: bool,
                         writer: Optional[dict] = None) -> None:
  """Every planned frame was written, once: else LostExamplesError naming the splits.

  Measured on this project's machine: Beam's local runner (multi_processing,
  1 or 2 workers) with TFDS' default writer drops train examples of most
  5,120-frame builds (from 240, a whole shard, to 1,625 of 4,160), while its
  own metrics counted them all (README, Big builds). So every build is
  counted. `writer`: TFDS' Beam writer counters
  (beam_build.writer_counters), said in the error to show where they went.
  """
  if not planned:
    return
  wrong = {split: (count, written.get(split, 0)) for split, count in planned.items()
           if written.get(split, 0) != count}
  if wrong:
    details = "; ".join(f"{split}: {got} written of {count}" for split, (count, got)
                        in sorted(wrong.items()))
    where = ""
    if writer:
      total = sum(planned.values())
      lost_before = writer.get("serialized", 0) != total
      where = f" TFDS' Beam writer serialized {writer.get('serialized', 0)} examples of {total}"
      if "shards_planned" in writer:  # the default writer; the unordered one counts no shards
        where += (f" and wrote {writer.get('shards_written', 0)} of "
                  f"{writer['shards_planned']} shards")
      where += ": " + (
          "examples went missing before they were serialized." if lost_before else
          "every example was serialized and assigned a shard; they went missing between "
          "grouping into shards and writing." if "shards_planned" in writer else
          "every example was serialized; they went missing between serialization and the "
          "files.")
    raise LostExamplesError(
        f"record3d/{config}: the build did not write every checked frame ({details}).{where} "
        "Nothing was kept. " + (
            "The Beam runner lost examples between reading and writing. Locally, build with "
            "--nondeterministic_order --num_shards=N (TFDS' unordered writer, which lost none "
            "here), or in process (no --beam_pipeline_options); or on Dataflow. The local "
            "DirectRunner dropped examples of large builds with TFDS' default writer here "
            "(README, Big builds)."
            if beam else "Report this: the in-process build should never lose a frame."))


@dataclasses.dataclass(frozen=True)
class _Scan:
  sequences: dict  # name -> PairsSequence | R3dSequence
  plan: splits.SplitPlan
  provenance: dict


_SCANS: dict[tuple, _Scan] = {}


def _backup_path(data_path: epath.Path) -> epath.Path:
  # Hidden and not a version number: TFDS never lists it as a build.
  return data_path.parent / f".{data_path.name}.previous"


@contextlib.contextmanager
def _kept_until_success(data_path: epath.Path):
  """Moves a prepared build aside while it is rebuilt; puts it back on failure.

  TFDS deletes it before generating in its overwrite modes; the input was
  checked, but a rebuild can still fail half-way (a file changed meanwhile,
  disk full, Ctrl-C). On gs:// a folder rename copies every file, so there
  the check before generating is the only protection.
  """
  if "://" in str(data_path):
    yield
    return
  backup = _backup_path(data_path)
  if backup.exists():
    backup.rmtree()  # from an interrupted rebuild, older than data_path
  data_path.rename(backup)
  logging.info("Rebuilding %s: the previous build waits in %s until it succeeds",
               data_path, backup)
  try:
    yield
  except BaseException:
    if data_path.exists():
      data_path.rmtree()
    backup.rename(data_path)
    logging.warning("Rebuild failed: the previous build is back in %s", data_path)
    raise
  backup.rmtree()


def _warn_if_interrupted_rebuild(data_path: epath.Path) -> None:
  backup = _backup_path(data_path)
  if "://" not in str(data_path) and not data_path.exists() and backup.exists():
    logging.warning("%s holds the build before a rebuild that was interrupted; rename it "
                    "to %s to use it again (it is deleted by the next rebuild)", backup, data_path)


class _SyntheticSequence:
  """Adapts a synthetic.SequencePlan to the readers' `frames` / `read_frames`."""

  def __init__(self, plan: synthetic.SequencePlan, image_size, depth_size):
    self.plan, self.image_size, self.depth_size = plan, image_size, depth_size
    self.frames = range(plan.num_frames)

  def read_frames(self, positions):
    wanted = set(positions)
    for example in synthetic.render_sequence(
        self.plan.seed, self.plan.num_frames, self.image_size, self.depth_size,
        name=self.plan.name, domain_name=self.plan.domain):
      if example["frame"] in wanted:
        yield example
