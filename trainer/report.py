"""The comparison a person looks at after `--stage=all`.

`<model_dir>/results.md`: the metrics table (rough, finetune and a constant
predictor: the training set's median depth) and `<model_dir>/comparison.png`:
rows of RGB | ground truth | rough | finetune, one colour scale per row.
"""

import io
import json
from typing import Dict, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from trainer import depth_ops
from trainer import input_pipeline
from trainer import metrics as metrics_lib
from trainer.config import Config

GRID_MIN_TILE_WIDTH = 160  # pixels per tile in comparison.png, at least
TABLE_METRICS = ("abs_rel", "rmse", "delta1", "delta2", "sq_rel", "rmse_log", "log10",
                 "silog", "mse")


def constant_predictor_metrics(config: Config, builder, value: float) -> dict:
  """Every metric for predicting `value` meters everywhere on the eval split."""
  sums = {}
  for batch in input_pipeline.eval_dataset(config, "rough", builder):
    prediction = tf.fill(tf.shape(batch["depth"]), value)
    per_image = metrics_lib.depth_metrics(batch["depth"], prediction, config.min_depth,
                                          config.max_depth)
    sums = metrics_lib.accumulate(sums, {k: v.numpy() for k, v in per_image.items()})
  return metrics_lib.finalize(sums)


def metrics_table(rows: Dict[str, dict], names: Sequence[str] = TABLE_METRICS) -> str:
  """Markdown table, one row per predictor."""
  lines = ["| predictor | " + " | ".join(names) + " | images |",
           "|---|" + "---|" * (len(names) + 1)]
  for label, values in rows.items():
    cells = [f"{values[n]:.4f}" if isinstance(values.get(n), float) else "-" for n in names]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {values.get('num_images', '-')} |")
  return "\n".join(lines)


def comparison_grid(samples: Dict[str, dict]) -> np.ndarray:
  """uint8 image: per test example a row RGB | truth | one column per stage."""
  first = next(iter(samples.values()))
  rows = []
  for i in range(len(first["image"])):
    truth = first["depth"][i][..., 0]
    valid = truth[truth > 0]
    vmin, vmax = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)
    tiles = [np.round(first["image"][i] * 255).astype(np.uint8),
             depth_ops.colourize(truth, vmin, vmax)]
    for stage_samples in samples.values():
      tiles.append(depth_ops.colourize(stage_samples["prediction"][i][..., 0], vmin, vmax))
    rows.append(np.concatenate(tiles, axis=1))
  grid = np.concatenate(rows, axis=0)
  # Training images are small (64x48 by default): enlarge with whole pixels so
  # a person can see them; nearest-neighbour keeps the depth values honest.
  scale = max(1, GRID_MIN_TILE_WIDTH // first["image"].shape[2])
  return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def _load_samples(path: str) -> dict:
  with tf.io.gfile.GFile(path, "rb") as f:
    return dict(np.load(io.BytesIO(f.read())))


def write_report(config: Config, builder, stage_metrics: Dict[str, dict]) -> str:
  """Writes results.md (+ results.json) and comparison.png; returns the table."""
  median = input_pipeline.training_median_depth(config, builder)
  rows = {f"constant (train median {median:.2f} m)": constant_predictor_metrics(config, builder, median)}
  for stage in ("rough", "finetune"):
    if stage in stage_metrics:
      rows[f"{stage} ({config.architecture})"] = stage_metrics[stage]
  table = metrics_table(rows)
  base = config.model_dir.rstrip("/")
  with tf.io.gfile.GFile(f"{base}/results.md", "w") as f:
    f.write(f"# {config.dataset}, split {config.eval_split}, image {config.image_size[0]}x"
            f"{config.image_size[1]}, {config.train_steps} steps per stage\n\n{table}\n")
  with tf.io.gfile.GFile(f"{base}/results.json", "w") as f:
    json.dump(rows, f, indent=2, sort_keys=True)
  samples = {stage: _load_samples(f"{config.stage_dir(stage)}/samples.npz")
             for stage in ("rough", "finetune") if stage in stage_metrics}
  if samples:
    grid = comparison_grid(samples)
    with tf.io.gfile.GFile(f"{base}/comparison.png", "wb") as f:
      Image.fromarray(grid).save(f, format="PNG")
  logging.info("results (%s/results.md, grid in %s/comparison.png):\n%s", base, base, table)
  return table


def predict_test_images(config: Config, builder, export_dir: str) -> dict:
  """Runs trainer.predict on a few eval-split images saved as PNG, as a user would."""
  from trainer import predict  # pylint: disable=g-import-not-at-top  # defines CLI flags
  base = config.model_dir.rstrip("/")
  inputs_dir, outputs_dir = f"{base}/predict/inputs", f"{base}/predict/outputs"
  tf.io.gfile.makedirs(inputs_dir)
  paths = []
  ds = builder.as_dataset(split=config.eval_split, shuffle_files=False)
  for example in ds.take(config.num_predict_images).as_numpy_iterator():
    name = f"{example['sequence'].decode()}_{int(example['frame']):05d}.png"
    path = f"{inputs_dir}/{name}"
    Image.fromarray(example["image"]).save(path)
    paths.append(path)
  return predict.predict_files(export_dir, paths, outputs_dir)
