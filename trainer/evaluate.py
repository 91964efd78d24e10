"""Evaluation of a stage on the eval split: the distributed eval step, every
metric (README "Evaluation"), `<stage>/metrics.json`, `<stage>/samples.npz`
(a few examples for the report) and TensorBoard scalars and images.

Depth stages report every metric twice: on metric depth (top-level keys) and
after per-image median scaling (`"median_scaled"`; TensorBoard
`eval_median_scaled/<name>`).

As a program, `python -m trainer.evaluate --model=PATH ...` evaluates any
export (a SavedModel folder or a .tflite file) on a split of a dataset: the
flags at the end of this file, the work in `export_eval.evaluate_export`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from typing import TYPE_CHECKING

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import depth_ops
from trainer import errors
from trainer import export_eval
from trainer import input_pipeline
from trainer import metrics as metrics_lib
from trainer import workdir

if TYPE_CHECKING:
  from trainer.workdir import Run

SAMPLE_KEYS = ("image", "depth", "prediction")  # kept per example for the report


def evaluate_stage(run: "Run", stage: str, model: keras.Model, step: int, writer) -> dict:
  """Metrics over the eval split, written to metrics.json and TensorBoard (chief)."""
  config, strategy = run.config, run.strategy
  eval_ds = strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.eval_dataset(config, stage, run.builder, ctx))

  @tf.function
  def eval_step(batch):
    def replica_fn(b):
      prediction = tf.cast(model(b["image"], training=False), tf.float32)
      if stage == "gradient":
        # The gradient net is judged on its own target: RMSE of Sobel edges.
        per_image = metrics_lib.edge_metrics(b["target"], prediction, b["target_mask"])
      else:
        # Metric depth and, with "median_scaled/" keys, after per-image median scaling.
        per_image = metrics_lib.with_median_scaled(b["depth"], prediction,
                                                   config.min_depth, config.max_depth)
      per_image = dict(per_image)
      per_image.update(image=b["image"], depth=b["depth"], prediction=prediction)
      return per_image
    per_replica = strategy.run(replica_fn, args=(batch,))
    return {k: strategy.gather(v, axis=0) for k, v in per_replica.items()}

  sums = {}
  samples = {k: [] for k in SAMPLE_KEYS}
  start = time.time()
  for batch in eval_ds:
    out = {k: v.numpy() for k, v in eval_step(batch).items()}
    per_image = {k: v for k, v in out.items() if k not in samples}
    sums = metrics_lib.accumulate(sums, per_image)
    real = per_image[metrics_lib.NUM_VALID] > 0  # padding examples have no valid pixel
    have = sum(len(s) for s in samples["image"])
    take = max(0, config.num_image_summaries - have)
    for k in samples:
      samples[k].append(out[k][real][:take])
  # Metric keys stay at the top level (callers read result["rmse"]); the
  # median-scaled ones are nested under result["median_scaled"].
  result = metrics_lib.nest_median_scaled(metrics_lib.finalize(sums))
  result["step"] = step
  logging.info("%s eval on %s (%d images, %.1fs): %s", stage, config.eval_split,
               result.get(metrics_lib.NUM_IMAGES, 0), time.time() - start, _floats(result))
  if metrics_lib.MEDIAN_SCALED in result:
    logging.info("%s eval, median-scaled: %s", stage, _floats(result[metrics_lib.MEDIAN_SCALED]))
  if run.is_chief:
    samples = {k: np.concatenate(v)[:config.num_image_summaries] for k, v in samples.items()}
    write_eval_outputs(run, stage, result, samples, step, writer)
  return result


def _floats(values: dict) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()) if isinstance(v, float))


def write_eval_outputs(run: "Run", stage: str, result: dict, samples: dict, step: int,
                       writer) -> None:
  config = run.config
  stage_dir = workdir.stage_dir(config, stage)
  tf.io.gfile.makedirs(stage_dir)
  with tf.io.gfile.GFile(f"{stage_dir}/metrics.json", "w") as f:
    json.dump({"stage": stage, "split": config.eval_split, "dataset": config.dataset,
               "architecture": config.architecture, **result}, f, indent=2, sort_keys=True)
  buffer = io.BytesIO()  # np.savez needs a seekable file; GFile (gs://) is not
  np.savez_compressed(buffer, **samples)
  with tf.io.gfile.GFile(f"{stage_dir}/samples.npz", "wb") as f:
    f.write(buffer.getvalue())
  with writer.as_default():
    for name, value in result.items():
      if isinstance(value, float):
        tf.summary.scalar(f"eval/{name}", value, step=step)
    for name, value in result.get(metrics_lib.MEDIAN_SCALED, {}).items():
      if isinstance(value, float):
        tf.summary.scalar(f"eval_median_scaled/{name}", value, step=step)
    if len(samples["image"]):
      tiles = [summary_tile(stage, *example) for example in zip(*(samples[k] for k in SAMPLE_KEYS))]
      tf.summary.image("eval/rgb_truth_prediction", np.stack(tiles), step=step,
                       max_outputs=len(tiles))
  writer.flush()


def summary_tile(stage: str, image: np.ndarray, depth: np.ndarray,
                 prediction: np.ndarray) -> np.ndarray:
  """uint8 [H, W*k, 3]: RGB | ground truth | prediction, one colour scale per row
  (the ground truth's; the gradient stage shows RGB | predicted edges)."""
  row = [np.round(image * 255).astype(np.uint8)]
  if stage == "gradient":
    row.append(depth_ops.colourize(prediction[..., 0], 0.0, float(max(prediction.max(), 1e-6))))
  else:
    vmin, vmax = depth_ops.depth_range(depth)
    row.append(depth_ops.colourize(depth[..., 0], vmin, vmax))
    row.append(depth_ops.colourize(prediction[..., 0], vmin, vmax))
  return np.concatenate(row, axis=1)


# ----------------------------------------------------------------------------
# The command line (flags are declared only when this module is the program).
# ----------------------------------------------------------------------------
def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model", None, "A SavedModel folder (M/export) or a .tflite file "
                      "(M/export/depth_int8.tflite) written by trainer.main.")
  flags.DEFINE_string("dataset", None, "TFDS name, e.g. record3d/pairs (default: the dataset "
                      "the model was trained on, from depth2d.json).")
  flags.DEFINE_string("data_dir", None, "TFDS data folder (built there when missing).")
  flags.DEFINE_string("manual_dir", None, "The dataset's manual input (captures) folder.")
  flags.DEFINE_string("split", "test", "Split evaluated.")
  flags.DEFINE_string("output_dir", None, "Folder for " + ", ".join(export_eval.OUTPUT_FILES) + ".")
  flags.DEFINE_enum("resolution", "depth", export_eval.RESOLUTIONS,
                    "depth: score at the dataset's own depth resolution, ground truth untouched "
                    "(the prediction is resized to it). model: as the trainer's eval, ground "
                    "truth resized to the model's training size (--depth_resize): the numbers "
                    "of <model_dir>/<stage>/metrics.json.")
  flags.DEFINE_float("min_depth", None, "Ground truth below this (m) is invalid (default: "
                     "the trainer's).")
  flags.DEFINE_float("max_depth", None, "Ground truth above this (m) is invalid (default: the "
                     "model's, from depth2d.json, else the trainer's).")
  flags.DEFINE_integer("min_confidence", None, "Ground truth whose confidence (0 low, 1 medium, "
                       "2 high) is below this is invalid (default: the trainer's eval default).")
  flags.DEFINE_enum("depth_resize", None, depth_ops.RESIZE_METHODS,
                    "--resolution=model: how ground truth is resized (default: the trainer's).")
  flags.DEFINE_integer("max_images", 0, "Evaluate only the split's first N images (0: all).")
  flags.DEFINE_integer("num_extremes", 3, "worst.png shows this many worst and best images.")
  flags.DEFINE_integer("latency_repeats", 20, "Timed calls per latency figure (0: skip).")
  flags.DEFINE_bool("overwrite", False, "Replace an earlier evaluation's outputs in --output_dir.")
  return flags.FLAGS


def main(argv, flag_values) -> int:
  from tfds_record3d import ManualInputError  # pylint: disable=import-outside-toplevel
  problem = None
  if len(argv) > 1:
    problem = f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)"
  elif not flag_values.model or not flag_values.output_dir:
    problem = "--model and --output_dir are required"
  if problem is None:
    options = export_eval.ExportEvalOptions(
        **{f.name: flag_values[f.name].value
           for f in dataclasses.fields(export_eval.ExportEvalOptions)})
    try:
      summary = export_eval.evaluate_export(flag_values.model, flag_values.output_dir, options)
    except (errors.UserInputError, ManualInputError, FileNotFoundError) as e:
      problem = str(e)
  if problem:  # the message alone, no traceback
    print(f"trainer.evaluate: error: {problem}", file=sys.stderr)
    return 2
  scaled = summary[metrics_lib.MEDIAN_SCALED]
  print(f"{summary['num_images']} images: abs_rel {summary['abs_rel']:.4f}, rmse "
        f"{summary['rmse']:.4f} m, delta1 {summary['delta1']:.4f}; median-scaled abs_rel "
        f"{scaled['abs_rel']:.4f}, delta1 {scaled['delta1']:.4f}; outputs in "
        f"{flag_values.output_dir}")
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = _define_flags()
  app.run(lambda argv: main(argv, FLAGS))
