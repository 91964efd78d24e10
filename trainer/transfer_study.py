r"""Generalisation to rooms a network never saw: the transfer study, one command.

  python -m trainer.transfer_study --workdir=runs/study              # ~1 h on 2 CPU cores
  python -m trainer.transfer_study --workdir=runs/study --recipes=unet_scratch,unet_transfer

A small target training set (`record3d/synthetic_target`: rooms of another
style, a few hundred frames, like a user's first captures) is trained on with
each recipe for the same budget, `--stage=all` (rough, gradient, finetune),
and every network is scored on the target's held-out rooms (its validation and
test splits are whole sequences no training run saw). The source runs
(`record3d/synthetic`, the other domain) are trained first, once per
architecture, and the `*_transfer` recipes start every stage from them
(`--init_from`). All runs are the trainer's own (`stages.train_and_evaluate`);
every metric is scored with the same ground-truth mask
(`--eval_min_confidence`), whatever a recipe trains with, so the rows compare.

Writes `<workdir>/study.json` (every run, stage, split and metric, metric and
median-scaled) and `<workdir>/study.md` (means over seeds); each run keeps its
own `--model_dir` under `<workdir>/runs/`, so a rerun resumes and skips what
is done.
"""

import dataclasses
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import config as config_lib
from trainer import progress as progress_lib
from trainer import stages

SOURCE_DATASET = "record3d/synthetic"
TARGET_DATASET = "record3d/synthetic_target"
DEPTH_STAGES = ("rough", "finetune")
SPLITS = ("validation", "test")
SHOWN = ("abs_rel", "rmse", "delta1")

# name -> (overrides of the target run; "source": architecture whose source run
# --init_from names, or None). Every recipe trains --stage=all. The *_transfer
# recipes start every stage from the source run (EVERY_STAGE, as they were
# measured), except *_ft_from_rough (the trainer's default --init_from_stages).
EVERY_STAGE = {"init_from_stages": stages.STAGE_ORDER}
RECIPES = {
    "unet_scratch": ({"architecture": "unet"}, None),
    "unet_transfer": ({"architecture": "unet", **EVERY_STAGE}, "unet"),
    "mobilenet_v3_scratch": ({"architecture": "mobilenet_v3", "encoder_weights": "none"}, None),
    "mobilenet_v3_transfer": ({"architecture": "mobilenet_v3", "encoder_weights": "none",
                               **EVERY_STAGE},
                              "mobilenet_v3"),
    "unet_transfer_conf0": ({"architecture": "unet", "min_confidence": 0, **EVERY_STAGE}, "unet"),
    "unet_transfer_conf2": ({"architecture": "unet", "min_confidence": 2, **EVERY_STAGE}, "unet"),
    "unet_scratch_conf0": ({"architecture": "unet", "min_confidence": 0}, None),
    "unet_transfer_silog": ({"architecture": "unet", "loss": "silog", **EVERY_STAGE}, "unet"),
    # --init_from for rough and gradient only: finetune starts from this run's
    # own (transferred, then target-trained) rough net, as without --init_from.
    "unet_transfer_ft_from_rough": ({"architecture": "unet",
                                     "init_from_stages": ("rough", "gradient")}, "unet"),
    # Fine-tuning recipes for an encoder that starts trained (here: from the
    # source run, as ImageNet weights cannot be had on this project's machines).
    "mobilenet_v3_transfer_freeze100": ({"architecture": "mobilenet_v3",
                                         "encoder_weights": "none",
                                         "freeze_encoder_steps": 100, **EVERY_STAGE},
                                        "mobilenet_v3"),
    "mobilenet_v3_transfer_enc_lr0.1": ({"architecture": "mobilenet_v3",
                                         "encoder_weights": "none",
                                         "encoder_learning_rate_multiplier": 0.1,
                                         **EVERY_STAGE},
                                        "mobilenet_v3"),
}
DEFAULT_RECIPES = ("unet_scratch", "unet_transfer", "unet_transfer_ft_from_rough",
                   "mobilenet_v3_scratch", "mobilenet_v3_transfer", "unet_transfer_conf0",
                   "unet_scratch_conf0")

def define_flags(values: flags.FlagValues = flags.FLAGS) -> flags.FlagValues:
  """The study's flags, declared on `values` (only when it runs as the program, so
  they never clash with the trainer's flags of the same names)."""
  v = {"flag_values": values}
  flags.DEFINE_string("workdir", None, "Folder of the study: runs/, study.json, study.md.", **v)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir (datasets are built there if missing).",
                      **v)
  flags.DEFINE_string("source_dataset", SOURCE_DATASET, "What the *_transfer recipes start from.",
                      **v)
  flags.DEFINE_string("target_dataset", TARGET_DATASET,
                      "The small target set: trained on its train split, scored on its "
                      "held-out (by sequence) validation and test splits.", **v)
  flags.DEFINE_list("recipes", list(DEFAULT_RECIPES), f"Recipes to run, of {sorted(RECIPES)}.",
                    **v)
  flags.DEFINE_list("seeds", ["0", "1"], "Seeds of every target recipe (--seed).", **v)
  flags.DEFINE_string("image_size", "64,48", "H,W of every run.", **v)
  flags.DEFINE_integer("train_steps", 300, "Steps per stage of each target run (the budget).",
                       **v)
  flags.DEFINE_integer("source_train_steps", 600, "Steps per stage of each source run.", **v)
  flags.DEFINE_integer("global_batch_size", 8, "Batch of every run.", **v)
  flags.DEFINE_integer("eval_min_confidence", 2,
                       "Ground truth below this confidence is ignored by every score, so runs "
                       "trained with other --min_confidence values compare.", **v)
  return values


def base_config(f, model_dir: str, dataset: str, seed: int, steps: int, **overrides):
  values = dict(model_dir=model_dir, dataset=dataset, data_dir=f.data_dir,
                image_size=config_lib.parse_image_size(f.image_size),
                global_batch_size=f.global_batch_size, train_steps=steps, seed=seed,
                stage="all", mode="train", eval_min_confidence=f.eval_min_confidence,
                num_predict_images=0, log_every_steps=100, checkpoint_every_steps=steps,
                # Scored from checkpoints (mode=eval): no SavedModel is ever read.
                export=False)
  values.update(overrides)
  config = config_lib.Config(**values)
  config_lib.validate(config)
  return config


class Preempted(Exception):
  """SIGTERM stopped a run (its checkpoint is saved): the study stops too; rerun it."""


def train(config) -> None:
  results = stages.train_and_evaluate(config)
  if any(r.preempted for r in results.values()):
    raise Preempted(f"{config.model_dir} was stopped by SIGTERM; rerun the study to resume")


def train_and_score(config) -> dict:
  """Trains (or resumes) --stage=all, then scores the depth stages on each split:
  {split: {stage: metrics}}."""
  train(config)
  scores = {}
  for split in SPLITS:
    results = stages.train_and_evaluate(dataclasses.replace(config, mode="eval",
                                                            eval_split=split))
    scores[split] = {stage: results[stage].metrics for stage in DEPTH_STAGES}
  keras.backend.clear_session()  # the next run builds its own graphs
  return scores


def _row_values(metrics: dict) -> dict:
  out = {name: metrics[name] for name in SHOWN}
  out.update({f"ms_{name}": metrics["median_scaled"][name] for name in SHOWN}
             if "median_scaled" in metrics else {})
  return out


def summary_table(runs: list, split: str) -> str:
  """Markdown: one row per (recipe, stage), means over seeds (and the seeds' range)."""
  columns = ["abs_rel", "rmse", "delta1", "ms_abs_rel", "ms_rmse", "ms_delta1"]
  lines = [f"| recipe | stage | seeds | {' | '.join(columns)} |",
           "|---|---|---|" + "---|" * len(columns)]
  recipes = list(dict.fromkeys(r["recipe"] for r in runs))
  for recipe in recipes:
    for stage in DEPTH_STAGES:
      values = [_row_values(r["scores"][split][stage]) for r in runs if r["recipe"] == recipe]
      cells = []
      for column in columns:
        column_values = [v[column] for v in values if column in v]
        cells.append(f"{np.mean(column_values):.3f}" if column_values else "-")
      seeds = ",".join(str(r["seed"]) for r in runs if r["recipe"] == recipe)
      lines.append(f"| {recipe} | {stage} | {seeds} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv, f=flags.FLAGS):
  del argv
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  unknown = [r for r in f.recipes if r not in RECIPES]
  if unknown:
    raise app.UsageError(f"--recipes: unknown {unknown}; valid {sorted(RECIPES)}")
  seeds = [int(s) for s in f.seeds]
  sources = sorted({RECIPES[r][1] for r in f.recipes} - {None})
  total = len(sources) + len(f.recipes) * len(seeds)
  progress = progress_lib.Progress("transfer study", total, unit="runs", every_seconds=0)
  logging.info("transfer study: %d source run(s) %s, %d recipe(s) x %d seed(s); %s, %d steps "
               "per stage (source %d), batch %d, scored with confidence >= %d",
               len(sources), sources, len(f.recipes), len(seeds), f.image_size,
               f.train_steps, f.source_train_steps, f.global_batch_size,
               f.eval_min_confidence)
  runs_dir = os.path.join(f.workdir, "runs")
  source_dirs = {}
  for architecture in sources:
    overrides = dict(RECIPES[f"{architecture}_scratch"][0]) if (
        f"{architecture}_scratch" in RECIPES) else {"architecture": architecture}
    config = base_config(f, os.path.join(runs_dir, f"source_{architecture}"), f.source_dataset, 0,
                         f.source_train_steps, **overrides)
    started = time.time()
    train(config)
    keras.backend.clear_session()
    source_dirs[architecture] = config.model_dir
    progress.update(add=1, suffix=f"source {architecture} in {time.time() - started:.0f}s")

  # Runs of earlier invocations (other recipes or seeds) stay in the study.
  planned = {(r, s) for r in f.recipes for s in seeds}
  runs = [r for r in _previous_runs(f) if (r["recipe"], r["seed"]) not in planned]
  for recipe in f.recipes:
    overrides, source = RECIPES[recipe]
    for seed in seeds:
      extra = dict(overrides)
      if source:
        extra["init_from"] = source_dirs[source]
      config = base_config(f, os.path.join(runs_dir, f"{recipe}_seed{seed}"), f.target_dataset,
                           seed, f.train_steps, **extra)
      started = time.time()
      scores = train_and_score(config)
      runs.append({"recipe": recipe, "seed": seed, "model_dir": config.model_dir,
                   "overrides": extra, "seconds": time.time() - started, "scores": scores})
      test = scores["test"]
      progress.update(add=1, suffix=(
          f"{recipe} seed {seed}: test abs_rel rough {test['rough']['abs_rel']:.3f} / finetune "
          f"{test['finetune']['abs_rel']:.3f}"))
      _write(f, runs, source_dirs)  # after every run: an interrupted study keeps its results
  logging.info("study written to %s/study.md", f.workdir)


def _previous_runs(f) -> list:
  path = os.path.join(f.workdir, "study.json")
  if not tf.io.gfile.exists(path):
    return []
  with tf.io.gfile.GFile(path) as stored:
    return json.load(stored)["runs"]


def _write(f, runs: list, source_dirs: dict) -> None:
  tf.io.gfile.makedirs(f.workdir)
  settings = {"image_size": f.image_size, "train_steps": f.train_steps,
              "source_train_steps": f.source_train_steps,
              "global_batch_size": f.global_batch_size,
              "eval_min_confidence": f.eval_min_confidence, "source_runs": source_dirs,
              "target": f.target_dataset, "source": f.source_dataset}
  with tf.io.gfile.GFile(os.path.join(f.workdir, "study.json"), "w") as out:
    json.dump({"settings": settings, "runs": runs}, out, indent=2, sort_keys=True)
  text = [f"# Transfer study: {f.target_dataset}, held-out rooms", "",
          f"{f.image_size}, {f.train_steps} steps per stage (source runs "
          f"{f.source_train_steps} on {f.source_dataset}), batch {f.global_batch_size}, "
          f"scored where confidence >= {f.eval_min_confidence}; ms_ = median-scaled.", ""]
  for split in SPLITS:
    text += [f"## {split}", "", summary_table(runs, split), ""]
  with tf.io.gfile.GFile(os.path.join(f.workdir, "study.md"), "w") as out:
    out.write("\n".join(text))


def _main(argv):
  try:
    main(argv)
  except Preempted as e:
    logging.warning("%s", e)


if __name__ == "__main__":
  define_flags()
  app.run(_main)
