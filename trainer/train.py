"""One stage's training: its loss, model and optimizer, the distributed train
step, and the loop `train_stage`, read top to bottom.

A custom loop with `strategy.run` (not `model.fit`, which Keras 3 does not
support under MultiWorkerMirrored or ParameterServer strategies), so the same
code runs on one device, several GPUs, several hosts and TPUs. The stage
order, `--mode` and exports are in `stages.py`; restoring and preemption in
`checkpoints.py`; evaluation in `evaluate.py`; paths in `workdir.py`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Optional

from absl import logging
import keras
import tensorflow as tf

from trainer import checkpoints
from trainer import distribute
from trainer import evaluate
from trainer import input_pipeline
from trainer import losses
from trainer import models
from trainer import optimization
from trainer import progress as progress_lib
from trainer import workdir

if TYPE_CHECKING:
  from trainer.config import Config
  from trainer.workdir import Run


class NonFiniteLossError(FloatingPointError):
  """Training diverged; the latest checkpoint on disk is the last good one."""


@dataclasses.dataclass
class StageResult:
  stage: str
  step: int
  metrics: dict
  preempted: bool = False
  model: Optional[keras.Model] = None  # the trained network (not serialised)


def stage_loss(config: "Config", stage: str):
  """Per-example loss fn(target, prediction, mask) -> [B]."""
  if stage == "gradient":
    return losses.get_loss("mse")  # the seed's loss on Sobel edges
  return losses.get_loss(config.loss, gradient_matching_weight=config.gradient_matching_weight)


def build_stage_model(config: "Config", stage: str, restore_gradient: bool = True,
                      initial_depth: Optional[float] = None) -> keras.Model:
  """Builds the stage's network in the current (strategy) scope; for finetune,
  with the trained gradient network restored inside it."""
  model = models.build_stage_network(stage, config.architecture, config.image_size,
                                     config.freeze_gradient, initial_depth)
  if stage == "finetune" and restore_gradient:
    checkpoints.restore_gradient_network(config, models.gradient_subnetwork(model))
  return model


def build_model_and_optimizer(config: "Config", stage: str, strategy: tf.distribute.Strategy,
                              policy: str, initial_depth: Optional[float] = None):
  """The stage's network and its Adam (loss-scaled for float16), in the strategy's scope."""
  with strategy.scope():
    model = build_stage_model(config, stage, initial_depth=initial_depth)
    schedule = optimization.learning_rate_schedule(
        config.learning_rate, config.train_steps, config.lr_schedule, config.warmup_steps)
    optimizer = optimization.make_optimizer(schedule, policy)
    optimizer.build(model.trainable_variables)
  return model, optimizer


def make_train_loop(strategy: tf.distribute.Strategy, model: keras.Model,
                    optimizer: keras.optimizers.Optimizer, loss_fn, global_batch_size: int,
                    jit_compile: bool = False):
  """`train_loop(iterator, num_steps) -> mean loss`: the distributed train step,
  `num_steps` of them per tf.function call (host round trips are costly on TPU).

  The per-example loss is averaged over the GLOBAL batch on each replica, and
  the Keras 3 optimizer sums the replicas' gradients: one step on N replicas is
  one step on one device with the same global batch. `jit_compile` compiles the
  step with XLA (the benchmark measures it; Keras' own "auto" leaves XLA off
  under a strategy).
  """

  def step_fn(batch):
    with tf.GradientTape() as tape:
      prediction = model(batch["image"], training=True)
      per_example = loss_fn(batch["target"], prediction, batch["target_mask"])
      loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
      scaled = optimizer.scale_loss(loss)  # loss scaling for float16, identity otherwise
    grads = tape.gradient(scaled, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))  # all-reduces
    return loss

  if jit_compile:
    step_fn = tf.function(step_fn, jit_compile=True)

  @tf.function
  def train_loop(iterator, num_steps):
    total = tf.constant(0.0)
    for _ in tf.range(num_steps):
      per_replica = strategy.run(step_fn, args=(next(iterator),))
      total += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    return total / tf.cast(num_steps, tf.float32)

  return train_loop


def steps_until_boundary(step: int, config: "Config") -> int:
  """Steps for the next tf.function call: stop on every log/checkpoint/eval step."""
  intervals = [config.log_every_steps, config.checkpoint_every_steps]
  if config.eval_every_steps:
    intervals.append(config.eval_every_steps)
  next_stop = min([config.train_steps] + [(step // n + 1) * n for n in intervals])
  return max(1, min(config.steps_per_loop, next_stop - step))


def _initial_depth(run: "Run", stage: str, resuming: bool) -> Optional[float]:
  """A fresh rough (or scratch finetune) net starts its output at the training
  median depth; resumed and rough-initialised networks keep their weights."""
  config = run.config
  if resuming or not (stage == "rough" or (stage == "finetune"
                                           and config.finetune_init == "scratch")):
    return None
  depth = input_pipeline.training_median_depth(config, run.builder)
  logging.info("%s: the output layer starts at the training median depth, %.3f m", stage, depth)
  return depth


def train_stage(run: "Run", stage: str) -> StageResult:
  config, strategy = run.config, run.strategy
  ckpt_dir = workdir.checkpoint_dir(config, stage)

  # --- Data.
  train_ds = strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(config, stage, run.builder, ctx))

  # --- Model, optimizer, checkpoint: resume, or start as the stage says.
  resuming = bool(checkpoints.checkpoint_paths(ckpt_dir))  # always the chief's copy
  model, optimizer = build_model_and_optimizer(config, stage, strategy, run.policy,
                                               _initial_depth(run, stage, resuming))
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
  write_dir = distribute.worker_write_dir(ckpt_dir, strategy)
  manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=config.keep_checkpoints)
  latest = checkpoints.restore_newest_readable(checkpoint, ckpt_dir, config) if resuming else None
  if latest:
    # A stable line (README "Log lines").
    logging.info("%s: resumed from %s at step %d", stage, latest, int(optimizer.iterations))
  elif stage == "finetune" and config.finetune_init == "rough":
    checkpoints.init_finetune_from_rough(config, strategy, model)
  step = int(optimizer.iterations.numpy())
  global_batch = config.global_batch_size
  train_loop = make_train_loop(strategy, model, optimizer, stage_loss(config, stage),
                               global_batch)

  def save(reason: str) -> None:
    path = manager.save(checkpoint_number=optimizer.iterations)
    if not run.is_chief:
      tf.io.gfile.rmtree(os.path.dirname(write_dir))  # only the chief's copy is kept
    elif path:
      logging.info("%s: saved checkpoint %s (%s)", stage, path, reason)

  # --- Train.
  writer = workdir.summary_writer(run, stage)
  preempted = False
  if step < config.train_steps:
    preemption = checkpoints.make_preemption_handler(strategy, manager)
    iterator = iter(train_ds)
    # Rate from the first call on: it includes tf.function tracing.
    # Logs every --log_every_steps only (force=); rate from the first call on,
    # since that one includes tf.function tracing.
    progress = progress_lib.Progress(stage, config.train_steps, unit="steps", start=step,
                                     every_seconds=math.inf, start_at_first_update=True)
    with checkpoints.SigtermFlag() as sigterm, writer.as_default():
      while step < config.train_steps:
        num_steps = steps_until_boundary(step, config)
        if preemption is not None:
          loss = preemption.run(train_loop, iterator, tf.constant(num_steps))
        else:
          loss = train_loop(iterator, tf.constant(num_steps))
        loss = float(loss)
        if not math.isfinite(loss):
          latest_good = tf.train.latest_checkpoint(ckpt_dir) or "no checkpoint yet"
          raise NonFiniteLossError(
              f"{stage}: loss became {loss} in steps {step + 1}..{step + num_steps}; "
              f"stopped without saving. The last good checkpoint stays the latest: "
              f"{latest_good}. Lower --learning_rate or check the data.")
        step += num_steps
        logged = step % config.log_every_steps == 0 or step == config.train_steps
        progress.update(step, force=logged, suffix=f"loss {loss:.5f}")
        if logged:
          examples_per_second = progress.rate * global_batch
          tf.summary.scalar("train/loss", loss, step=step)
          tf.summary.scalar("train/learning_rate", optimization.current_learning_rate(optimizer),
                            step=step)
          tf.summary.scalar("train/examples_per_second", examples_per_second, step=step)
        if step % config.checkpoint_every_steps == 0 or step == config.train_steps:
          save("interval" if step < config.train_steps else "end of training")
        if sigterm.received:
          if step % config.checkpoint_every_steps:
            save("SIGTERM")
          preempted = True
          logging.warning("%s: stopped by SIGTERM at step %d; rerun to resume.", stage, step)
          break
        if (config.eval_every_steps and step % config.eval_every_steps == 0
            and step < config.train_steps and config.mode == "train_and_eval"):
          evaluate.evaluate_stage(run, stage, model, step, writer)
    writer.flush()
  else:
    logging.info("%s: already trained to step %d; nothing to train.", stage, step)

  # A stable line (README "Log lines"): workers of one run must print the same value.
  logging.info("%s: weights fingerprint at step %d: %.8e (equal on every worker)", stage, step,
               checkpoints.weights_fingerprint(model))

  # --- Evaluate.
  result_metrics = {}
  if not preempted and config.mode in ("train_and_eval", "eval"):
    result_metrics = evaluate.evaluate_stage(run, stage, model, step, writer)
  return StageResult(stage, step, result_metrics, preempted, model=model)
