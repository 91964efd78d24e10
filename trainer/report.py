"""The comparison a person looks at after `--stage=all`.

`<model_dir>/results.md` (+ results.json): the metrics table (rough, finetune
and a constant predictor: the training split's median depth) on metric depth,
and a second table of the same after per-image median scaling, and
`<model_dir>/comparison.png`: one row per test image, columns RGB | ground
truth | rough | finetune, one colour scale per row with its colour bar in
meters, each prediction titled with its abs_rel (drawn by `trainer.figures`).
Then `trainer.predict` runs on a few test images, as a user would
(`<model_dir>/predict/`).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from typing import TYPE_CHECKING, Dict, Sequence

from absl import logging
import numpy as np
from PIL import Image
import tensorflow as tf

from trainer import figures
from trainer import input_pipeline
from trainer import metrics as metrics_lib
from trainer import predict
from trainer import workdir

if TYPE_CHECKING:
  from trainer.config import Config

TABLE_METRICS = ("abs_rel", "rmse", "delta1", "delta2", "sq_rel", "rmse_log", "log10",
                 "silog", "mse")
REPORT_STAGES = ("rough", "finetune")  # the depth stages compared


def constant_predictor_metrics(config: Config, builder, value: float) -> dict:
  """Every metric for predicting `value` meters everywhere on the eval split."""
  sums = {}
  for batch in input_pipeline.eval_dataset(config, "rough", builder):
    prediction = tf.fill(tf.shape(batch["depth"]), value)
    per_image = metrics_lib.with_median_scaled(batch["depth"], prediction, config.min_depth,
                                               config.max_depth)
    sums = metrics_lib.accumulate(sums, {k: v.numpy() for k, v in per_image.items()})
  return metrics_lib.nest_median_scaled(metrics_lib.finalize(sums))


def metrics_table(rows: Dict[str, dict], names: Sequence[str] = TABLE_METRICS) -> str:
  """Markdown table, one row per predictor."""
  lines = ["| predictor | " + " | ".join(names) + " | images |",
           "|---|" + "---|" * (len(names) + 1)]
  for label, values in rows.items():
    cells = [f"{values[n]:.4f}" if isinstance(values.get(n), float) else "-" for n in names]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {values.get('num_images', '-')} |")
  return "\n".join(lines)


def median_scaled_table(rows: Dict[str, dict], names: Sequence[str] = TABLE_METRICS) -> str:
  """The same table for each row's "median_scaled" metrics (rows without them: "-")."""
  return metrics_table({label: values.get(metrics_lib.MEDIAN_SCALED, {})
                        for label, values in rows.items()}, names)


def _load_samples(path: str) -> dict:
  with tf.io.gfile.GFile(path, "rb") as f:
    return dict(np.load(io.BytesIO(f.read())))


def write_report(config: Config, builder, stage_metrics: Dict[str, dict]) -> str:
  """Writes results.md (+ results.json) and comparison.png; returns the table."""
  median = input_pipeline.training_median_depth(config, builder)
  rows = {f"constant (train median {median:.2f} m)": constant_predictor_metrics(config, builder, median)}
  for stage in REPORT_STAGES:
    if stage in stage_metrics:
      rows[f"{stage} ({config.architecture})"] = stage_metrics[stage]
  table = metrics_table(rows)
  scaled_table = median_scaled_table(rows)
  base = workdir.root(config)
  with tf.io.gfile.GFile(f"{base}/results.md", "w") as f:
    f.write(f"# {config.dataset}, split {config.eval_split}, image {config.image_size[0]}x"
            f"{config.image_size[1]}, {config.train_steps} steps per stage\n\n"
            f"## Metric depth\n\n{table}\n\n"
            "## Median-scaled (each prediction times median(truth) / median(prediction) "
            f"over its image's valid pixels)\n\n{scaled_table}\n")
  with tf.io.gfile.GFile(f"{base}/results.json", "w") as f:
    json.dump(rows, f, indent=2, sort_keys=True)
  samples = {stage: _load_samples(f"{workdir.stage_dir(config, stage)}/samples.npz")
             for stage in REPORT_STAGES if stage in stage_metrics}
  if samples:
    figures.comparison_figure(samples, config, f"{base}/comparison.png")
  logging.info("results (%s/results.md, figure in %s/comparison.png):\n%s\nmedian-scaled:\n%s",
               base, base, table, scaled_table)
  return table


def predict_test_images(config: Config, builder, export_dir: str) -> dict:
  """Runs trainer.predict on a few eval-split images saved as PNG, as a user
  would, in <model_dir>/predict/inputs and outputs. trainer.predict writes
  local files (PIL, numpy): with a gs:// --model_dir it runs in a local
  temporary folder, copied to <model_dir>/predict afterwards."""
  base = f"{workdir.root(config)}/predict"
  if tf.io.gfile.exists(f"{base}/outputs"):
    logging.info("replacing this run's earlier predictions in %s/outputs", base)
  remote = workdir.is_remote(base)
  with (tempfile.TemporaryDirectory(prefix="depth2d_predict_") if remote
        else contextlib.nullcontext(base)) as folder:
    inputs_dir, outputs_dir = f"{folder}/inputs", f"{folder}/outputs"
    tf.io.gfile.makedirs(inputs_dir)
    paths = []
    ds = builder.as_dataset(split=config.eval_split, shuffle_files=False)
    for example in ds.take(config.num_predict_images).as_numpy_iterator():
      name = f"{example['sequence'].decode()}_{int(example['frame']):05d}.png"
      path = f"{inputs_dir}/{name}"
      Image.fromarray(example["image"]).save(path)
      paths.append(path)
    outcome = predict.predict_files(export_dir, paths, outputs_dir, overwrite=True)
    if remote:
      workdir.copy_tree(folder, base)
      logging.info("copied the predictions to %s", base)
      outcome = {base + path[len(folder):]: error for path, error in outcome.items()}
  return outcome
