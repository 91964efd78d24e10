"""The stage chain and `--mode`: `train_and_evaluate(config)` is the whole run.

--stage=all trains rough, gradient, then finetune (finetune needs the
gradient net and, with --finetune_init=rough, the rough net), exports the
depth stages and writes the report. --mode picks train, eval (the latest
checkpoints), train_and_eval, or export (the latest checkpoints).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from absl import logging

from trainer import checkpoints
from trainer import evaluate
from trainer import export as export_lib
from trainer import models
from trainer import report
from trainer import train
from trainer import workdir

if TYPE_CHECKING:
  from trainer.config import Config

STAGE_ORDER = models.STAGES  # rough, gradient, finetune: each needs the ones before
ALL = "all"
STAGE_CHOICES = STAGE_ORDER + (ALL,)
MODES = ("train", "eval", "train_and_eval", "export")


def stages_to_run(stage: str) -> tuple:
  return STAGE_ORDER if stage == ALL else (stage,)


def train_and_evaluate(config: "Config") -> dict:
  """Trains (and evaluates) each requested stage; returns {stage: StageResult}."""
  training = config.mode in ("train", "train_and_eval")
  run = workdir.setup_run(config, stages_to_run(config.stage) if training else (),
                          preflight=train.preflight)
  try:
    return _run_stages(run)
  finally:
    workdir.release(run)


def _run_stages(run: workdir.Run) -> dict:
  config = run.config
  results = {}
  for stage in stages_to_run(config.stage):
    if config.mode == "eval":
      results[stage] = evaluate_only(run, stage)
      continue
    if config.mode == "export":
      model, step = restore_stage_model(run, stage)
      results[stage] = train.StageResult(stage, step, {}, model=model)
      continue
    results[stage] = train.train_stage(run, stage)
    if results[stage].preempted:
      return results
  if config.mode != "eval" and run.is_chief:
    if config.export:
      export_stages(config, results, run.builder)
    else:
      logging.info("--noexport: no SavedModel written; checkpoints and metrics are in %s",
                   config.model_dir)
  if config.stage == ALL and config.mode == "train_and_eval" and run.is_chief:
    # The demo chain: metrics table + comparison figure, then predict as a user would.
    report.write_report(config, run.builder, {s: r.metrics for s, r in results.items()})
    if config.export:
      report.predict_test_images(config, run.builder, workdir.export_dir(config))
  return results


def export_stages(config: "Config", results: dict, builder) -> None:
  """Each depth stage to <model_dir>/<stage>/export; the best chain to <model_dir>/export.

  The best chain is finetune when it ran (it contains the gradient net), else rough
  unless this --model_dir already has a finetune net.
  """
  for stage, result in results.items():
    if stage != "gradient":
      export_lib.export_saved_model(config, stage, result.model,
                                    workdir.export_dir(config, stage))
  main_stage = "finetune" if "finetune" in results else "rough" if "rough" in results else None
  if main_stage == "rough" and checkpoints.checkpoint_paths(
      workdir.checkpoint_dir(config, "finetune")):
    # A rerun of rough alone must not replace the finetune chain of an earlier run.
    logging.info("%s holds the finetune chain of an earlier run: left as it is (rough's own "
                 "export is in %s)", workdir.export_dir(config), workdir.export_dir(config, "rough"))
    main_stage = None
  if main_stage:
    # The stage's own export, written above: copied, not traced a second time.
    export_lib.copy_export(workdir.export_dir(config, main_stage), workdir.export_dir(config))
    if config.tflite:
      export_lib.export_tflite(config, main_stage, results[main_stage].model, builder,
                               workdir.export_dir(config))


def restore_stage_model(run: workdir.Run, stage: str):
  """The stage's network with its latest checkpoint's weights: (model, step)."""
  with run.strategy.scope():
    model = train.build_stage_model(run.config, stage, restore_gradient=False)
  latest = checkpoints.restore_stage_weights(
      run.config, stage, model,
      f"--mode={run.config.mode}: {{directory}} has no checkpoint for stage {stage!r}; "
      "train it first (--mode=train or train_and_eval)")
  return model, checkpoints.checkpoint_step(latest)


def evaluate_only(run: workdir.Run, stage: str) -> train.StageResult:
  model, step = restore_stage_model(run, stage)
  writer = workdir.summary_writer(run, stage)
  return train.StageResult(stage, step, evaluate.evaluate_stage(run, stage, model, step, writer),
                           model=model)
