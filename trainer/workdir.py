"""The run and its workdir: strategy, precision and dataset set up once, and
every path convention of `--model_dir` (written here and nowhere else).

  <model_dir>/config.json                 the resolved configuration
  <model_dir>/<stage>/checkpoints         (or --checkpoint_dir/<stage>)
  <model_dir>/<stage>/tensorboard         (or --tensorboard_dir/<stage>)
  <model_dir>/<stage>/metrics.json, samples.npz, export/
  <model_dir>/export                      the best chain (finetune, else rough)
  <model_dir>/results.md, results.json, comparison.png, predict/   (--stage=all)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

from absl import logging
import keras
import tensorflow as tf

from trainer import datasets
from trainer import distribute
from trainer import precision

if TYPE_CHECKING:
  from trainer.config import Config


@dataclasses.dataclass
class Run:
  """What every stage of one `train_and_evaluate` shares."""
  config: "Config"
  strategy: tf.distribute.Strategy
  policy: str  # the mixed-precision policy in force
  is_chief: bool  # only the chief writes summaries, metrics, exports, the real checkpoints
  builder: object  # tfds.core.DatasetBuilder of --dataset, prepared


def root(config: "Config") -> str:
  return config.model_dir.rstrip("/")


def stage_dir(config: "Config", stage: str) -> str:
  return f"{root(config)}/{stage}"


def checkpoint_dir(config: "Config", stage: str) -> str:
  base = config.checkpoint_dir
  return f"{base.rstrip('/')}/{stage}" if base else f"{stage_dir(config, stage)}/checkpoints"


def tensorboard_dir(config: "Config", stage: str) -> str:
  base = config.tensorboard_dir
  return f"{base.rstrip('/')}/{stage}" if base else f"{stage_dir(config, stage)}/tensorboard"


def export_dir(config: "Config", stage: Optional[str] = None) -> str:
  """A stage's own export, or (stage None) the best chain's `<model_dir>/export`."""
  return f"{stage_dir(config, stage) if stage else root(config)}/export"


def setup_run(config: "Config") -> Run:
  """Strategy, precision, dataset and the resolved config file; logs the derived numbers."""
  strategy = distribute.get_distribution_strategy(
      config.strategy, num_devices=config.num_devices, tpu=config.tpu)
  policy = precision.resolve_policy(config.mixed_precision, strategy)
  precision.set_global_policy(policy)
  keras.utils.set_random_seed(config.seed)
  info = distribute.describe(strategy)
  per_replica = distribute.replica_batch_size(config.global_batch_size, info["replicas"])
  is_chief = info["chief"]
  builder = datasets.prepare_dataset(config.dataset, config.data_dir, config.manual_dir,
                                     may_build=is_chief)
  num_train = datasets.num_examples(builder, "train")
  # A stable line (README "Log lines"): tests and users read these numbers.
  logging.info(
      "strategy=%s replicas=%d workers=%d chief=%s precision=%s | global batch %d = "
      "%d per replica | %d steps per stage = %.1f epochs of %d training examples | "
      "image %dx%d, architecture %s",
      info["strategy"], info["replicas"], info["workers"], is_chief, policy,
      config.global_batch_size, per_replica, config.train_steps,
      config.train_steps * config.global_batch_size / max(1, num_train), num_train,
      *config.image_size, config.architecture)
  if is_chief:
    tf.io.gfile.makedirs(root(config))
    with tf.io.gfile.GFile(f"{root(config)}/config.json", "w") as f:
      f.write(config.to_json())
  return Run(config, strategy, policy, is_chief, builder)


def summary_writer(run: Run, stage: str):
  """TensorBoard writer of the stage: the chief's only, a no-op elsewhere."""
  if run.is_chief:
    return tf.summary.create_file_writer(tensorboard_dir(run.config, stage))
  return tf.summary.create_noop_writer()
