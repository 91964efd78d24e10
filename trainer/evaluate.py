"""Evaluation of a stage on the eval split: the distributed eval step, every
metric (README "Evaluation"), `<stage>/metrics.json`, `<stage>/samples.npz`
(a few examples for the report) and TensorBoard scalars and images.
"""

from __future__ import annotations

import io
import json
import time
from typing import TYPE_CHECKING

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import depth_ops
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
        per_image = metrics_lib.depth_metrics(b["depth"], prediction,
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
  result = metrics_lib.finalize(sums)
  result["step"] = step
  logging.info("%s eval on %s (%d images, %.1fs): %s", stage, config.eval_split,
               result.get(metrics_lib.NUM_IMAGES, 0), time.time() - start,
               ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())
                         if isinstance(v, float)))
  if run.is_chief:
    samples = {k: np.concatenate(v)[:config.num_image_summaries] for k, v in samples.items()}
    write_eval_outputs(run, stage, result, samples, step, writer)
  return result


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
