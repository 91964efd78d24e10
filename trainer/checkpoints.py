"""Checkpoints of a stage: restore or explain, start one network from another,
and save on preemption.

- `restore_newest_readable`: resume from the newest checkpoint that reads; a
  truncated or corrupt one is named in a warning and the one before it is
  used (with the steps that will be redone); if checkpoints exist but none
  reads, stop rather than silently start from scratch.
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

import json
import re
import signal
from typing import TYPE_CHECKING, List, Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import errors
from trainer import models
from trainer import workdir

if TYPE_CHECKING:
  from trainer.config import Config

# --finetune_init: the finetune body starts from the trained rough net, or fresh.
FINETUNE_INITS = ("rough", "scratch")


# What reading a truncated or corrupt checkpoint raises (a truncated data file:
# IndexError "Read less bytes than requested"; a damaged index: OpError).
_UNREADABLE = (IndexError, EOFError, OSError, tf.errors.OpError)
# What a checkpoint of another model raises (shapes, missing objects).
_MISMATCHED = (AssertionError, ValueError)
_STEP = re.compile(r"ckpt-(\d+)$")


class UnreadableCheckpointError(Exception):
  """One checkpoint cannot be read (truncated, corrupt, missing files)."""


def restore_or_explain(checkpoint: tf.train.Checkpoint, path: str, config: "Config",
                       model_only: bool = False) -> None:
  """Restores `path`, or says why not.

  Raises UnreadableCheckpointError when the files cannot be read, and
  errors.CheckpointError naming the flags that likely differ when they can but
  do not fit the model. `model_only`: the checkpoint also holds optimizer state
  this caller does not want (eval, export); say so instead of warning about
  every slot.
  """
  try:
    status = checkpoint.restore(path)
    if model_only:
      status = status.expect_partial()
    status.assert_existing_objects_matched()
  except _UNREADABLE as e:
    raise UnreadableCheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
  except _MISMATCHED as e:
    raise errors.CheckpointError(
        f"cannot resume from {path}: it does not match this model ({e}). Was it written "
        f"with another --architecture or --image_size than {config.architecture} "
        f"{config.image_size}? Use a fresh --model_dir for a different model.") from e


def checkpoint_step(path: str) -> int:
  """The step a checkpoint path `.../ckpt-<step>` was saved at."""
  return int(_STEP.search(path).group(1))


def checkpoint_paths(directory: str) -> List[str]:
  """Every checkpoint in `directory`, newest first: those the `checkpoint` state
  file lists and those whose index file is there (the state file can be damaged too)."""
  paths = set()
  try:
    state = tf.train.get_checkpoint_state(directory)
    if state is not None:
      paths.update(p if "/" in p else f"{directory}/{p}" for p in state.all_model_checkpoint_paths)
  except _UNREADABLE + (ValueError,) as e:  # a damaged state file
    logging.warning("%s/checkpoint cannot be read (%s); looking for checkpoint files instead",
                    directory, e)
  for index in tf.io.gfile.glob(f"{directory}/ckpt-*.index"):
    paths.add(index[:-len(".index")])
  return sorted((p for p in paths if _STEP.search(p)), key=checkpoint_step, reverse=True)


def restore_newest_readable(checkpoint: tf.train.Checkpoint, directory: str, config: "Config",
                            model_only: bool = False) -> Optional[str]:
  """Restores the newest checkpoint of `directory` that reads; returns its path.

  None when the directory holds no checkpoint. A checkpoint that cannot be
  read is named in a warning and the previous one is tried; when none reads,
  errors.CheckpointError: starting from scratch would silently throw the
  training away.
  """
  paths = checkpoint_paths(directory)
  broken = []
  for path in paths:
    try:
      restore_or_explain(checkpoint, path, config, model_only)
    except UnreadableCheckpointError as e:
      logging.warning("%s; trying the checkpoint before it", e)
      broken.append(path)
      continue
    if broken:
      logging.warning(
          "fell back to %s (step %d), the newest readable checkpoint of %s: steps %d..%d "
          "will be redone (unreadable: %s)", path, checkpoint_step(path), directory,
          checkpoint_step(path) + 1, checkpoint_step(broken[0]), ", ".join(broken))
    return path
  if broken:
    raise errors.CheckpointError(
        f"{directory} holds {len(broken)} checkpoint(s) and none can be read "
        f"({', '.join(broken)}); refusing to start from scratch over them. Move them away "
        "(or pass a fresh --model_dir) to train anew.")
  return None


def restore_stage_weights(config: "Config", stage: str, model: keras.Model,
                          missing: str) -> str:
  """The weights of `stage`'s newest readable checkpoint into `model` (optimizer
  state skipped); returns its path. FileNotFoundError with `missing` (formatted
  with {directory}) when the stage has no checkpoint."""
  directory = workdir.checkpoint_dir(config, stage)
  latest = restore_newest_readable(tf.train.Checkpoint(model=model), directory, config,
                                   model_only=True)
  if latest is None:
    raise FileNotFoundError(missing.format(directory=directory))
  return latest


def init_finetune_from_rough(config: "Config", model: keras.Model, rough: keras.Model) -> None:
  """A fresh finetune run starts from the rough stage's latest checkpoint, restored
  into `rough` (a fresh rough network of this config, built in the strategy's scope)."""
  latest = restore_stage_weights(
      config, "rough", rough,
      "--finetune_init=rough starts the finetune net from the trained rough net, but "
      "{directory} has no checkpoint. Run --stage=rough first with the same --model_dir "
      "(--stage=all does), or pass --finetune_init=scratch"
      + (", or add finetune to --init_from_stages to start it from --init_from."
         if config.init_from else "."))
  copied = models.init_finetune_from_rough(rough, model)
  logging.info("finetune: body started from the rough net %s (%d variables; the gradient "
               "input's weights start at zero)", latest, copied)


def init_from_dir(config: "Config", stage: str) -> str:
  """The checkpoint folder --init_from names for `stage`; errors.UserInputError
  (naming --init_from) when it has none for that stage, or was trained with
  another --architecture or --image_size."""
  base = config.init_from.rstrip("/")
  candidates = [f"{base}/{stage}/checkpoints", base]  # a --model_dir, a stage's checkpoints
  if base.rsplit("/", 1)[-1] == stage:
    candidates.insert(1, f"{base}/checkpoints")  # the stage folder itself
  directory = next((c for c in candidates if checkpoint_paths(c)), None)
  if directory is None:
    raise errors.UserInputError(
        f"--init_from={config.init_from}: no checkpoint of stage {stage!r} there (looked in "
        f"{', '.join(candidates)}); give a --model_dir that trained {stage}, or its "
        f"{stage} folder")
  # config.json of the run that wrote it: the model_dir above the checkpoints.
  run_dir = directory[:-len(f"/{stage}/checkpoints")] if directory.endswith(
      f"/{stage}/checkpoints") else None
  if run_dir and tf.io.gfile.exists(f"{run_dir}/config.json"):
    with tf.io.gfile.GFile(f"{run_dir}/config.json") as f:
      stored = json.load(f)
    for name, given in (("architecture", config.architecture),
                        ("image_size", list(config.image_size))):
      if name in stored and stored[name] != given:
        raise errors.UserInputError(
            f"--init_from={config.init_from} was trained with --{name}={stored[name]}, this "
            f"run has --{name}={given}: its weights do not fit (or were meant for another "
            f"size); train with the same --{name}, or pick another --init_from")
  return directory


def init_from_run(config: "Config", stage: str, model: keras.Model) -> str:
  """Starts a fresh stage's weights from --init_from (the optimizer starts fresh)."""
  directory = init_from_dir(config, stage)
  try:
    path = restore_newest_readable(tf.train.Checkpoint(model=model), directory, config,
                                   model_only=True)
  except errors.CheckpointError as e:
    raise errors.UserInputError(f"--init_from={config.init_from}: {e}") from e
  logging.info("%s: weights start from --init_from %s (step %d there); the optimizer starts "
               "fresh", stage, path, checkpoint_step(path))
  return path


def restore_gradient_network(config: "Config", network: keras.Model) -> None:
  latest = restore_stage_weights(
      config, "gradient", network,
      "--stage=finetune needs a trained gradient network, but {directory} has no "
      "checkpoint. Run --stage=gradient first with the same --model_dir (or --stage=all).")
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
