"""The run and its workdir: strategy, precision and dataset set up once, and
every path convention of `--model_dir` (written here and nowhere else).

  <model_dir>/config.json                 the resolved configuration (checked on reruns)
  <model_dir>/config_history.jsonl        one line per run: when, where, what changed
  <model_dir>/<stage>/LOCK                held while a run trains the stage
  <model_dir>/<stage>/checkpoints         (or --checkpoint_dir/<stage>)
  <model_dir>/<stage>/tensorboard         (or --tensorboard_dir/<stage>)
  <model_dir>/<stage>/metrics.json, samples.npz, export/
  <model_dir>/export                      the best chain (finetune, else rough)
  <model_dir>/results.md, results.json, comparison.png, predict/   (--stage=all)
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from typing import TYPE_CHECKING, Optional

from absl import logging
import keras
import tensorflow as tf

from trainer import augmentation
from trainer import config as config_lib
from trainer import datasets
from trainer import distribute
from trainer import errors
from trainer import models
from trainer import precision

if TYPE_CHECKING:
  from trainer.config import Config

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = "LOCK"


@dataclasses.dataclass
class Run:
  """What every stage of one `train_and_evaluate` shares."""
  config: "Config"
  strategy: tf.distribute.Strategy
  policy: str  # the mixed-precision policy in force
  is_chief: bool  # only the chief writes summaries, metrics, exports, the real checkpoints
  builder: object  # tfds.core.DatasetBuilder of --dataset, prepared
  locks: list = dataclasses.field(default_factory=list)  # StageLocks held; see release()


def root(config: "Config") -> str:
  return config.model_dir.rstrip("/")


def is_remote(path: str) -> bool:
  """gs:// (or any URL tf.io.gfile serves), as opposed to a local path."""
  return "://" in path


def copy_tree(source_dir: str, target_dir: str) -> None:
  """Every file under `source_dir` copied to the same place under `target_dir`
  (local or gs://, either side), replacing files of the same name."""
  source_dir = source_dir.rstrip("/")
  for folder, _, files in tf.io.gfile.walk(source_dir):
    # On gs:// the walk names sub-folders with a trailing slash (".../variables/"),
    # and "variables//x" would be another object name.
    folder = folder.rstrip("/")
    target = target_dir + folder[len(source_dir):]
    tf.io.gfile.makedirs(target)
    for name in files:
      tf.io.gfile.copy(f"{folder}/{name}", f"{target}/{name}", overwrite=True)


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


def check_stored_config(config: "Config") -> dict:
  """Compares this run with `<model_dir>/config.json`, before anything is touched.

  Once a stage has a checkpoint, settings that define the networks must match
  (or --config_mismatch=allow); the others (config_lib.RESUMABLE_FIELDS) may
  change and are logged. Returns
  {field: (stored, given)} of every difference, for the history.
  """
  path = f"{root(config)}/{CONFIG_FILE}"
  if not tf.io.gfile.exists(path):
    return {}
  try:
    with tf.io.gfile.GFile(path) as f:
      stored = json.load(f)
  except (ValueError, tf.errors.OpError) as e:
    raise errors.ConfigMismatchError(
        f"{path} cannot be read ({e}); it says what trained the networks in --model_dir="
        f"{config.model_dir}. Restore it, or use a fresh --model_dir.") from e
  blocking, allowed = config_lib.differences(stored, config)
  trained = [stage for stage in models.STAGES
             if tf.io.gfile.glob(f"{checkpoint_dir(config, stage)}/ckpt-*.index")]
  # Nothing trained yet, nothing to mix: a setting blocks only once a stage it
  # defines has a checkpoint (every stage, or the one of config_lib.STAGE_FIELDS).
  for name in list(blocking):
    stage = config_lib.STAGE_FIELDS.get(name)
    if (stage not in trained) if stage else not trained:
      allowed[name] = blocking.pop(name)
  for name, (before, after) in sorted(allowed.items()):
    logging.info("--model_dir %s: --%s changes from %s to %s (allowed on a rerun)",
                 config.model_dir, name, before, after)
  if blocking:
    listing = "\n".join(f"  --{name}: stored {before!r}, given {after!r}"
                         for name, (before, after) in sorted(blocking.items()))
    if config.config_mismatch != "allow":
      raise errors.ConfigMismatchError(
          f"--model_dir={config.model_dir} was trained with other settings ({path}; "
          f"checkpoints of {', '.join(trained)}); "
          f"nothing was changed:\n{listing}\nRerun with the stored values, use a fresh "
          "--model_dir, or pass --config_mismatch=allow to go on knowingly.")
    logging.warning("--config_mismatch=allow: going on with settings that differ from %s:\n%s",
                    path, listing)
  return {**blocking, **allowed}


def write_config(config: "Config", changes: dict) -> None:
  """config.json (this run's settings) and one more line of config_history.jsonl."""
  tf.io.gfile.makedirs(root(config))
  with tf.io.gfile.GFile(f"{root(config)}/{CONFIG_FILE}", "w") as f:
    f.write(config.to_json())
  history = f"{root(config)}/{HISTORY_FILE}"
  previous = ""
  if tf.io.gfile.exists(history):
    with tf.io.gfile.GFile(history) as f:
      previous = f.read()
  entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
           "changed": {k: {"stored": v[0], "given": v[1]} for k, v in sorted(changes.items())},
           "config": json.loads(config.to_json())}
  # Rewritten whole: gs:// objects cannot be appended to.
  with tf.io.gfile.GFile(history, "w") as f:
    f.write(previous + json.dumps(entry, sort_keys=True) + "\n")


def setup_run(config: "Config", train_stages=(), preflight=None) -> Run:
  """Checks the workdir, sets up strategy and precision, runs `preflight(config,
  train_stages)` (checks of what training will read), locks the stage folders
  it will train, prepares the dataset and writes the resolved config; logs the
  derived numbers. Call `release(run)` at the end."""
  changes = check_stored_config(config)  # before anything is built or written
  strategy = distribute.get_distribution_strategy(
      config.strategy, num_devices=config.num_devices, tpu=config.tpu)
  policy = precision.resolve_policy(config.mixed_precision, strategy)
  precision.set_global_policy(policy)
  keras.utils.set_random_seed(config.seed)
  info = distribute.describe(strategy)
  per_replica = distribute.replica_batch_size(config.global_batch_size, info["replicas"])
  is_chief = info["chief"]
  if preflight is not None:  # after the strategy: building layers first breaks multi-worker
    preflight(config, train_stages)
  locks = []
  try:
    for stage in train_stages:  # before the dataset is built or config.json written
      locks.append(StageLock(config, stage, is_chief).__enter__())
    builder = datasets.prepare_dataset(config.dataset, config.data_dir, config.manual_dir,
                                       may_build=is_chief, rebuild=config.rebuild_dataset)
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
    if config.augment:
      logging.info("augmentation (flip, colour jitter): on the %s (--augment_on=%s)",
                   augmentation.resolve_place(config.augment_on), config.augment_on)
    if is_chief:
      write_config(config, changes)
  except BaseException:
    for lock in locks:
      lock.__exit__(None, None, None)
    raise
  return Run(config, strategy, policy, is_chief, builder, locks)


def release(run: Run) -> None:
  """Frees the stage locks `setup_run` took."""
  while run.locks:
    run.locks.pop().__exit__(None, None, None)


def summary_writer(run: Run, stage: str):
  """TensorBoard writer of the stage: the chief's only, a no-op elsewhere."""
  if run.is_chief:
    return tf.summary.create_file_writer(tensorboard_dir(run.config, stage))
  return tf.summary.create_noop_writer()


# ----------------------------------------------------------------------------
# The stage lock: one run trains a stage folder at a time.
# ----------------------------------------------------------------------------
def _process_start(pid: int) -> Optional[str]:
  """The process's start time in clock ticks since boot (Linux), to tell a live
  process from a new one that reused its pid; None when unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  pid = int(holder.get("pid", -1))
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  start = _process_start(pid)
  return holder.get("process_start") in (None, start) or start is None


class StageLock:
  """`<stage dir>/LOCK` while a run trains the stage: host, pid, start time.

  A second run stops at once with a message naming the holder. A lock whose
  process is gone (same host) is taken over with a warning: kill -9 leaves one
  behind. On another host we cannot tell, so the message says how to clear
  it. Locally the file is created atomically (O_EXCL); on gs:// it is checked
  then written, which detects a concurrent run but cannot exclude a race in
  the same second. Only the chief of a multi-worker run locks: it is one run.
  """

  def __init__(self, config: "Config", stage: str, is_chief: bool = True):
    self.path = f"{stage_dir(config, stage)}/{LOCK_FILE}"
    self.enabled = is_chief
    self.me = {"host": socket.gethostname(), "pid": os.getpid(),
               "process_start": _process_start(os.getpid()),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "model_dir": config.model_dir, "stage": stage}

  def _describe(self, holder: dict) -> str:
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, since "
            f"{holder.get('started')}")

  def _read(self) -> Optional[dict]:
    try:
      with tf.io.gfile.GFile(self.path) as f:
        return json.load(f)
    except tf.errors.NotFoundError:
      return None
    except ValueError:  # half-written by a process that died: nobody holds it
      return {}

  def _create(self) -> bool:
    text = json.dumps(self.me, indent=1)
    if is_remote(self.path):
      if tf.io.gfile.exists(self.path):
        return False
      with tf.io.gfile.GFile(self.path, "w") as f:
        f.write(text)
      return True
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def __enter__(self):
    if not self.enabled:
      return self
    tf.io.gfile.makedirs(os.path.dirname(self.path))
    for _ in range(2):
      if self._create():
        return self
      holder = self._read()
      if holder is None:  # released meanwhile
        continue
      same_host = holder.get("host") == self.me["host"]
      if holder and (not same_host or _alive(holder)):
        where = "" if same_host else (
            " on another host (if that run is gone, delete the lock file)")
        raise errors.WorkdirLockedError(
            f"{self.path} is held by another run ({self._describe(holder)}){where}: two "
            "trainers on one stage folder would mix their checkpoints. Wait for it, or use "
            "another --model_dir.")
      logging.warning("taking over the stale lock %s (%s: that process is gone)", self.path,
                      self._describe(holder) if holder else "unreadable")
      tf.io.gfile.remove(self.path)
    raise errors.WorkdirLockedError(f"{self.path}: could not take the lock; retry")

  def __exit__(self, *exc):
    if self.enabled and (self._read() or {}).get("pid") == self.me["pid"]:
      tf.io.gfile.remove(self.path)
