"""The training loop: one `train_and_evaluate(config)`, read top to bottom.

A custom loop with `strategy.run` (not `model.fit`, which Keras 3 does not
support under MultiWorkerMirrored or ParameterServer strategies), so the same
code runs on one device, several GPUs, several hosts and TPUs.

The workdir is the source of truth: `<model_dir>/config.json` says what ran;
each stage keeps its checkpoints in `<model_dir>/<stage>/checkpoints` and a
rerun resumes from the latest one.
"""

import dataclasses
import io
import json
import math
import os
import signal
import time
from typing import Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import depth_ops
from trainer import distribute
from trainer import export as export_lib
from trainer import input_pipeline
from trainer import losses
from trainer import metrics as metrics_lib
from trainer import models
from trainer import precision
from trainer import report
from trainer.config import Config

# --stage=all. Finetune needs the gradient net, and (--finetune_init=rough) the rough net.
STAGE_ORDER = ("rough", "gradient", "finetune")


class NonFiniteLossError(FloatingPointError):
  """Training diverged; the latest checkpoint on disk is the last good one."""


@dataclasses.dataclass
class StageResult:
  stage: str
  step: int
  metrics: dict
  preempted: bool = False
  model: Optional[keras.Model] = None  # the trained network (not serialised)


# ----------------------------------------------------------------------------
# Run set-up shared by every stage.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  config: Config
  strategy: tf.distribute.Strategy
  policy: str
  is_chief: bool
  builder: object  # tfds.core.DatasetBuilder


def setup_run(config: Config) -> Run:
  """Strategy, precision, dataset and the resolved config file."""
  strategy = distribute.get_distribution_strategy(
      config.strategy, num_devices=config.num_devices, tpu=config.tpu)
  policy = precision.resolve_policy(config.mixed_precision, strategy)
  precision.set_global_policy(policy)
  keras.utils.set_random_seed(config.seed)
  info = distribute.describe(strategy)
  per_replica = distribute.replica_batch_size(config.global_batch_size, info["replicas"])
  is_chief = info["chief"]
  builder = input_pipeline.prepare_dataset(config, may_build=is_chief)
  num_train = input_pipeline.num_examples(builder, "train")
  logging.info(
      "strategy=%s replicas=%d workers=%d chief=%s precision=%s | global batch %d = "
      "%d per replica | %d steps per stage = %.1f epochs of %d training examples | "
      "image %dx%d, architecture %s",
      info["strategy"], info["replicas"], info["workers"], is_chief, policy,
      config.global_batch_size, per_replica, config.train_steps,
      config.train_steps * config.global_batch_size / max(1, num_train), num_train,
      *config.image_size, config.architecture)
  if is_chief:
    tf.io.gfile.makedirs(config.model_dir)
    with tf.io.gfile.GFile(os.path.join(config.model_dir, "config.json"), "w") as f:
      f.write(config.to_json())
  return Run(config, strategy, policy, is_chief, builder)


def stages_to_run(stage: str) -> tuple:
  return STAGE_ORDER if stage == "all" else (stage,)


def checkpoint_dir(config: Config, stage: str) -> str:
  base = config.checkpoint_dir
  return f"{base.rstrip('/')}/{stage}" if base else f"{config.stage_dir(stage)}/checkpoints"


def tensorboard_dir(config: Config, stage: str) -> str:
  base = config.tensorboard_dir
  return f"{base.rstrip('/')}/{stage}" if base else f"{config.stage_dir(stage)}/tensorboard"


def summary_writer(run: Run, stage: str):
  """TensorBoard writer of the stage: the chief's only, a no-op elsewhere."""
  if run.is_chief:
    return tf.summary.create_file_writer(tensorboard_dir(run.config, stage))
  return tf.summary.create_noop_writer()


def learning_rate_schedule(config: Config):
  peak, steps = config.learning_rate, config.train_steps
  if config.lr_schedule == "constant":
    return peak
  if config.lr_schedule == "cosine":
    return keras.optimizers.schedules.CosineDecay(peak, decay_steps=steps, alpha=0.01)
  warmup = min(config.warmup_steps, steps - 1)
  return keras.optimizers.schedules.CosineDecay(
      0.0, decay_steps=max(1, steps - warmup), alpha=0.01,
      warmup_target=peak, warmup_steps=warmup)


def stage_loss(config: Config, stage: str):
  """Per-example loss fn(target, prediction, mask) -> [B]."""
  if stage == "gradient":
    return losses.get_loss("mse")  # the seed's loss on Sobel edges
  return losses.get_loss(config.loss, gradient_matching_weight=config.gradient_matching_weight)


# ----------------------------------------------------------------------------
# Models, with the gradient net restored for the finetune stage.
# ----------------------------------------------------------------------------
def build_stage_model(config: Config, stage: str, restore_gradient: bool = True,
                      initial_depth: Optional[float] = None) -> keras.Model:
  """Builds the stage's network in the current (strategy) scope."""
  model = models.build_stage_network(stage, config.architecture, config.image_size,
                                     config.freeze_gradient, initial_depth)
  if stage == "finetune" and restore_gradient:
    restore_gradient_network(config, models.gradient_subnetwork(model))
  return model


def build_model_and_optimizer(config: Config, stage: str, strategy: tf.distribute.Strategy,
                              policy: str, initial_depth: Optional[float] = None):
  """The stage's network and its Adam (loss-scaled for float16), in the strategy's scope."""
  with strategy.scope():
    model = build_stage_model(config, stage, initial_depth=initial_depth)
    optimizer = precision.wrap_optimizer(
        keras.optimizers.Adam(learning_rate_schedule(config)), policy)
    optimizer.build(model.trainable_variables)
  return model, optimizer


def init_finetune_from_rough(config: Config, strategy: tf.distribute.Strategy,
                             model: keras.Model) -> None:
  """A fresh finetune run starts from the rough stage's latest checkpoint."""
  directory = checkpoint_dir(config, "rough")
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


def restore_gradient_network(config: Config, network: keras.Model) -> None:
  directory = checkpoint_dir(config, "gradient")
  latest = tf.train.latest_checkpoint(directory)
  if latest is None:
    raise FileNotFoundError(
        f"--stage=finetune needs a trained gradient network, but {directory} has no "
        "checkpoint. Run --stage=gradient first with the same --model_dir (or --stage=all).")
  tf.train.Checkpoint(model=network).restore(latest).expect_partial().assert_existing_objects_matched()
  logging.info("finetune: restored the gradient network from %s (%s)", latest,
               "frozen" if config.freeze_gradient else "trainable")


# ----------------------------------------------------------------------------
# Preemption: SIGTERM saves a checkpoint and ends the run cleanly.
# ----------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------
# One stage: data, model, restore, train, evaluate.
# ----------------------------------------------------------------------------
def train_stage(run: Run, stage: str) -> StageResult:
  config, strategy = run.config, run.strategy
  ckpt_dir = checkpoint_dir(config, stage)

  # --- Data.
  train_ds = strategy.distribute_datasets_from_function(
      lambda ctx: input_pipeline.train_dataset(config, stage, run.builder, ctx))

  # --- Model, optimizer, checkpoint.
  latest = tf.train.latest_checkpoint(ckpt_dir)  # always resume from the chief's copy
  initial_depth = None
  if latest is None and (stage == "rough" or (stage == "finetune"
                                              and config.finetune_init == "scratch")):
    initial_depth = input_pipeline.training_median_depth(config, run.builder)
    logging.info("%s: the output layer starts at the training median depth, %.3f m",
                 stage, initial_depth)
  model, optimizer = build_model_and_optimizer(config, stage, strategy, run.policy,
                                               initial_depth)
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
  write_dir = distribute.worker_write_dir(ckpt_dir, strategy)
  manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=config.keep_checkpoints)
  if latest:
    restore_or_explain(checkpoint, latest, config)
    logging.info("%s: resumed from %s at step %d", stage, latest, int(optimizer.iterations))
  elif stage == "finetune" and config.finetune_init == "rough":
    init_finetune_from_rough(config, strategy, model)
  step = int(optimizer.iterations.numpy())
  loss_fn = stage_loss(config, stage)
  global_batch = config.global_batch_size

  def save(reason: str) -> None:
    path = manager.save(checkpoint_number=optimizer.iterations)
    if not run.is_chief:
      tf.io.gfile.rmtree(os.path.dirname(write_dir))  # only the chief's copy is kept
    elif path:
      logging.info("%s: saved checkpoint %s (%s)", stage, path, reason)

  train_loop = make_train_loop(strategy, model, optimizer, loss_fn, global_batch)

  # --- Train.
  writer = summary_writer(run, stage)
  preempted = False
  if step < config.train_steps:
    preemption = make_preemption_handler(strategy, manager)
    iterator = iter(train_ds)
    progress = Progress(stage, step, config.train_steps, global_batch)
    with SigtermFlag() as sigterm, writer.as_default():
      while step < config.train_steps:
        num_steps = steps_until_boundary(step, config)
        if preemption is not None:
          loss = preemption.run(train_loop, iterator, tf.constant(num_steps))
        else:
          loss = train_loop(iterator, tf.constant(num_steps))
        loss = float(loss)
        if not math.isfinite(loss):
          raise NonFiniteLossError(
              f"{stage}: loss became {loss} in steps {step + 1}..{step + num_steps}; "
              f"stopped without saving. The last good checkpoint stays the latest: "
              f"{tf.train.latest_checkpoint(ckpt_dir)}. Lower --learning_rate or check the data.")
        step += num_steps
        progress.update(step, loss)
        if step % config.log_every_steps == 0 or step == config.train_steps:
          progress.log(step, loss)
          tf.summary.scalar("train/loss", loss, step=step)
          tf.summary.scalar("train/learning_rate", _current_lr(optimizer), step=step)
          tf.summary.scalar("train/examples_per_second", progress.examples_per_second, step=step)
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
          evaluate_stage(run, stage, model, step, writer)
    writer.flush()
  else:
    logging.info("%s: already trained to step %d; nothing to train.", stage, step)

  logging.info("%s: weights fingerprint at step %d: %.8e (equal on every worker)", stage, step,
               weights_fingerprint(model))

  # --- Evaluate.
  result_metrics = {}
  if not preempted and config.mode in ("train_and_eval", "eval"):
    result_metrics = evaluate_stage(run, stage, model, step, writer)
  return StageResult(stage, step, result_metrics, preempted, model=model)


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


def restore_or_explain(checkpoint: tf.train.Checkpoint, path: str, config: Config,
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


def weights_fingerprint(model: keras.Model) -> float:
  """A cheap summary of all weights, logged so workers can be compared."""
  return float(sum(np.abs(w.numpy().astype(np.float64)).sum() for w in model.weights))


def steps_until_boundary(step: int, config: Config) -> int:
  """Steps for the next tf.function call: stop on every log/checkpoint/eval step."""
  intervals = [config.log_every_steps, config.checkpoint_every_steps]
  if config.eval_every_steps:
    intervals.append(config.eval_every_steps)
  next_stop = min([config.train_steps] + [(step // n + 1) * n for n in intervals])
  return max(1, min(config.steps_per_loop, next_stop - step))


def _current_lr(optimizer) -> float:
  lr = optimizer.learning_rate
  return float(lr.numpy() if hasattr(lr, "numpy") else lr)


class Progress:
  """examples/s and time left, from the wall clock since the stage (re)started."""

  def __init__(self, stage: str, start_step: int, total_steps: int, global_batch: int):
    self.stage, self.start_step, self.total = stage, start_step, total_steps
    self.global_batch = global_batch
    self.start_time = time.time()
    self.examples_per_second = 0.0
    self._first = None  # (time, step) after the first call: excludes tracing time

  def update(self, step: int, loss: float) -> None:
    del loss
    now = time.time()
    if self._first is None:
      self._first = (now, step)
      return
    t0, s0 = self._first
    if now > t0 and step > s0:
      self.examples_per_second = (step - s0) * self.global_batch / (now - t0)

  def log(self, step: int, loss: float) -> None:
    left = (self.total - step) * self.global_batch / self.examples_per_second if (
        self.examples_per_second) else float("nan")
    logging.info("%s step %d/%d (%.0f%%) loss %.5f | %.1f examples/s | %s left",
                 self.stage, step, self.total, 100.0 * step / self.total, loss,
                 self.examples_per_second, format_seconds(left))


def format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# ----------------------------------------------------------------------------
# Evaluation: every metric of SPEC.md on the eval split.
# ----------------------------------------------------------------------------
def evaluate_stage(run: Run, stage: str, model: keras.Model, step: int, writer) -> dict:
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
  samples = {"image": [], "depth": [], "prediction": []}
  start = time.time()
  for batch in eval_ds:
    out = {k: v.numpy() for k, v in eval_step(batch).items()}
    per_image = {k: v for k, v in out.items() if k not in samples}
    sums = metrics_lib.accumulate(sums, per_image)
    real = per_image["num_valid"] > 0  # padding examples have no valid pixel
    have = sum(len(s) for s in samples["image"])
    take = max(0, config.num_image_summaries - have)
    for k in samples:
      samples[k].append(out[k][real][:take])
  result = metrics_lib.finalize(sums)
  result["step"] = step
  logging.info("%s eval on %s (%d images, %.1fs): %s", stage, config.eval_split,
               result.get("num_images", 0), time.time() - start,
               ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())
                         if isinstance(v, float)))
  if run.is_chief:
    samples = {k: np.concatenate(v)[:config.num_image_summaries] for k, v in samples.items()}
    write_eval_outputs(config, stage, result, samples, step, writer)
  return result


def write_eval_outputs(config: Config, stage: str, result: dict, samples: dict,
                       step: int, writer) -> None:
  stage_dir = config.stage_dir(stage)
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
      # One colour scale per example, shared by ground truth and prediction.
      tiles = []
      for image, depth, prediction in zip(samples["image"], samples["depth"], samples["prediction"]):
        valid = depth[depth > 0]
        vmin, vmax = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)
        if stage == "gradient":
          vmin, vmax = 0.0, float(max(prediction.max(), 1e-6))
          depth = None
        row = [np.round(image * 255).astype(np.uint8)]
        if depth is not None:
          row.append(depth_ops.colourize(depth[..., 0], vmin, vmax))
        row.append(depth_ops.colourize(prediction[..., 0], vmin, vmax))
        tiles.append(np.concatenate(row, axis=1))
      tf.summary.image("eval/rgb_truth_prediction", np.stack(tiles), step=step,
                       max_outputs=len(tiles))
  writer.flush()


# ----------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------
def train_and_evaluate(config: Config) -> dict:
  """Trains (and evaluates) each requested stage; returns {stage: StageResult}."""
  run = setup_run(config)
  results = {}
  for stage in stages_to_run(config.stage):
    if config.mode == "eval":
      results[stage] = evaluate_only(run, stage)
      continue
    if config.mode == "export":
      model, step = restore_stage_model(run, stage)
      results[stage] = StageResult(stage, step, {}, model=model)
      continue
    results[stage] = train_stage(run, stage)
    if results[stage].preempted:
      return results
  if config.mode != "eval" and run.is_chief:
    export_stages(config, results)
  if config.stage == "all" and config.mode == "train_and_eval" and run.is_chief:
    # The demo chain: metrics table + comparison grid, then predict as a user would.
    report.write_report(config, run.builder, {s: r.metrics for s, r in results.items()})
    report.predict_test_images(config, run.builder, f"{config.model_dir.rstrip('/')}/export")
  return results


def export_stages(config: Config, results: dict) -> None:
  """Each depth stage to <model_dir>/<stage>/export; the best chain to <model_dir>/export.

  The best chain is finetune when it ran (it contains the gradient net), else rough.
  """
  for stage, result in results.items():
    if stage != "gradient":
      export_lib.export_saved_model(config, stage, result.model, f"{config.stage_dir(stage)}/export")
  main_stage = "finetune" if "finetune" in results else "rough" if "rough" in results else None
  if main_stage:
    export_lib.export_saved_model(config, main_stage, results[main_stage].model,
                                  f"{config.model_dir.rstrip('/')}/export")


def restore_stage_model(run: Run, stage: str):
  """The stage's network with its latest checkpoint's weights: (model, step)."""
  ckpt_dir = checkpoint_dir(run.config, stage)
  latest = tf.train.latest_checkpoint(ckpt_dir)
  if latest is None:
    raise FileNotFoundError(
        f"--mode={run.config.mode}: {ckpt_dir} has no checkpoint for stage {stage!r}; "
        "train it first (--mode=train or train_and_eval)")
  with run.strategy.scope():
    model = build_stage_model(run.config, stage, restore_gradient=False)
  restore_or_explain(tf.train.Checkpoint(model=model), latest, run.config, model_only=True)
  return model, int(latest.rsplit("-", 1)[-1])


def evaluate_only(run: Run, stage: str) -> StageResult:
  model, step = restore_stage_model(run, stage)
  writer = summary_writer(run, stage)
  return StageResult(stage, step, evaluate_stage(run, stage, model, step, writer), model=model)
