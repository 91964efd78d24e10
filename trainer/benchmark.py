r"""Measures what the Performance section of the README claims, in ONE run.

  python -m trainer.benchmark --json=bench.json                  # synthetic data
  python -m trainer.benchmark --accuracy_budget_seconds=150      # + equal-time accuracy

Everything is a ratio of two figures measured back to back in this process, so
the numbers mean something on a shared, noisy machine; absolute times are
printed for context only. What is measured:

1. Input pipeline: `input_pipeline.train_dataset` (the real one: TFDS read,
   decode, resize, Sobel target of the gradient stage, augment, batch,
   prefetch) against a seed-style loader (PIL in a Python loop over PNG files
   in X/ and Y/, the notebook's layout, exported untimed from the SAME TFDS
   split), both producing the same tensors at the same size (the seed-style
   loader is let off lightly: nearest depth resize instead of valid-average,
   and no augmentation, as in the seed).
2. Train step: examples/s of each architecture at each size, on one real
   batch kept in memory (so no input pipeline cost is included), with the
   model, optimizer, loss and distributed step built by the functions
   `train.train_stage` uses (`build_model_and_optimizer`, `make_train_loop`);
   FLOPs per example from `models.count_flops` and the share of this machine's
   dense float32 matmul FLOP/s (measured here too).
3. Pipeline examples/s over train-step examples/s at the default Config
   (architecture, image size, batch): how far the input is from starving the
   model.
4. Step time against image pixels, several sizes per architecture.
5. Optionally (--accuracy_budget_seconds=N): each architecture trained for the
   same wall-clock budget with the real loop (`train.train_stage`,
   stage rough) and evaluated on the test split.
6. The phone's real sizes (--real_size_frames > 0): frames rendered by
   `tfds_record3d.synthetic` at 960x720 with 256x192 depth, written as a
   `pairs` folder of JPEGs (stored unchanged by the builder) and built with
   TFDS; for each --real_train_sizes (192x144, 256x192): the tf.data first
   pass (JPEG decoded at reduced scale, input_pipeline.image_input) on all
   cores and on one thread, its steady state, the seed-style PIL loader on the
   SAME train-split files, and the default architecture's training
   consumption at that size. The same frames stored as 320x240 PNG give the
   PNG first-pass ratio.

Every architecture of models.ARCHITECTURES is timed by default, the Keras
backbones (mobilenet_v3, resnet50) from random weights (encoder_weights none:
FLOPs and step time do not depend on the weights, and nothing is downloaded).

FLOP convention: `count_flops` counts one forward pass (1 MAC = 2 FLOPs,
convolutions only); a training step is counted as 3x forward (the backward
pass computes gradients for activations and for weights, each about one
forward's worth).
"""

import dataclasses
import json
import math
import os
import resource
import statistics
import tempfile
import time
from typing import Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer import datasets
from trainer import distribute
from trainer import evaluate
from trainer import input_pipeline
from trainer import models
from trainer import precision
from trainer import progress as progress_lib
from trainer import train
from trainer import workdir as workdir_lib
from trainer import config as config_lib
from trainer.config import Config

_DEFAULT = Config(model_dir="")
_DEFAULT_SIZE = ",".join(map(str, _DEFAULT.image_size))

FLAGS = flags.FLAGS
# trainer.config defines flags of the same names for trainer.main; share them
# when both are imported in one process (tests) instead of failing on duplicates.
if "dataset" not in FLAGS:
  flags.DEFINE_string("dataset", _DEFAULT.dataset,
                      "TFDS name (record3d/synthetic, record3d/pairs, ...); built first if "
                      "missing from --data_dir.")
if "data_dir" not in FLAGS:
  flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS' own).")
if "manual_dir" not in FLAGS:
  flags.DEFINE_string("manual_dir", None,
                      "Manual folder, if the dataset must be built from files.")
flags.DEFINE_multi_string("image_sizes", ["96,72", "192,144"],
                          "Main sizes H,W for the architecture comparison (FLOPs, FLOP/s, "
                          "share of matmul); repeat the flag for several. Any size works for "
                          "every architecture (the encoder-decoders pad to 32).")
flags.DEFINE_multi_string("scaling_sizes", ["64,48", _DEFAULT_SIZE],
                          "Extra sizes H,W for the step-time-against-pixels table (repeat the "
                          "flag); it uses these plus --image_sizes (at least 3 distinct sizes "
                          "in all).")
flags.DEFINE_list("architectures", list(models.ARCHITECTURES), "Architectures to time.")
flags.DEFINE_integer("steps", 5, "Timed train steps per (architecture, size); the median counts.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed train steps after tracing, per (architecture, size).")
flags.DEFINE_integer("batch_size", _DEFAULT.global_batch_size,
                     "Examples per step, for the train step and both input loaders.")
flags.DEFINE_string("pipeline_image_size", _DEFAULT_SIZE,
                    "H,W produced by both input loaders; with the default architecture and "
                    "--batch_size this is the 'default configuration' of the "
                    "pipeline/training ratio.")
flags.DEFINE_integer("pipeline_batches", 100,
                     "Batches timed from the tf.data pipeline after its first pass (steady "
                     "state: the decoded split is cached in memory).")
flags.DEFINE_integer("seed_loader_examples", 256,
                     "Training examples exported to X/ and Y/ PNG folders (untimed) and "
                     "loaded once, timed, by the seed-style PIL loader.")
flags.DEFINE_integer("matmul_size", 2048, "N of the N x N float32 matmul measuring peak FLOP/s.")
flags.DEFINE_integer("matmul_repeats", 10, "Timed matmuls per measurement (the median counts).")
flags.DEFINE_bool("jit_compile", False,
                  "Also time each train step compiled with XLA (jit_compile=True on the "
                  "per-replica step). The real loop does not use XLA: these rows are an "
                  "investigation, not what training runs.")
flags.DEFINE_integer("accuracy_budget_seconds", 0,
                     "If > 0: train each architecture (stage rough, same Config otherwise) for "
                     "about this many seconds with the real loop, then evaluate on the test "
                     "split. train_steps = budget x the steps/s measured here.")
flags.DEFINE_string("accuracy_image_size", "64,48", "H,W of the equal-budget accuracy runs.")
flags.DEFINE_list("accuracy_architectures", None,
                  "Architectures of the equal-budget accuracy runs (default: --architectures).")
flags.DEFINE_integer("real_size_frames", 600,
                     "Frames rendered for the real-size part (2 sequences; 80% of them are "
                     "the train split that is timed: 480 by default, a first pass of a few "
                     "seconds, so the iterator's start-up weighs little; ~1 s a frame to "
                     "render and build, once per --workdir); 0 skips that part.")
flags.DEFINE_string("real_image_size", "960,720",
                    "H,W of the real-size part's JPEG RGB (Record3D's portrait 960x720), "
                    "rendered at this size by tfds_record3d.synthetic.")
flags.DEFINE_string("real_depth_size", "256,192", "H,W of the real-size part's depth (LiDAR).")
flags.DEFINE_multi_string("real_train_sizes", ["192,144", "256,192"],
                          "Training sizes H,W of the real-size part (repeat the flag); the "
                          "first carries the targets.")
flags.DEFINE_string("png_image_size", "320,240",
                    "H,W of the same frames stored as PNG for the PNG first-pass ratio.")
flags.DEFINE_string("png_train_size", _DEFAULT_SIZE, "Training size H,W for the PNG ratio.")
flags.DEFINE_integer("first_pass_rounds", 5,
                     "Alternations of tf.data first pass / seed-style loader per comparison "
                     "(each ~1 s and +-20% alone); the medians count.")
flags.DEFINE_integer("breakdown_repeats", 5,
                     "Runs per cut of the real-size first-pass breakdown (one thread, the "
                     "pipeline cut after each stage; the fastest run counts); 0 skips it.")
flags.DEFINE_integer("real_steady_batches", 20,
                     "Steady-state batches timed per real-size point (after the first pass).")
flags.DEFINE_string("workdir", None,
                    "Scratch folder (PNG export, accuracy runs); default a new temp folder.")
flags.DEFINE_string("json", None, "Write every figure to this JSON file.")

STAGE_TIMED = "rough"  # the gradient stage has the same network; finetune nests two


# ----------------------------------------------------------------------------
# Small helpers: sizes, machine.
# ----------------------------------------------------------------------------
def size_name(size: Sequence[int]) -> str:
  """How a size is shown in tables and JSON keys: 96x72."""
  return f"{size[0]}x{size[1]}"


def machine_info() -> dict:
  cpu = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"nproc": os.cpu_count(), "cpu_model": cpu, "tensorflow": tf.__version__,
          "keras": keras.__version__,
          # oneDNN kernels are TF's default on x86 Linux unless this says "0".
          "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(default)"),
          "loadavg_start": list(os.getloadavg())}


# ----------------------------------------------------------------------------
# Dense matmul: this machine's practical float32 peak.
# ----------------------------------------------------------------------------
def measure_matmul(n: int, repeats: int) -> dict:
  a = tf.random.normal([n, n], seed=1)
  b = tf.random.normal([n, n], seed=2)

  @tf.function
  def matmul(a, b):
    # Reduce to a scalar so reading the result back costs nothing (n^2 adds
    # against 2 n^3 FLOPs).
    return tf.reduce_sum(tf.linalg.matmul(a, b))

  for _ in range(2):  # trace, then let oneDNN pick and cache its kernel
    matmul(a, b).numpy()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).numpy()
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"n": n, "seconds_median": seconds, "flops_per_s": 2 * n**3 / seconds}


# ----------------------------------------------------------------------------
# Input pipeline: the real tf.data one against a seed-style PIL loader.
# ----------------------------------------------------------------------------
def measure_tf_data(config: Config, builder, num_batches: int, threads: int = 0) -> dict:
  """The real training pipeline of the gradient stage (it adds the Sobel target).

  first pass: the first epoch's worth of batches from a fresh iterator; every
    example is read and decoded once (plus the shuffle buffer's fill).
  steady: the next `num_batches` (0: not measured), after a few untimed ones;
    the split is now cached in memory, as it is for the rest of training.
  threads > 0: the whole pipeline on a private pool of that many threads, one
    op at a time inside each (what that many cores deliver).
  """
  num_train = datasets.num_examples(builder, "train")
  batch = config.global_batch_size
  first_batches = max(1, num_train // batch)
  dataset = on_threads(input_pipeline.train_dataset(config, "gradient", builder), threads)
  iterator = iter(dataset)
  progress = progress_lib.Progress("tf.data first pass", first_batches, unit="batches")
  start, cpu_start = time.perf_counter(), process_cpu_seconds()
  for i in range(first_batches):
    next(iterator)
    progress.update(i + 1)
  first_seconds = time.perf_counter() - start
  first_cpu = process_cpu_seconds() - cpu_start
  first = {"first_pass_examples_per_s": first_batches * batch / first_seconds,
           "first_pass_examples": first_batches * batch,
           # CPU of the whole process (every thread, spinning ones included).
           "first_pass_cpu_ms_per_example": 1000.0 * first_cpu / (first_batches * batch),
           "first_pass_cores_busy": first_cpu / first_seconds}
  if not num_batches:
    return first
  for _ in range(3):
    next(iterator)
  progress = progress_lib.Progress("tf.data steady state", num_batches, unit="batches")
  start = time.perf_counter()
  for i in range(num_batches):
    element = next(iterator)
    progress.update(i + 1)
  # Batches come from the prefetch buffer as tensors; touch the last one so any
  # lazily finished work is inside the timing.
  element["depth"].numpy()
  steady_seconds = time.perf_counter() - start
  return {**first, "steady_examples_per_s": num_batches * batch / steady_seconds,
          "steady_examples": num_batches * batch}


def first_pass_rounds(config: Config, builder, files, rounds: int, steady_batches: int,
                      one_thread: bool = True) -> dict:
  """`rounds` alternations of: the tf.data first pass on all cores, the same
  on one thread (one_thread), and the seed-style PIL loader over `files`
  (each a fresh iterator, so every round decodes every example). A single
  first pass lasts about a second here, and runs of it swing by +-20%: the
  figures are the rounds' medians, the ratio the median of the rounds' own
  ratios (each round's pair ran back to back). The steady state is measured
  once, after the last round's all-core first pass. With augmentation on,
  each round also times the first pass with --augment_on=device (the host
  decodes, resizes the depth (and the image, unless the step can:
  input_pipeline.device_decode_shape) and draws the augmentation; the train
  step applies it and makes the mask and the target)."""
  all_cores, single, pil, on_device = [], [], [], []
  # The host's share when the augmentation runs in the train step (what
  # --augment_on=auto does with a GPU or TPU): decode, depth resize, draws; the
  # step resizes the image (where device_decode_shape allows), makes the mask
  # and the Sobel target. The other runs augment on the host, whatever this
  # machine has.
  device_config = dataclasses.replace(config, augment_on="device")
  config = dataclasses.replace(config, augment_on="host")
  for index in range(rounds):
    last = index == rounds - 1
    all_cores.append(measure_tf_data(config, builder, steady_batches if last else 0))
    if config.augment:
      on_device.append(measure_tf_data(device_config, builder, 0))
    if one_thread:
      single.append(measure_tf_data(config, builder, 0, threads=1))
    pil.append(measure_seed_loader(files, tuple(config.image_size), config.global_batch_size,
                                   config))
  median = lambda rows, key: statistics.median(row[key] for row in rows)
  rates = [a["first_pass_examples_per_s"] for a in all_cores]
  pil_rates = [p["examples_per_s"] for p in pil]
  out = {"rounds": rounds,
         "tfdata_first_pass_examples_per_s": statistics.median(rates),
         "tfdata_first_pass_examples_per_s_rounds": rates,
         "tfdata_first_pass_examples": all_cores[0]["first_pass_examples"],
         "tfdata_first_pass_cpu_ms_per_example": median(all_cores, "first_pass_cpu_ms_per_example"),
         "tfdata_first_pass_cores_busy": median(all_cores, "first_pass_cores_busy"),
         "tfdata_steady_examples_per_s": all_cores[-1]["steady_examples_per_s"],
         "tfdata_steady_examples": all_cores[-1]["steady_examples"],
         "seed_loader_examples_per_s": statistics.median(pil_rates),
         "seed_loader_examples_per_s_rounds": pil_rates,
         "seed_loader_examples": pil[0]["examples"],
         "ratio_first_pass": statistics.median(a / p for a, p in zip(rates, pil_rates))}
  out["ratio_steady"] = out["tfdata_steady_examples_per_s"] / out["seed_loader_examples_per_s"]
  if on_device:
    device_rates = [a["first_pass_examples_per_s"] for a in on_device]
    out.update(tfdata_first_pass_augment_on_device_examples_per_s=statistics.median(device_rates),
               tfdata_first_pass_augment_on_device_examples_per_s_rounds=device_rates,
               ratio_first_pass_augment_on_device=statistics.median(
                   a / p for a, p in zip(device_rates, pil_rates)))
  if one_thread:
    out["tfdata_first_pass_one_thread_examples_per_s"] = median(single,
                                                                "first_pass_examples_per_s")
  return out


def on_threads(dataset: tf.data.Dataset, threads: int) -> tf.data.Dataset:
  """threads > 0: the whole pipeline on a private pool of that many threads,
  one op at a time inside each (what that many cores deliver)."""
  if not threads:
    return dataset
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  return dataset.with_options(options)


def process_cpu_seconds() -> float:
  """User + system CPU of this process, all threads."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def first_pass_breakdown(config: Config, builder, repeats: int) -> list:
  """Where the first pass goes, on ONE thread: the training pipeline's own
  functions, cut after each stage (each cut includes the ones before it), the
  train split read once per cut from a fresh iterator (built before the
  clock starts; its first element's start-up is timed), the cuts taken in
  turn `repeats` times, the fastest run of each kept. Returns [{"stage",
  "ms_per_example" (cumulative), "stage_ms_per_example"}]."""
  batch = config.global_batch_size
  num_train = datasets.num_examples(builder, "train")
  features = input_pipeline.used_features(config.min_confidence)
  seed = tf.constant([0, 1], tf.int64)  # augmentation draws: same cost for any seed

  def read():
    return input_pipeline.read_split(builder, "train", shuffle_files=False, features=features)

  def decoded():
    return read().map(lambda ex: input_pipeline.decode_image(
        ex["image"], config.image_size, reduced=config.jpeg_reduced_decode))

  def resized_image():
    return read().map(lambda ex: input_pipeline.image_input(
        ex["image"], config.image_size, reduced=config.jpeg_reduced_decode))

  def resized():
    return read().map(lambda ex: input_pipeline.resize_example(ex, config,
                                                               config.min_confidence))

  def augmented():
    return resized().cache().map(
        lambda r: input_pipeline.augmented_example(r, config.augment, seed))

  cuts = [  # (stage, dataset, examples per element)
      ("TFDS read + parse (image bytes, depth, confidence)", read, 1),
      ("+ image decode (decode_image)", decoded, 1),
      ("+ resize to the training size, [0, 1] (image_input)", resized_image, 1),
      ("+ depth valid-average resize (= resize_example)", resized, 1),
      ("+ memory cache, augmentation, mask", augmented, 1),
      ("+ batch, Sobel target per batch",
       lambda: augmented().batch(batch).map(lambda b: input_pipeline.with_target(b, "gradient")),
       batch),
      ("train_dataset (+ shuffle buffer, seeds, prefetch): its first epoch",
       lambda: input_pipeline.train_dataset(config, "gradient", builder).take(num_train // batch),
       batch),
  ]
  times = {stage: [] for stage, _, _ in cuts}
  progress = progress_lib.Progress("first-pass breakdown", len(cuts) * repeats, unit="runs")
  for _ in range(repeats):  # every cut once per repeat: a slow moment hits them all
    for stage, make, per_element in cuts:
      iterator = iter(on_threads(make(), 1))  # built (and traced) before the clock
      start, elements = time.perf_counter(), 0
      for _ in iterator:
        elements += 1
      times[stage].append((time.perf_counter() - start) / (elements * per_element))
      progress.update(add=1)
  out, previous = [], 0.0
  for stage, _, _ in cuts:
    ms = 1000.0 * min(times[stage])
    out.append({"stage": stage, "ms_per_example": ms, "stage_ms_per_example": ms - previous})
    previous = ms
  return out


def export_seed_folders(builder, folder: str, count: int) -> int:
  """Untimed: the first `count` training examples as the notebook kept them,
  RGB PNGs in X/ and 16-bit depth PNGs (millimeters) in Y/, same file names."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for sub in ("X", "Y"):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
  written = 0
  for example in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False).take(count)):
    name = f"{written:05d}.png"
    Image.fromarray(example["image"]).save(os.path.join(folder, "X", name))
    depth = example["depth"].astype(np.float64)
    depth = np.where(np.isfinite(depth), depth, 0.0)
    millimeters = np.clip(np.round(depth * 1000.0), 0, 65535).astype(np.uint16)
    Image.fromarray(millimeters).save(os.path.join(folder, "Y", name))
    written += 1
  return written


def _numpy_sobel_magnitude(depth: np.ndarray, mask: np.ndarray):
  """Sobel magnitude / 8 with the same masking rule as depth_ops.sobel_magnitude."""
  d = np.pad(depth * mask, 1)
  gx = (d[:-2, 2:] + 2 * d[1:-1, 2:] + d[2:, 2:]) - (d[:-2, :-2] + 2 * d[1:-1, :-2] + d[2:, :-2])
  gy = (d[2:, :-2] + 2 * d[2:, 1:-1] + d[2:, 2:]) - (d[:-2, :-2] + 2 * d[:-2, 1:-1] + d[:-2, 2:])
  m = np.pad(mask, 1)
  neighbours = sum(m[i:i + mask.shape[0], j:j + mask.shape[1]] for i in range(3) for j in range(3))
  target_mask = (neighbours > 8.5).astype(np.float32)
  return np.sqrt(gx * gx + gy * gy) / 8.0 * target_mask, target_mask


def seed_folder_files(folder: str):
  """(RGB, depth) file pairs of an X/ Y/ folder, matched by sorted name as the
  notebook did; depth PNGs in millimeters."""
  xs = sorted(os.listdir(os.path.join(folder, "X")))
  ys = sorted(os.listdir(os.path.join(folder, "Y")))
  return [(os.path.join(folder, "X", x), os.path.join(folder, "Y", y)) for x, y in zip(xs, ys)]


def seed_style_batches(files, size: Tuple[int, int], batch: int, config: Config, seed: int = 0,
                       units_per_meter: float = 1000.0):
  """The notebook's way: for (RGB, 16-bit depth PNG) file pairs, decode each
  with PIL in a Python loop, resize, stack into numpy batches. Produces the
  same tensors as the tf.data pipeline (image, depth, mask, Sobel target and
  its mask) minus augmentation, which the seed did not have."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  order = np.random.default_rng(seed).permutation(len(files))  # model.fit shuffled
  height, width = size
  for start in range(0, len(order) - batch + 1, batch):
    out = {k: [] for k in ("image", "depth", "mask", "target", "target_mask")}
    for i in order[start:start + batch]:
      rgb_path, depth_path = files[i]
      with Image.open(rgb_path) as rgb:
        image = rgb.convert("RGB").resize((width, height), Image.BILINEAR)
      image = np.asarray(image, np.float32) / 255.0
      with Image.open(depth_path) as png:
        depth = png.convert("I").resize((width, height), Image.NEAREST)
      depth = np.asarray(depth, np.float32) / units_per_meter
      mask = ((depth > config.min_depth) & (depth < config.max_depth)).astype(np.float32)
      depth *= mask
      target, target_mask = _numpy_sobel_magnitude(depth, mask)
      for key, value in (("image", image), ("depth", depth[..., None]), ("mask", mask[..., None]),
                         ("target", target[..., None]), ("target_mask", target_mask[..., None])):
        out[key].append(value)
    yield {k: np.stack(v) for k, v in out.items()}


def measure_seed_loader(files, size, batch: int, config: Config,
                        units_per_meter: float = 1000.0) -> dict:
  total = len(files) // batch
  progress = progress_lib.Progress("seed-style PIL loader", total, unit="batches")
  start = time.perf_counter()
  examples = 0
  for i, element in enumerate(seed_style_batches(files, size, batch, config,
                                                 units_per_meter=units_per_meter)):
    examples += element["image"].shape[0]
    progress.update(i + 1)
  seconds = time.perf_counter() - start
  return {"examples_per_s": examples / seconds, "examples": examples}


# ----------------------------------------------------------------------------
# The phone's real sizes: 960x720 JPEG + 256x192 depth, as a `pairs` folder.
# ----------------------------------------------------------------------------
def build_real_size_datasets(workdir: str, frames: int, image_size, depth_size, png_size):
  """Untimed: renders `frames` frames (2 sequences) with our synthetic code AT
  `image_size` (no upscaling: the JPEGs carry real-size detail and noise),
  writes them as two `pairs` manual folders, JPEG RGB at `image_size` (our
  writer's quality 95, stored unchanged by the builder) and the same frames
  downsized (PIL bilinear) to `png_size` as PNG, both with 16-bit mm depth
  PNGs at `depth_size`, and builds both with TFDS. Reused when already built
  under `workdir`. Returns {"jpeg"|"png": (builder, manual_dir)}."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tfds_record3d import synthetic  # pylint: disable=g-import-not-at-top
  from tfds_record3d import writers  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, f"real_{size_name(image_size)}_{frames}")
  kinds = {"jpeg": (image_size, ".jpg"), "png": (png_size, ".png")}
  out = {}
  for kind, (size, _) in kinds.items():
    data_dir = os.path.join(root, f"tfds_{kind}")
    builder = tfds.builder("record3d/pairs", data_dir=data_dir)
    out[kind] = (builder, os.path.join(root, f"manual_{kind}"))
  if all(b.is_prepared() for b, _ in out.values()):
    return out
  per_sequence = [frames // 2, frames - frames // 2]
  progress = progress_lib.Progress(f"rendering {size_name(image_size)} frames", frames,
                                   unit="frames")
  for index, count in enumerate(per_sequence):
    examples = []
    for example in synthetic.render_sequence(seed=500 + index, num_frames=count,
                                             image_size=tuple(image_size),
                                             depth_size=tuple(depth_size)):
      examples.append(example)
      progress.update(add=1)
    writers.write_pairs_sequence(os.path.join(root, "manual_jpeg", f"seq_{index}"), examples)
    small = [dict(e, image=np.asarray(Image.fromarray(e["image"]).resize(
        (png_size[1], png_size[0]), Image.BILINEAR))) for e in examples]
    writers.write_pairs_sequence(os.path.join(root, "manual_png", f"seq_{index}"), small,
                                 image_suffix=".png")
  for kind, (builder, manual_dir) in out.items():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return out


def split_files(builder, manual_dir: str, split: str = "train"):
  """The (RGB, depth) files of a `pairs` split, from its `source` feature
  (seq/rgb/000012.jpg -> seq/depth/000012.png): the seed-style loader reads
  exactly the files the tf.data pipeline reads."""
  ds = input_pipeline.read_split(builder, split, shuffle_files=False, features=("source",))
  files = []
  for source in ds.map(lambda ex: ex["source"]).as_numpy_iterator():
    rgb = os.path.join(manual_dir, source.decode())
    sequence, _, name = source.decode().rsplit("/", 2)
    stem = os.path.splitext(name)[0]
    files.append((rgb, os.path.join(manual_dir, sequence, "depth", stem + ".png")))
  return files


def real_size_point(base: Config, builder, manual_dir: str, size, kind: str,
                    steady_batches: int, rounds: int = 1, repeats: int = 0) -> dict:
  """One (stored format, training size): first_pass_rounds (tf.data on all
  cores and one thread, with its CPU per example, against the seed-style loader
  on the same train files), the steady state, and (repeats > 0)
  first_pass_breakdown."""
  config = dataclasses.replace(base, image_size=tuple(size))
  files = split_files(builder, manual_dir)
  compared = first_pass_rounds(config, builder, files, rounds, steady_batches)
  breakdown = first_pass_breakdown(config, builder, repeats) if repeats else []
  nproc = os.cpu_count() or 1
  return {"stored": kind, "image_size": list(size), "batch_size": base.global_batch_size,
          "train_files": len(files), **compared, "first_pass_breakdown": breakdown,
          "tfdata_first_pass_examples_per_s_per_core":
              compared["tfdata_first_pass_examples_per_s"] / nproc,
          "seed_loader_ms_per_example": 1000.0 / compared["seed_loader_examples_per_s"],
          # The CPU one example may cost for 3x the PIL loop with every core busy.
          "cpu_ms_per_example_for_3x":
              1000.0 * nproc / (3 * compared["seed_loader_examples_per_s"])}


# ----------------------------------------------------------------------------
# Train step: the real model, optimizer, loss and distributed step.
# ----------------------------------------------------------------------------
def one_real_batch(config: Config, builder) -> dict:
  """One training batch from the real pipeline (a small shuffle buffer: cheap)."""
  small = dataclasses.replace(config, shuffle_buffer=config.global_batch_size)
  return next(iter(input_pipeline.train_dataset(small, STAGE_TIMED, builder)))


def measure_train_step(config: Config, builder, strategy, policy: str, steps: int,
                       warmup_steps: int, jit_compile: bool = False) -> dict:
  """Median seconds of one train step on a batch held in memory."""
  batch = one_real_batch(config, builder)
  # The real loop's own pieces: same model, optimizer, loss and distributed step.
  model, optimizer, encoder_optimizer = train.build_model_and_optimizer(
      config, STAGE_TIMED, strategy, policy)
  train_loop = train.make_train_loop(strategy, model, optimizer,
                                     train.stage_loss(config, STAGE_TIMED),
                                     config.global_batch_size, STAGE_TIMED,
                                     jit_compile=jit_compile,
                                     encoder_optimizer=encoder_optimizer)
  # The batch is repeated from memory, so the timing holds the step alone.
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: tf.data.Dataset.from_tensors(batch).repeat())
  iterator = iter(dataset)
  label = f"train step {config.architecture} {size_name(config.image_size)}" + (
      " xla" if jit_compile else "")
  start = time.perf_counter()
  float(train_loop(iterator, tf.constant(1)))  # tracing (and XLA compile)
  trace_seconds = time.perf_counter() - start
  for _ in range(warmup_steps):
    float(train_loop(iterator, tf.constant(1)))
  progress = progress_lib.Progress(label, steps)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    loss = float(train_loop(iterator, tf.constant(1)))  # float(): waits for the step
    times.append(time.perf_counter() - start)
    progress.update(i + 1)
  if not math.isfinite(loss):
    logging.warning("%s: loss is %s (timing still valid, the numbers are not)", label, loss)
  seconds = statistics.median(times)
  forward = models.count_flops(model, config.image_size)
  return {"architecture": config.architecture, "image_size": list(config.image_size),
          "pixels": config.image_size[0] * config.image_size[1],
          "batch_size": config.global_batch_size, "jit_compile": jit_compile,
          "trace_seconds": trace_seconds, "step_seconds_median": seconds,
          "step_seconds": times, "examples_per_s": config.global_batch_size / seconds,
          "forward_flops_per_example": forward, "train_flops_per_example": 3 * forward}


# ----------------------------------------------------------------------------
# Equal wall-clock budget accuracy, through the real loop.
# ----------------------------------------------------------------------------
def accuracy_run(base: Config, architecture: str, steps_per_s: float, budget: float,
                 workdir: str) -> dict:
  """train_steps = budget x measured steps/s; the real loop (workdir.setup_run,
  train.train_stage) trains, then evaluate.evaluate_stage scores the test split."""
  steps = max(1, int(round(budget * steps_per_s)))
  config = dataclasses.replace(
      base, model_dir=os.path.join(workdir, f"accuracy_{architecture}"),
      architecture=architecture, stage="rough", train_steps=steps, mode="train",
      log_every_steps=max(1, min(50, steps // 10)), checkpoint_every_steps=steps,
      eval_split="test", num_eval_examples=0)
  logging.info("accuracy %s: %d steps (%.3f steps/s measured x %.0f s budget)",
               architecture, steps, steps_per_s, budget)
  run = workdir_lib.setup_run(config)
  start = time.perf_counter()
  # mode=train: train_stage trains (model build, tracing, input pipeline, steps,
  # final checkpoint) and skips its own evaluation, which is not training time.
  stage = train.train_stage(run, "rough")
  train_seconds = time.perf_counter() - start
  metrics = evaluate.evaluate_stage(run, "rough", stage.model, stage.step,
                                 tf.summary.create_noop_writer())
  metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
  return {"architecture": architecture, "train_steps": steps, "steps_per_s_measured": steps_per_s,
          "train_wall_seconds": train_seconds, "test_metrics": metrics}


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------
def _table(headers, rows) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _g(value: float, digits: int = 3) -> str:
  return f"{value:.{digits}g}"


def _device_rows(p: dict) -> list:
  if "ratio_first_pass_augment_on_device" not in p:
    return []
  return [["tf.data first pass, augmentation in the train step (--augment_on=device)",
           _g(p["tfdata_first_pass_augment_on_device_examples_per_s"]),
           f"{p['ratio_first_pass_augment_on_device']:.2f}x"]]


def format_report(result: dict) -> str:
  m, p, d = result["machine"], result["input_pipeline"], result["pipeline_over_training"]
  out = [f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, TensorFlow {m['tensorflow']}, "
         f"load average at start {m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}.",
         f"Dense float32 matmul ({result['matmul']['n']}^2): "
         f"{result['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s (best of the measurements "
         f"before and after the train steps: "
         f"{', '.join(_g(v / 1e9) for v in result['matmul']['measurements'])}).", ""]
  out.append(f"Input pipeline, {p['image_size'][0]}x{p['image_size'][1]}, batch "
             f"{p['batch_size']}, gradient stage (examples/s; first pass and PIL: medians of "
             f"{p['rounds']} alternating rounds, ratio: the median of the rounds' ratios):")
  out.append(_table(
      ["loader", "examples/s", "vs seed-style loader"],
      [["seed-style PIL loop over X/ Y/ PNGs", _g(p["seed_loader_examples_per_s"]), "1"],
       ["tf.data first pass (decode every example)", _g(p["tfdata_first_pass_examples_per_s"]),
        f"{p['ratio_first_pass']:.2f}x"],
       ["tf.data steady state (decoded split cached)", _g(p["tfdata_steady_examples_per_s"]),
        f"{p['ratio_steady']:.2f}x"]] + _device_rows(p)))
  out.append("")
  out.append(f"Train step (batch {result['config']['batch_size']}, stage {STAGE_TIMED}, "
             "training FLOPs = 3 x forward):")
  rows = []
  for r in result["train_step"]:
    rows.append([r["architecture"] + (" (XLA)" if r["jit_compile"] else ""),
                 size_name(r["image_size"]), r["pixels"], f"{1000 * r['step_seconds_median']:.0f}",
                 _g(r["examples_per_s"]), _g(r["forward_flops_per_example"] / 1e9),
                 _g(r["achieved_flops_per_s"] / 1e9), f"{100 * r['fraction_of_matmul']:.1f}%",
                 f"{r['step_time_vs_smallest']:.2f}", f"{r['pixels_vs_smallest']:.2f}"])
  out.append(_table(["arch", "HxW", "pixels", "ms/step", "examples/s", "fwd GFLOP/ex",
                     "GFLOP/s", "of matmul", "step time x", "pixels x"], rows))
  out.append("")
  out.append("FLOPs per example, seed / unet: " + ", ".join(
      f"{k} {v:.1f}x" for k, v in result["flops_ratio_seed_over_unet"].items()))
  out.append(f"Default configuration ({d['architecture']}, {size_name(d['image_size'])}, batch "
             f"{d['batch_size']}): pipeline {_g(d['pipeline_examples_per_s'])} examples/s / "
             f"training {_g(d['train_examples_per_s'])} examples/s = {d['ratio']:.1f}x")
  if result.get("accuracy"):
    out.append("")
    out.append(f"Equal wall-clock budget ({result['accuracy']['budget_seconds']} s, stage rough, "
               f"{size_name(result['accuracy']['image_size'])}), test split:")
    rows = []
    for r in result["accuracy"]["runs"]:
      t = r["test_metrics"]
      rows.append([r["architecture"], r["train_steps"], f"{r['train_wall_seconds']:.0f}",
                   _g(t.get("abs_rel", float("nan"))), _g(t.get("delta1", float("nan"))),
                   _g(t.get("rmse", float("nan")))])
    out.append(_table(["arch", "steps", "train wall s", "abs_rel", "delta1", "rmse m"], rows))
  if result.get("real_size"):
    r = result["real_size"]
    out.append("")
    out.append(f"Real size: {r['frames']} frames rendered at {size_name(r['image_size'])} "
               f"(JPEG q95, stored unchanged) with {size_name(r['depth_size'])} depth, and "
               f"the same frames as {size_name(r['png_image_size'])} PNG; gradient stage, "
               f"batch {result['config']['batch_size']}, train split "
               f"({r['points'][0]['train_files'] if r['points'] else r['png']['train_files']} "
               f"files), examples/s (first passes and PIL: medians of {r['png']['rounds']} "
               "alternating rounds; vs PIL: the median of the rounds' ratios):")
    points = r["points"] + [r["png"]]
    names = [f"{size_name(r['image_size'] if q['stored'] == 'jpeg' else r['png_image_size'])} "
             f"{q['stored'].upper()} -> {size_name(q['image_size'])}" for q in points]
    rows = []
    for name, q in zip(names, points):
      rows.append([name,
                   _g(q["seed_loader_examples_per_s"]), _g(q["tfdata_first_pass_examples_per_s"]),
                   f"{q['ratio_first_pass']:.2f}x",
                   _g(q["tfdata_first_pass_examples_per_s_per_core"]),
                   _g(q["tfdata_first_pass_one_thread_examples_per_s"]),
                   _g(q["tfdata_steady_examples_per_s"]),
                   (f"{_g(q['train_examples_per_s'])} ({q['train_architecture']})"
                    if "train_examples_per_s" in q else "-"),
                   f"{q['first_pass_over_training']:.1f}x" if "train_examples_per_s" in q else "-",
                   (f"{_g(q['tfdata_first_pass_augment_on_device_examples_per_s'])} "
                    f"({q['ratio_first_pass_augment_on_device']:.2f}x)"
                    if "ratio_first_pass_augment_on_device" in q else "-")])
    out.append(_table(["input -> training size", "seed-style PIL", "tf.data first pass",
                       "first pass vs PIL", "first pass per core (/nproc)",
                       "first pass, 1 thread", "tf.data steady", "training consumes",
                       "first pass vs training",
                       "first pass, augment on device (vs PIL)"], rows))
    out.append("")
    out.append("CPU per example in the first pass (this process, every thread) against what "
               "3x the PIL loop allows with every core busy:")
    out.append(_table(["input -> training size", "PIL loop ms/example (1 core)",
                       "tf.data CPU ms/example", "cores busy", "CPU ms/example for 3x"],
                      [[name, f"{q['seed_loader_ms_per_example']:.2f}",
                        f"{q['tfdata_first_pass_cpu_ms_per_example']:.2f}",
                        f"{q['tfdata_first_pass_cores_busy']:.2f}",
                        f"{q['cpu_ms_per_example_for_3x']:.2f}"]
                       for name, q in zip(names, points)]))
    if all(q["first_pass_breakdown"] for q in points):
      out.append("")
      out.append("Where the first pass goes, ONE thread, ms per example: the pipeline cut "
                 "after each stage (cumulative), and (in brackets) what the stage adds:")
      stages = [row["stage"] for row in points[0]["first_pass_breakdown"]]
      rows = [[stage] + [f"{q['first_pass_breakdown'][i]['ms_per_example']:.2f} "
                         f"({q['first_pass_breakdown'][i]['stage_ms_per_example']:+.2f})"
                         for q in points] for i, stage in enumerate(stages)]
      out.append(_table(["pipeline up to"] + names, rows))
  out.append("")
  out.append("Targets:")
  out.append(_table(["target", "measured", "met"],
                    [[t["name"], t["measured"], "yes" if t["met"] else "NO"]
                     for t in result["targets"]]))
  return "\n".join(out)


def targets(result: dict) -> list:
  p, d = result["input_pipeline"], result["pipeline_over_training"]
  out = [
      {"name": "tf.data >= 3x seed-style loader, first pass (every example decoded)",
       "measured": f"{p['ratio_first_pass']:.2f}x", "met": p["ratio_first_pass"] >= 3},
      {"name": "tf.data >= 3x seed-style loader, steady state (what training sees after "
               "the first epoch)",
       "measured": f"{p['ratio_steady']:.2f}x", "met": p["ratio_steady"] >= 3},
      {"name": "pipeline >= 5x training consumption (default configuration)",
       "measured": f"{d['ratio']:.1f}x", "met": d["ratio"] >= 5}]
  main_sizes = [tuple(s) for s in result["config"]["image_sizes"]]
  for r in result["train_step"]:
    if r["architecture"] == "seed" and not r["jit_compile"] and tuple(r["image_size"]) in main_sizes:
      out.append({"name": f"seed body >= 60% of matmul FLOP/s ({size_name(r['image_size'])})",
                  "measured": f"{100 * r['fraction_of_matmul']:.1f}%",
                  "met": r["fraction_of_matmul"] >= 0.6})
  for size, ratio in result["flops_ratio_seed_over_unet"].items():
    if tuple(int(v) for v in size.split("x")) in main_sizes:
      out.append({"name": f"unet >= 10x fewer FLOPs/example than seed ({size})",
                  "measured": f"{ratio:.1f}x", "met": ratio >= 10})
  if result.get("real_size"):
    r = result["real_size"]
    if r["points"]:
      q = r["points"][0]
      name = f"{size_name(r['image_size'])} JPEG -> {size_name(q['image_size'])}"
      out.append({"name": f"{name}: tf.data first pass >= 3x seed-style PIL loader",
                  "measured": f"{q['ratio_first_pass']:.2f}x", "met": q["ratio_first_pass"] >= 3})
      out.extend(_device_target(q, name))
      out.append({"name": f"{name}: tf.data first pass >= 5x {q['train_architecture']} "
                          "training consumption",
                  "measured": f"{q['first_pass_over_training']:.1f}x",
                  "met": q["first_pass_over_training"] >= 5})
    q = r["png"]
    out.append({"name": f"{size_name(r['png_image_size'])} PNG -> {size_name(q['image_size'])}: "
                        "tf.data first pass >= 3x seed-style PIL loader",
                "measured": f"{q['ratio_first_pass']:.2f}x", "met": q["ratio_first_pass"] >= 3})
    out.extend(_device_target(q, f"{size_name(r['png_image_size'])} PNG -> "
                                 f"{size_name(q['image_size'])}"))
  if result.get("accuracy"):
    runs = {r["architecture"]: r["test_metrics"] for r in result["accuracy"]["runs"]}
    if "seed" in runs and "unet" in runs:
      s, u = runs["seed"], runs["unet"]
      out.append({"name": "unet abs_rel <= seed's after the same wall-clock budget",
                  "measured": f"{u['abs_rel']:.3g} vs {s['abs_rel']:.3g}",
                  "met": u["abs_rel"] <= s["abs_rel"]})
      out.append({"name": "unet delta1 >= seed's after the same wall-clock budget",
                  "measured": f"{u['delta1']:.3g} vs {s['delta1']:.3g}",
                  "met": u["delta1"] >= s["delta1"]})
  return out


def _device_target(q: dict, name: str) -> list:
  """The 3x first-pass target again, with the augmentation in the train step."""
  if "ratio_first_pass_augment_on_device" not in q:
    return []
  ratio = q["ratio_first_pass_augment_on_device"]
  return [{"name": f"{name}: the same, augmentation in the train step (--augment_on=device)",
           "measured": f"{ratio:.2f}x", "met": ratio >= 3}]


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------
def run_benchmark() -> dict:
  image_sizes = [config_lib.parse_image_size(s, "--image_sizes") for s in FLAGS.image_sizes]
  pipeline_size = config_lib.parse_image_size(FLAGS.pipeline_image_size,
                                               "--pipeline_image_size")
  scaling = sorted(set(image_sizes) | {config_lib.parse_image_size(s, "--scaling_sizes")
                                       for s in FLAGS.scaling_sizes},
                   key=lambda s: (s[0] * s[1], s))
  if len(scaling) < 3:
    raise app.UsageError("step time against pixels needs at least 3 distinct sizes in "
                         "--image_sizes + --scaling_sizes")
  accuracy_architectures = FLAGS.accuracy_architectures or FLAGS.architectures
  for flag, names in (("--architectures", FLAGS.architectures),
                      ("--accuracy_architectures", accuracy_architectures)):
    for arch in names:
      if arch not in models.ARCHITECTURES:
        raise app.UsageError(f"{flag}: unknown {arch!r}; valid {models.ARCHITECTURES}")
  if min(FLAGS.steps, FLAGS.batch_size, FLAGS.pipeline_batches, FLAGS.matmul_repeats,
         FLAGS.first_pass_rounds) < 1:
    raise app.UsageError("--steps, --batch_size, --pipeline_batches, --matmul_repeats and "
                         "--first_pass_rounds must be >= 1")
  if FLAGS.breakdown_repeats < 0:
    raise app.UsageError("--breakdown_repeats must be >= 0 (0 skips the breakdown)")
  if FLAGS.seed_loader_examples < FLAGS.batch_size:
    raise app.UsageError("--seed_loader_examples must be at least --batch_size")
  real_image = config_lib.parse_image_size(FLAGS.real_image_size, "--real_image_size")
  real_depth = config_lib.parse_image_size(FLAGS.real_depth_size, "--real_depth_size")
  real_train = [config_lib.parse_image_size(s, "--real_train_sizes")
                for s in FLAGS.real_train_sizes]
  png_image = config_lib.parse_image_size(FLAGS.png_image_size, "--png_image_size")
  png_train = config_lib.parse_image_size(FLAGS.png_train_size, "--png_train_size")
  if FLAGS.real_size_frames and FLAGS.real_size_frames < 10 * FLAGS.batch_size // 4:
    raise app.UsageError("--real_size_frames: too few for a train split of 2 batches "
                         "(80% of the frames); 0 skips the real-size part")
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="depth2d_benchmark_")
  os.makedirs(workdir, exist_ok=True)
  base = Config(model_dir=workdir, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                manual_dir=FLAGS.manual_dir, global_batch_size=FLAGS.batch_size,
                # The backbone architectures are timed from random weights: no
                # ImageNet download, and FLOPs / step time do not depend on them.
                encoder_weights="none",
                # The pipeline timed with its fast JPEG path (the README's numbers);
                # the trainer's default is full decodes (--jpeg_reduced_decode).
                jpeg_reduced_decode=True)
  result = {"machine": machine_info(),
            "config": {"dataset": FLAGS.dataset, "batch_size": FLAGS.batch_size,
                       "image_sizes": [list(s) for s in image_sizes],
                       "scaling_sizes": [list(s) for s in scaling],
                       "architectures": list(FLAGS.architectures), "steps": FLAGS.steps,
                       "warmup_steps": FLAGS.warmup_steps, "stage_timed": STAGE_TIMED,
                       "flops_convention": "forward from models.count_flops (1 MAC = 2 "
                                           "FLOPs, convolutions); training = 3 x forward"}}
  started = time.perf_counter()
  builder = datasets.prepare_dataset(base.dataset, base.data_dir, base.manual_dir,
                                     may_build=True)
  strategy = distribute.get_distribution_strategy(base.strategy, num_devices=base.num_devices)
  policy = precision.resolve_policy(base.mixed_precision, strategy)
  precision.set_global_policy(policy)
  keras.utils.set_random_seed(base.seed)

  # The steps whose work is known in advance, for an overall count in the logs.
  default_point = (base.architecture, pipeline_size)
  points = [(a, s) for a in FLAGS.architectures for s in scaling]
  if default_point not in points:
    points.append(default_point)
  real_points = len(real_train) + 2 if FLAGS.real_size_frames else 0  # + build, + PNG
  phases = 2 + len(points) * (2 if FLAGS.jit_compile else 1) + real_points + (
      len(accuracy_architectures) if FLAGS.accuracy_budget_seconds > 0 else 0)
  phase = [0]

  def begin(what: str) -> None:
    phase[0] += 1
    logging.info("=== phase %d/%d: %s (%s since start)", phase[0], phases, what,
                 progress_lib.format_seconds(time.perf_counter() - started))

  # 1. Input pipelines, same files, same output size.
  begin("matmul peak")
  matmul = [measure_matmul(FLAGS.matmul_size, FLAGS.matmul_repeats)]
  begin("input pipeline: tf.data first pass and seed-style PIL loader, "
        f"{FLAGS.first_pass_rounds} rounds; steady state")
  pipeline_config = dataclasses.replace(base, image_size=pipeline_size)
  folder = os.path.join(workdir, "seed_png")
  count = export_seed_folders(builder, folder, FLAGS.seed_loader_examples)
  if count < FLAGS.batch_size:
    raise ValueError(f"only {count} training examples: fewer than --batch_size")
  compared = first_pass_rounds(pipeline_config, builder, seed_folder_files(folder),
                               FLAGS.first_pass_rounds, FLAGS.pipeline_batches, one_thread=False)
  result["input_pipeline"] = {"image_size": list(pipeline_size), "batch_size": FLAGS.batch_size,
                              "stage": "gradient", **compared}

  # 2 and 4. Train steps (default configuration included for 3).
  steps = []
  for arch, size in points:
    config = dataclasses.replace(base, architecture=arch, image_size=size)
    begin(f"train step {arch} {size_name(size)}")
    steps.append(measure_train_step(config, builder, strategy, policy, FLAGS.steps,
                                    FLAGS.warmup_steps))
    if FLAGS.jit_compile:
      begin(f"train step {arch} {size_name(size)} with XLA")
      steps.append(measure_train_step(config, builder, strategy, policy, FLAGS.steps,
                                      FLAGS.warmup_steps, jit_compile=True))
    keras.backend.clear_session()  # free the previous models' graphs...
    precision.set_global_policy(policy)  # ...which also resets Keras' global dtype policy
  matmul.append(measure_matmul(FLAGS.matmul_size, FLAGS.matmul_repeats))
  peak = max(m["flops_per_s"] for m in matmul)
  result["matmul"] = {"n": FLAGS.matmul_size, "flops_per_s": peak,
                      "measurements": [m["flops_per_s"] for m in matmul]}
  for r in steps:
    r["achieved_flops_per_s"] = r["train_flops_per_example"] * r["examples_per_s"]
    r["fraction_of_matmul"] = r["achieved_flops_per_s"] / peak
    smallest = min((s for s in steps if s["architecture"] == r["architecture"]
                    and s["jit_compile"] == r["jit_compile"]), key=lambda s: s["pixels"])
    r["step_time_vs_smallest"] = r["step_seconds_median"] / smallest["step_seconds_median"]
    r["pixels_vs_smallest"] = r["pixels"] / smallest["pixels"]
  result["train_step"] = steps
  by_point = {(r["architecture"], tuple(r["image_size"])): r for r in steps if not r["jit_compile"]}
  result["flops_ratio_seed_over_unet"] = {
      size_name(s): by_point[("seed", s)]["forward_flops_per_example"]
      / by_point[("unet", s)]["forward_flops_per_example"]
      for s in scaling if ("seed", s) in by_point and ("unet", s) in by_point}
  default_step = by_point[default_point]
  result["pipeline_over_training"] = {
      "architecture": base.architecture, "image_size": list(pipeline_size),
      "batch_size": FLAGS.batch_size,
      "pipeline_examples_per_s": compared["tfdata_steady_examples_per_s"],
      "train_examples_per_s": default_step["examples_per_s"],
      "ratio": compared["tfdata_steady_examples_per_s"] / default_step["examples_per_s"]}

  # 6. The phone's real sizes (JPEG) and the same frames as PNG.
  if FLAGS.real_size_frames:
    begin(f"real-size datasets ({FLAGS.real_size_frames} frames rendered at "
          f"{size_name(real_image)}, built as pairs JPEG and {size_name(png_image)} PNG)")
    built = build_real_size_datasets(workdir, FLAGS.real_size_frames, real_image, real_depth,
                                     png_image)
    jpeg_builder, jpeg_manual = built["jpeg"]
    real = []
    for size in real_train:
      begin(f"real size: {size_name(real_image)} JPEG -> {size_name(size)}")
      point = real_size_point(base, jpeg_builder, jpeg_manual, size, "jpeg",
                              FLAGS.real_steady_batches, FLAGS.first_pass_rounds,
                              FLAGS.breakdown_repeats)
      # The default architecture's training consumption at this size (the step
      # table's figure when it has this size, else timed now the same way).
      step = by_point.get((base.architecture, tuple(size)))
      if step is None:
        config = dataclasses.replace(base, image_size=tuple(size))
        step = measure_train_step(config, jpeg_builder, strategy, policy, FLAGS.steps,
                                  FLAGS.warmup_steps)
        keras.backend.clear_session()
        precision.set_global_policy(policy)
      point["train_architecture"] = base.architecture
      point["train_examples_per_s"] = step["examples_per_s"]
      point["first_pass_over_training"] = (point["tfdata_first_pass_examples_per_s"]
                                           / step["examples_per_s"])
      point["steady_over_training"] = point["tfdata_steady_examples_per_s"] / step["examples_per_s"]
      real.append(point)
    begin(f"real size: {size_name(png_image)} PNG -> {size_name(png_train)}")
    png_builder, png_manual = built["png"]
    png = real_size_point(base, png_builder, png_manual, png_train, "png",
                          FLAGS.real_steady_batches, FLAGS.first_pass_rounds,
                          FLAGS.breakdown_repeats)
    result["real_size"] = {
        "frames": FLAGS.real_size_frames, "image_size": list(real_image),
        "depth_size": list(real_depth), "png_image_size": list(png_image),
        "rendered": f"tfds_record3d.synthetic.render_sequence at {size_name(real_image)} "
                    f"(no upscaling); PNG = the same frames downsized with PIL bilinear",
        "points": real, "png": png}

  # 5. Equal wall-clock budget.
  if FLAGS.accuracy_budget_seconds > 0:
    accuracy_size = config_lib.parse_image_size(FLAGS.accuracy_image_size,
                                                "--accuracy_image_size")
    runs = []
    for arch in accuracy_architectures:
      rate = by_point.get((arch, accuracy_size))
      if rate is None:  # not timed above: time it now, the same way
        config = dataclasses.replace(base, architecture=arch, image_size=accuracy_size)
        rate = measure_train_step(config, builder, strategy, policy, FLAGS.steps,
                                  FLAGS.warmup_steps)
        keras.backend.clear_session()
        precision.set_global_policy(policy)
      begin(f"accuracy run {arch} ({FLAGS.accuracy_budget_seconds} s budget)")
      runs.append(accuracy_run(dataclasses.replace(base, image_size=accuracy_size), arch,
                               1.0 / rate["step_seconds_median"],
                               FLAGS.accuracy_budget_seconds, workdir))
    result["accuracy"] = {"budget_seconds": FLAGS.accuracy_budget_seconds,
                          "image_size": list(accuracy_size),
                          "steps_from": "budget x steps/s of the train-step measurement "
                                        "above (step alone, no input pipeline)",
                          "runs": runs}

  result["machine"]["loadavg_end"] = list(os.getloadavg())
  result["total_seconds"] = time.perf_counter() - started
  result["targets"] = targets(result)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    result = run_benchmark()
  except ValueError as e:
    raise app.UsageError(str(e))
  print(format_report(result), flush=True)
  if FLAGS.json:
    with tf.io.gfile.GFile(FLAGS.json, "w") as f:
      json.dump(result, f, indent=2)
    logging.info("wrote %s", FLAGS.json)


if __name__ == "__main__":
  app.run(main)
