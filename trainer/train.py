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

from trainer import augmentation
from trainer import backbones
from trainer import checkpoints
from trainer import distribute
from trainer import errors
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


def stage_network(config: "Config", stage: str, initial_depth: Optional[float] = None,
                  load_encoder_weights: bool = False) -> keras.Model:
  """The stage's network as `config` defines it, fresh (no checkpoint restored).

  A backbone's BatchNorm mode follows --encoder_weights whether or not the
  weights are loaded (`load_encoder_weights`: only a stage that starts from
  nothing loads them; a resumed or transferred one restores its own).
  """
  freeze_bn = None
  if config.architecture in backbones.ARCHITECTURES:
    freeze_bn = backbones.resolve_freeze_batch_norm(config.encoder_weights)
  return models.build_stage_network(
      stage, config.architecture, config.image_size, config.freeze_gradient, initial_depth,
      encoder_weights=config.encoder_weights if load_encoder_weights else None,
      freeze_encoder_batch_norm=freeze_bn)


def build_stage_model(config: "Config", stage: str, restore_gradient: bool = True,
                      initial_depth: Optional[float] = None,
                      load_encoder_weights: bool = False) -> keras.Model:
  """Builds the stage's network in the current (strategy) scope; for finetune,
  with the trained gradient network restored inside it."""
  model = stage_network(config, stage, initial_depth, load_encoder_weights)
  if stage == "finetune" and restore_gradient:
    checkpoints.restore_gradient_network(config, models.gradient_subnetwork(model))
  return model


def build_model_and_optimizer(config: "Config", stage: str, strategy: tf.distribute.Strategy,
                              policy: str, initial_depth: Optional[float] = None,
                              load_encoder_weights: bool = False):
  """The stage's network and its optimizers, in the strategy's scope.

  optimizers: (main, encoder): Adam (loss-scaled for float16) for every
  trainable variable, or, for a backbone with
  --encoder_learning_rate_multiplier != 1, the main one for all but the
  encoder and a second Adam at the multiplied rate for the encoder (Adam is
  invariant to scaling the gradient, so the rate itself must differ).
  """
  with strategy.scope():
    model = build_stage_model(config, stage, initial_depth=initial_depth,
                              load_encoder_weights=load_encoder_weights)
    schedule = optimization.learning_rate_schedule(
        config.learning_rate, config.train_steps, config.lr_schedule, config.warmup_steps)
    optimizer = optimization.make_optimizer(schedule, policy)
    encoder = models.encoder_variables(model)
    encoder_optimizer = None
    if encoder and config.encoder_learning_rate_multiplier != 1.0:
      if policy == "mixed_float16":
        raise errors.UserInputError(
            "--encoder_learning_rate_multiplier with --mixed_precision=mixed_float16 is not "
            "supported (two loss scales); use mixed_bfloat16 or float32, or a multiplier of 1")
      encoder_optimizer = optimization.make_optimizer(optimization.learning_rate_schedule(
          config.learning_rate * config.encoder_learning_rate_multiplier, config.train_steps,
          config.lr_schedule, config.warmup_steps), policy)
      encoder_ids = {id(v) for v in encoder}
      optimizer.build([v for v in model.trainable_variables if id(v) not in encoder_ids])
      encoder_optimizer.build(encoder)
    else:
      optimizer.build(model.trainable_variables)
  return model, optimizer, encoder_optimizer


def make_train_loop(strategy: tf.distribute.Strategy, model: keras.Model,
                    optimizer: keras.optimizers.Optimizer, loss_fn, global_batch_size: int,
                    stage: str, jit_compile: bool = False, encoder_optimizer=None,
                    train_encoder: bool = True):
  """`train_loop(iterator, num_steps) -> mean loss`: the distributed train step,
  `num_steps` of them per tf.function call (host round trips are costly on TPU).

  The per-example loss is averaged over the GLOBAL batch on each replica, and
  the Keras 3 optimizer sums the replicas' gradients: one step on N replicas is
  one step on one device with the same global batch. `jit_compile` compiles the
  step with XLA (the benchmark measures it; Keras' own "auto" leaves XLA off
  under a strategy). `train_encoder=False` leaves a backbone's encoder out of
  the update (--freeze_encoder_steps); `encoder_optimizer` updates the encoder
  at its own rate (--encoder_learning_rate_multiplier). A batch carrying
  augmentation draws (--augment_on=device) is finished first, in the step:
  augmented, masked and given `stage`'s target (input_pipeline.finish_batch).
  """
  encoder_ids = {id(v) for v in models.encoder_variables(model)}
  rest = [v for v in model.trainable_variables if id(v) not in encoder_ids]
  encoder = [v for v in model.trainable_variables if id(v) in encoder_ids]
  if encoder_optimizer is None:
    groups = [(optimizer, rest + encoder if train_encoder else rest)]
  else:
    groups = [(optimizer, rest)] + ([(encoder_optimizer, encoder)] if train_encoder else [])
  variables = [v for _, group in groups for v in group]

  def step_fn(batch):
    if augmentation.PARAMS in batch:  # --augment_on=device: here, on the accelerator
      batch = input_pipeline.finish_batch(batch, stage)
    with tf.GradientTape() as tape:
      prediction = model(batch["image"], training=True)
      per_example = loss_fn(batch["target"], prediction, batch["target_mask"])
      loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
      scaled = optimizer.scale_loss(loss)  # loss scaling for float16, identity otherwise
    grads = iter(tape.gradient(scaled, variables))
    for opt, group in groups:
      opt.apply_gradients(zip([next(grads) for _ in group], group))  # all-reduces
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
  stops = [config.train_steps] + [(step // n + 1) * n for n in intervals]
  if step < config.freeze_encoder_steps:  # the encoder starts to train there
    stops.append(config.freeze_encoder_steps)
  next_stop = min(stops)
  return max(1, min(config.steps_per_loop, next_stop - step))


def _initial_depth(run: "Run", stage: str) -> Optional[float]:
  """A fresh rough (or scratch finetune) net starts its output at the training
  median depth; the gradient net predicts edges, not depth."""
  if stage == "gradient":
    return None
  depth = input_pipeline.training_median_depth(run.config, run.builder)
  logging.info("%s: the output layer starts at the training median depth, %.3f m", stage, depth)
  return depth


def _how_to_start(config: "Config", stage: str, ckpt_dir: str) -> str:
  """resume (own checkpoint), init_from (--init_from), rough (finetune from this
  run's rough net) or fresh (initial depth; encoder weights loaded)."""
  if checkpoints.checkpoint_paths(ckpt_dir):  # always the chief's copy
    return "resume"
  if config.init_from and stage in config.init_from_stages:
    return "init_from"
  if stage == "finetune" and config.finetune_init == "rough":
    return "rough"
  return "fresh"


def preflight(config: "Config", stages) -> None:
  """What training `stages` will read from outside --model_dir, checked before
  anything is written: --init_from's checkpoints and --encoder_weights (the
  encoder is built once and the weights loaded into it)."""
  weights_checked = False
  for stage in stages:
    start = _how_to_start(config, stage, workdir.checkpoint_dir(config, stage))
    if start == "init_from":
      checkpoints.init_from_dir(config, stage)
    if (start == "fresh" and not weights_checked and config.architecture in backbones.ARCHITECTURES
        and backbones.normalize_encoder_weights(config.encoder_weights) is not None):
      backbones.load_encoder_weights(backbones.build_backbone(config.architecture),
                                     config.architecture, config.encoder_weights)
      weights_checked = True


def train_stage(run: "Run", stage: str) -> StageResult:
  config, strategy = run.config, run.strategy
  ckpt_dir = workdir.checkpoint_dir(config, stage)

  # --- Data.
  train_ds = strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(config, stage, run.builder, ctx))

  # --- Model, optimizer, checkpoint: resume, or start as the stage says.
  start = _how_to_start(config, stage, ckpt_dir)
  model, optimizer, encoder_optimizer = build_model_and_optimizer(
      config, stage, strategy, run.policy,
      initial_depth=_initial_depth(run, stage) if start == "fresh" else None,
      load_encoder_weights=start == "fresh")
  optimizers = {"optimizer": optimizer}
  if encoder_optimizer is not None:
    optimizers["encoder_optimizer"] = encoder_optimizer
  checkpoint = tf.train.Checkpoint(model=model, **optimizers)
  write_dir = distribute.worker_write_dir(ckpt_dir, strategy)
  manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=config.keep_checkpoints)
  if start == "resume":
    latest = checkpoints.restore_newest_readable(checkpoint, ckpt_dir, config)
    # A stable line (README "Log lines").
    logging.info("%s: resumed from %s at step %d", stage, latest, int(optimizer.iterations))
  elif start == "init_from":
    with strategy.scope():
      checkpoints.init_from_run(config, stage, model)
      if stage == "finetune":  # its gradient net is this run's, not the other run's
        checkpoints.restore_gradient_network(config, models.gradient_subnetwork(model))
  elif start == "rough":
    if config.init_from:
      logging.info("%s: starts from this run's rough net, not --init_from (%s is not in "
                   "--init_from_stages=%s)", stage, stage, ",".join(config.init_from_stages))
    with strategy.scope():
      checkpoints.init_finetune_from_rough(config, model, stage_network(config, "rough"))
  step = int(optimizer.iterations.numpy())
  global_batch = config.global_batch_size
  loss_fn = stage_loss(config, stage)
  loops = {}

  def train_loop_at(step: int):
    """The train loop of this step: with or without the encoder (--freeze_encoder_steps)."""
    train_encoder = step >= config.freeze_encoder_steps
    if train_encoder not in loops:
      if not train_encoder:
        logging.info("%s: the encoder stays fixed until step %d (--freeze_encoder_steps)",
                     stage, config.freeze_encoder_steps)
      loops[train_encoder] = make_train_loop(strategy, model, optimizer, loss_fn, global_batch,
                                             stage, encoder_optimizer=encoder_optimizer,
                                             train_encoder=train_encoder)
    return loops[train_encoder]

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
        train_loop = train_loop_at(step)
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
