"""Checkpoints of a stage: restore or explain, start one network from another,
and save on preemption.

- `restore_or_explain`: a checkpoint that does not fit the model is an error
  that says which flags likely differ, not a bare shape mismatch.
- `init_finetune_from_rough` / `restore_gradient_network`: the finetune stage
  starts from the rough stage's trained body and contains the trained
  gradient network.
- SIGTERM (single host: `SigtermFlag`) or TensorFlow's
  `PreemptionCheckpointHandler` (multi-worker, TPU) save a checkpoint and let
  the run end cleanly.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import models
from trainer import workdir

if TYPE_CHECKING:
  from trainer.config import Config

# --finetune_init: the finetune body starts from the trained rough net, or fresh.
FINETUNE_INITS = ("rough", "scratch")


def restore_or_explain(checkpoint: tf.train.Checkpoint, path: str, config: "Config",
                       model_only: bool = False) -> None:
  """Restores, or says which flags likely differ from the run that wrote `path`.

  `model_only`: the checkpoint also holds optimizer state this caller does not
  want (eval, export); say so instead of warning about every slot.
  """
  try:
    status = checkpoint.restore(path)
    if model_only:
      status = status.expect_partial()
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    raise ValueError(
        f"cannot resume from {path}: it does not match this model ({e}). Was it written "
        f"with another --architecture or --image_size than {config.architecture} "
        f"{config.image_size}? Use a fresh --model_dir for a different model.") from e


def latest_step(path: str) -> int:
  """The step a checkpoint path `.../ckpt-<step>` was saved at."""
  return int(path.rsplit("-", 1)[-1])


def init_finetune_from_rough(config: "Config", strategy: tf.distribute.Strategy,
                             model: keras.Model) -> None:
  """A fresh finetune run starts from the rough stage's latest checkpoint."""
  directory = workdir.checkpoint_dir(config, "rough")
  latest = tf.train.latest_checkpoint(directory)
  if latest is None:
    raise FileNotFoundError(
        f"--finetune_init=rough starts the finetune net from the trained rough net, but "
        f"{directory} has no checkpoint. Run --stage=rough first with the same --model_dir "
        "(--stage=all does), or pass --finetune_init=scratch.")
  with strategy.scope():
    rough = models.build_network("rough", config.architecture, config.image_size)
    restore_or_explain(tf.train.Checkpoint(model=rough), latest, config, model_only=True)
    copied = models.init_finetune_from_rough(rough, model)
  logging.info("finetune: body started from the rough net %s (%d variables; the gradient "
               "input's weights start at zero)", latest, copied)


def restore_gradient_network(config: "Config", network: keras.Model) -> None:
  directory = workdir.checkpoint_dir(config, "gradient")
  latest = tf.train.latest_checkpoint(directory)
  if latest is None:
    raise FileNotFoundError(
        f"--stage=finetune needs a trained gradient network, but {directory} has no "
        "checkpoint. Run --stage=gradient first with the same --model_dir (or --stage=all).")
  tf.train.Checkpoint(model=network).restore(latest).expect_partial().assert_existing_objects_matched()
  logging.info("finetune: restored the gradient network from %s (%s)", latest,
               "frozen" if config.freeze_gradient else "trainable")


def weights_fingerprint(model: keras.Model) -> float:
  """A cheap summary of all weights, logged so workers can be compared."""
  return float(sum(np.abs(w.numpy().astype(np.float64)).sum() for w in model.weights))


class SigtermFlag:
  """Single-host strategies: remember SIGTERM, let the loop save at a step boundary."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the end of this loop.")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def make_preemption_handler(strategy, checkpoint_manager):
  """TensorFlow's handler where it applies (multi-worker and TPU: it coordinates
  the save across workers); None for single-host strategies (SigtermFlag)."""
  if not isinstance(strategy, (tf.distribute.MultiWorkerMirroredStrategy,
                               tf.distribute.TPUStrategy)):
    return None
  return tf.distribute.experimental.PreemptionCheckpointHandler(
      strategy.cluster_resolver, checkpoint_manager)
