"""Evaluating any export (a SavedModel folder or a .tflite file) on a split of a
dataset: the work of `python -m trainer.evaluate --model=PATH ...` (the CLI and its
flags are in `trainer/evaluate.py`).

`evaluate_export` writes OUTPUT_FILES into the output folder: metrics.json
(every metric, metric and median-scaled, the model's metadata, latency),
per_image.csv, errors_by_depth.png and worst.png (`trainer.figures`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Dict, List, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from trainer import datasets
from trainer import errors
from trainer import exported_model
from trainer import figures
from trainer import input_pipeline
from trainer import metrics as metrics_lib
from trainer import progress as progress_lib

# Where the metrics are computed:
#   depth: at the dataset's own depth resolution (the LiDAR's 256x192 for
#     Record3D): the export gets the stored RGB, its prediction is resized to
#     the depth map, and the ground truth is scored untouched: only real sensor
#     samples count, and models of any training or input size are scored on
#     the same pixels. The default.
#   model: as the trainer's own eval: ground truth resized to the model's
#     training size by input_pipeline.resize_example (--depth_resize), the
#     RGB resized to that size as uint8 (what an app feeds a fixed-size
#     TFLite file), the export's prediction at that size. Gives the numbers
#     of <model_dir>/<stage>/metrics.json.
RESOLUTIONS = ("depth", "model")
OUTPUT_FILES = ("metrics.json", "per_image.csv", "errors_by_depth.png", "worst.png")
NUM_DEPTH_BINS = 40  # errors_by_depth.png: bins over (0, max_depth)
PER_IMAGE_SCALE = "median_scale"  # per_image.csv: the median-scaling factor of the image


@dataclasses.dataclass(frozen=True)
class ExportEvalOptions:
  """What `evaluate_export` evaluates and how (the CLI's flags)."""
  dataset: Optional[str] = None  # None: the dataset the model was trained on (depth2d.json)
  data_dir: Optional[str] = None
  manual_dir: Optional[str] = None
  split: str = "test"
  resolution: str = "depth"
  min_depth: Optional[float] = None  # None: the trainer's default
  max_depth: Optional[float] = None  # None: the model's (depth2d.json), else the trainer's
  min_confidence: Optional[int] = None  # None: the trainer's eval default
  depth_resize: Optional[str] = None  # --resolution=model; None: the trainer's default
  max_images: int = 0  # 0: the whole split
  num_extremes: int = 3  # worst.png: this many worst and best images
  latency_repeats: int = 20  # 0: no latency measurement
  overwrite: bool = False


def check_output_dir(output_dir: str, overwrite: bool) -> None:
  """UserInputError when an earlier evaluation's outputs are in output_dir (unless overwrite)."""
  existing = [name for name in OUTPUT_FILES if tf.io.gfile.exists(os.path.join(output_dir, name))]
  if existing and not overwrite:
    raise errors.UserInputError(
        f"--output_dir={output_dir} already holds the outputs of an evaluation ("
        f"{', '.join(existing)}); pass --overwrite to replace them, or choose another "
        "--output_dir")


def load_export(path: str) -> exported_model.ExportedModel:
  """exported_model.load with its ValueError (not one of ours) as a UserInputError."""
  try:
    return exported_model.load(path)
  except ValueError as e:
    raise errors.UserInputError(f"--model={path}: {e}") from None


def model_metadata(model: exported_model.ExportedModel) -> dict:
  """depth2d.json of the export: the SavedModel's own, or the one beside a .tflite
  file (trainer.main writes both into <model_dir>/export); {} when unknown."""
  if model.metadata:
    return dict(model.metadata)
  beside = os.path.join(os.path.dirname(model.path), exported_model.METADATA_FILE)
  if model.kind == "tflite" and tf.io.gfile.exists(beside):
    with tf.io.gfile.GFile(beside) as f:
      logging.info("%s: training settings from %s", model.path, beside)
      return json.load(f)
  return {}


def resolve_options(options: ExportEvalOptions, metadata: dict) -> ExportEvalOptions:
  """Fills the None fields with the model's or the trainer's defaults; checks ranges."""
  # Imported here: config -> stages -> train -> evaluate -> export_eval is a cycle.
  from trainer import config as config_lib  # pylint: disable=import-outside-toplevel
  defaults = {f.name: f.default for f in dataclasses.fields(config_lib.Config)}
  eval_confidence = defaults["eval_min_confidence"]
  filled = dataclasses.replace(
      options,
      dataset=options.dataset or metadata.get("dataset"),
      min_depth=defaults["min_depth"] if options.min_depth is None else options.min_depth,
      max_depth=(options.max_depth if options.max_depth is not None
                 else metadata.get("max_depth", defaults["max_depth"])),
      min_confidence=(options.min_confidence if options.min_confidence is not None else
                      defaults["min_confidence"] if eval_confidence is None else eval_confidence),
      depth_resize=options.depth_resize or defaults["depth_resize"])
  if not filled.dataset:
    raise errors.UserInputError("--dataset is required: the model does not say which dataset "
                                "it was trained on (no depth2d.json)")
  if filled.resolution not in RESOLUTIONS:
    raise errors.UserInputError(f"--resolution must be one of {RESOLUTIONS}, got "
                                f"{filled.resolution!r}")
  if filled.min_confidence not in config_lib.CONFIDENCE_LEVELS:
    raise errors.UserInputError(f"--min_confidence must be 0, 1 or 2 (Record3D low, medium, "
                                f"high), got {filled.min_confidence}")
  if not 0 <= filled.min_depth < filled.max_depth:
    raise errors.UserInputError(f"need 0 <= --min_depth < --max_depth, got {filled.min_depth} "
                                f"and {filled.max_depth}")
  if filled.max_images < 0 or filled.num_extremes < 0 or filled.latency_repeats < 0:
    raise errors.UserInputError("--max_images, --num_extremes and --latency_repeats must be >= 0")
  return filled


def model_size(model: exported_model.ExportedModel, metadata: dict) -> Tuple[int, int]:
  """(H, W) the network was trained at (depth2d.json), else a TFLite file's fixed input."""
  size = metadata.get("image_size") or model.input_size
  if not size:
    raise errors.UserInputError(
        f"--resolution=model needs the model's training size, and {model.path} does not say "
        f"it (no {exported_model.METADATA_FILE}): use --resolution=depth")
  return tuple(int(v) for v in size)


def trainer_config(options: ExportEvalOptions, image_size):
  """The trainer Config whose eval preprocessing `--resolution=model` reproduces."""
  from trainer import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.Config(model_dir="", dataset=options.dataset, data_dir=options.data_dir,
                           image_size=tuple(image_size), min_depth=options.min_depth,
                           max_depth=options.max_depth, depth_resize=options.depth_resize)


def resize_prediction(depth: np.ndarray, size) -> np.ndarray:
  """float32 [H, W] -> [h, w]: bilinear, antialiased when shrinking (an average of
  the prediction over each ground-truth pixel's footprint)."""
  if tuple(depth.shape) == tuple(size):
    return depth
  resized = tf.image.resize(depth[None, :, :, None], size, method="bilinear", antialias=True)
  return resized[0, :, :, 0].numpy()


def score_inputs(example: dict, model, options: ExportEvalOptions, config=None):
  """One dataset example -> (rgb shown, ground truth [h,w] m, extra mask [h,w] or None,
  prediction [h,w] m) at the resolution of `options.resolution` (see RESOLUTIONS).

  config: the trainer Config of `trainer_config` (model resolution only).
  """
  if options.resolution == "model":
    # The trainer's eval preprocessing of the ground truth (confidence folded into
    # the depth before resizing, as input_pipeline.preprocess does for eval).
    tensors = {k: tf.constant(example[k]) for k in ("image", "depth", "confidence")
               if k in example}
    truth = input_pipeline.resize_example(tensors, config, options.min_confidence)
    truth = truth["depth"].numpy()[..., 0]  # [h, w], 0 invalid
    rgb = example["image"]
    if rgb.shape[:2] != truth.shape:
      rgb = exported_model.resize_rgb(rgb, truth.shape)
    return rgb, truth, None, model.predict(rgb)
  truth = np.asarray(example["depth"], np.float32)  # [Hd, Wd] as stored
  mask = None
  if options.min_confidence > 0 and "confidence" in example:
    mask = np.asarray(example["confidence"]) >= options.min_confidence
  prediction = resize_prediction(model.predict(example["image"]), truth.shape)
  return example["image"], truth, mask, prediction


def image_metrics(truth: np.ndarray, prediction: np.ndarray, mask, min_depth: float,
                  max_depth: float) -> Dict[str, float]:
  """Every metric of one image (flat: "median_scaled/<name>" too), NUM_VALID and
  PER_IMAGE_SCALE."""
  masks = None if mask is None else mask[None]
  per_image = metrics_lib.with_median_scaled(truth[None], prediction[None], min_depth, max_depth,
                                             masks)
  per_image[PER_IMAGE_SCALE] = metrics_lib.median_scale(truth[None], prediction[None], min_depth,
                                                        max_depth, masks)
  return {k: float(v.numpy()[0]) for k, v in per_image.items()}


def depth_bin_sums(truth, prediction, valid, scale: float, edges: np.ndarray, min_depth: float,
                   max_depth: float) -> Dict[str, np.ndarray]:
  """Per ground-truth depth bin (edges [K+1] m): pixel count and sums of the
  relative and squared errors, metric and median-scaled (times `scale`), the
  prediction clipped to [min_depth, max_depth] as the metrics do. Sum them over
  images, then `depth_bin_errors`."""
  g = truth[valid].astype(np.float64)
  bins = np.clip(np.digitize(g, edges) - 1, 0, len(edges) - 2)
  sums = {"count": np.bincount(bins, minlength=len(edges) - 1).astype(np.float64)}
  for key, p in (("", prediction[valid]), ("scaled_", prediction[valid] * scale)):
    p = np.clip(p.astype(np.float64), min_depth, max_depth)
    sums[f"{key}abs_rel"] = np.bincount(bins, np.abs(g - p) / g, len(edges) - 1)
    sums[f"{key}sq"] = np.bincount(bins, np.square(g - p), len(edges) - 1)
  return sums


def depth_bin_errors(sums: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Pixel-pooled abs_rel and rmse (m) per bin, metric and median-scaled; NaN for empty bins."""
  count = sums["count"]
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = lambda name: np.where(count > 0, sums[name] / count, np.nan)
    return {"count": count, "abs_rel": mean("abs_rel"), "rmse": np.sqrt(mean("sq")),
            "scaled_abs_rel": mean("scaled_abs_rel"), "scaled_rmse": np.sqrt(mean("scaled_sq"))}


class Extremes:
  """The `k` worst and `k` best images by abs_rel, keeping only their arrays."""

  def __init__(self, k: int):
    self.k = k
    self.items: List[dict] = []

  def offer(self, item: dict) -> None:
    """item: {"abs_rel": float, ...arrays}; kept if among the k worst or k best so far."""
    self.items.append(item)
    ranked = sorted(self.items, key=lambda x: x["abs_rel"])
    keep = ranked[:self.k] + ranked[max(self.k, len(ranked) - self.k):]
    self.items = keep

  def worst_and_best(self) -> Tuple[List[dict], List[dict]]:
    ranked = sorted(self.items, key=lambda x: x["abs_rel"], reverse=True)
    worst = ranked[:self.k]
    return worst, [x for x in reversed(ranked) if all(x is not w for w in worst)][:self.k]


def _csv_columns() -> List[str]:
  return (["sequence", "frame", metrics_lib.NUM_VALID, *metrics_lib.METRIC_NAMES, PER_IMAGE_SCALE]
          + [f"{metrics_lib.MEDIAN_SCALED}_{n}" for n in metrics_lib.METRIC_NAMES])


def _csv_row(sequence: str, frame: int, values: Dict[str, float]) -> List:
  counted = values[metrics_lib.NUM_VALID] > 0  # an image without valid pixels: empty cells
  cell = lambda v: f"{v:.6g}" if counted else ""
  return ([sequence, frame, int(values[metrics_lib.NUM_VALID])]
          + [cell(values[n]) for n in metrics_lib.METRIC_NAMES] + [cell(values[PER_IMAGE_SCALE])]
          + [cell(values[f"{metrics_lib.MEDIAN_SCALED}/{n}"]) for n in metrics_lib.METRIC_NAMES])


def measure_latency(model: exported_model.ExportedModel, metadata: dict, repeats: int) -> dict:
  """Median ms per image on 1 thread and on all cores, at the model's own size (a
  TFLite file's fixed input, else the training size), so that a SavedModel and
  its TFLite files are timed on the same work. None when skipped or no size is known."""
  size = model.input_size or metadata.get("image_size")
  timings = {"1_thread": None, "all_cores": None}
  if not repeats or not size:
    if repeats:
      logging.warning("%s: no latency: the model's image size is unknown", model.path)
    return {**timings, "num_cores": os.cpu_count(), "image_size": None}
  size = tuple(int(v) for v in size)
  for name, threads in (("1_thread", 1), ("all_cores", None)):
    logging.info("latency of %s on %s, %s (H, W), %d calls", model.path, name, size, repeats)
    timings[name] = model.latency_ms(num_threads=threads, image_size=size, repeats=repeats)
  return {**timings, "num_cores": os.cpu_count(), "image_size": list(size)}


def evaluate_export(model_path: str, output_dir: str, options: ExportEvalOptions) -> dict:
  """Evaluates an export on a dataset split; writes OUTPUT_FILES; returns metrics.json's content.

  Raises errors.UserInputError (and the dataset's errors) before anything is
  written: existing outputs without `overwrite`, a model that is not a depth2d
  export, bad options, an unknown split.
  """
  check_output_dir(output_dir, options.overwrite)
  model = load_export(model_path)
  metadata = model_metadata(model)
  options = resolve_options(options, metadata)
  builder = datasets.prepare_dataset(options.dataset, options.data_dir, options.manual_dir,
                                     may_build=True)
  try:
    total = datasets.num_examples(builder, options.split)
  except ValueError as e:
    raise errors.UserInputError(f"--split: {e}") from None
  if options.max_images:
    total = min(total, options.max_images)
  if not total:
    raise errors.UserInputError(f"--split={options.split} of {options.dataset} has no examples")
  config = None
  if options.resolution == "model":
    config = trainer_config(options, model_size(model, metadata))
  logging.info("evaluating %s (%s) on %s split %s: %d images at the %s resolution, valid depth "
               "in (%g, %g) m, confidence >= %d", model.path, model.kind, options.dataset,
               options.split, total, options.resolution, options.min_depth, options.max_depth,
               options.min_confidence)

  edges = np.linspace(0.0, options.max_depth, NUM_DEPTH_BINS + 1)
  sums, bin_sums, rows, sizes = {}, {}, [], set()
  extremes = Extremes(options.num_extremes)
  # The rate counts from the first image on: its time includes tracing the model.
  progress = progress_lib.Progress(f"evaluate {options.split}", total, unit="images",
                                   start_at_first_update=True)
  ds = builder.as_dataset(split=options.split, shuffle_files=False).take(total)
  for example in ds.as_numpy_iterator():
    rgb, truth, mask, prediction = score_inputs(example, model, options, config)
    values = image_metrics(truth, prediction, mask, options.min_depth, options.max_depth)
    sequence, frame = example["sequence"].decode(), int(example["frame"])
    rows.append(_csv_row(sequence, frame, values))
    sizes.add(truth.shape)
    sums = metrics_lib.accumulate(sums, {k: np.array([v]) for k, v in values.items()
                                         if k != PER_IMAGE_SCALE})
    if values[metrics_lib.NUM_VALID] > 0:
      valid = metrics_lib.valid_pixels(truth[None], options.min_depth, options.max_depth,
                                       None if mask is None else mask[None]).numpy()[0]
      image_bins = depth_bin_sums(truth, prediction, valid, values[PER_IMAGE_SCALE], edges,
                                  options.min_depth, options.max_depth)
      bin_sums = {k: bin_sums.get(k, 0.0) + v for k, v in image_bins.items()}
      extremes.offer({"abs_rel": values["abs_rel"], "values": values, "sequence": sequence,
                      "frame": frame, "rgb": rgb, "truth": np.where(valid, truth, 0.0),
                      "prediction": prediction})
    progress.update(add=1, suffix=f"{sequence} frame {frame}: abs_rel {values['abs_rel']:.3f}")
  result = metrics_lib.nest_median_scaled(metrics_lib.finalize(sums))
  if result[metrics_lib.NUM_IMAGES] < len(rows):
    logging.warning("%d of %d images have no valid ground truth and are not averaged",
                    len(rows) - result[metrics_lib.NUM_IMAGES], len(rows))

  summary = {
      "model": model.path, "model_kind": model.kind, "file_size_bytes": model.file_size_bytes,
      "model_metadata": metadata, "dataset": options.dataset, "split": options.split,
      "data_dir": options.data_dir, "resolution": options.resolution,
      "evaluated_sizes": sorted(list(s) for s in sizes), "min_depth": options.min_depth,
      "max_depth": options.max_depth, "min_confidence": options.min_confidence,
      "num_images_read": len(rows), **result,
      "latency_ms": measure_latency(model, metadata, options.latency_repeats),
  }
  if options.resolution == "model":
    summary["depth_resize"] = options.depth_resize
  write_export_eval_outputs(output_dir, summary, rows, bin_sums, edges, extremes)
  return summary


def _short_path(path: str) -> str:
  """The last two parts of a path (M/export, export/depth_int8.tflite): figure titles."""
  parts = os.path.normpath(path).split(os.sep)
  return os.path.join(*parts[-2:]) if len(parts) > 1 else path


def write_export_eval_outputs(output_dir: str, summary: dict, rows: List[List], bin_sums: dict,
                              edges: np.ndarray, extremes: Extremes) -> None:
  tf.io.gfile.makedirs(output_dir)
  with tf.io.gfile.GFile(os.path.join(output_dir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  with tf.io.gfile.GFile(os.path.join(output_dir, "per_image.csv"), "w") as f:
    writer = csv.writer(f)
    writer.writerow(_csv_columns())
    writer.writerows(rows)
  name = f"{_short_path(summary['model'])} on {summary['dataset']} {summary['split']}"
  errors_by_depth = depth_bin_errors(bin_sums) if bin_sums else None
  figures.errors_by_depth_figure(errors_by_depth, edges, name, summary[metrics_lib.NUM_IMAGES],
                                os.path.join(output_dir, "errors_by_depth.png"))
  worst, best = extremes.worst_and_best()
  figures.extremes_figure(worst, best, f"{name} ({summary['resolution']} resolution)",
                         os.path.join(output_dir, "worst.png"))
  logging.info("wrote %s to %s", ", ".join(OUTPUT_FILES), output_dir)
