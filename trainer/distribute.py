"""One factory that turns a strategy name into a tf.distribute.Strategy.

Also the cluster facts the loop needs: which worker is the chief (only it
writes summaries, metrics and exports) and where a non-chief worker must put
the checkpoints TensorFlow obliges every worker to save.
"""

import dataclasses
import glob
import json
import os
from typing import Mapping, Optional

from absl import logging
import tensorflow as tf

from trainer import errors

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu")


@dataclasses.dataclass(frozen=True)
class ClusterTask:
  """This process's place in a TF_CONFIG cluster."""
  task_type: str  # "chief", "worker", "evaluator", ...
  task_index: int
  # {"chief": ["host:port"], "worker": [...]} as TF_CONFIG gives it.
  cluster: Mapping[str, list]

  @property
  def num_workers(self) -> int:
    """Hosts that take part in training (chief and workers, not evaluators)."""
    return len(self.cluster.get("chief", [])) + len(self.cluster.get("worker", []))

  @property
  def is_chief(self) -> bool:
    # Without a "chief" job, TensorFlow makes worker 0 the chief.
    if "chief" in self.cluster:
      return self.task_type == "chief"
    return self.task_type == "worker" and self.task_index == 0


def parse_tf_config(environ: Optional[Mapping[str, str]] = None) -> Optional[ClusterTask]:
  """Reads TF_CONFIG (as Vertex AI or a hand-made cluster sets it).

  Returns None when TF_CONFIG is unset or names no cluster. Raises ValueError
  with the reason when it is malformed, since a worker that silently trains
  alone would waste a whole job.
  """
  environ = os.environ if environ is None else environ
  raw = environ.get("TF_CONFIG", "").strip()
  if not raw:
    return None
  try:
    config = json.loads(raw)
  except json.JSONDecodeError as e:
    raise errors.UserInputError(f"TF_CONFIG is not valid JSON ({e}): {raw[:200]!r}") from e
  cluster = config.get("cluster") or {}
  if not cluster:
    return None
  task = config.get("task") or {}
  task_type = task.get("type")
  task_index = task.get("index", 0)
  if task_type is None:
    raise errors.UserInputError(f"TF_CONFIG has a cluster but no task.type: {raw[:200]!r}")
  if task_type not in cluster and task_type != "evaluator":
    raise errors.UserInputError(
        f"TF_CONFIG task.type {task_type!r} is not a job of the cluster "
        f"{sorted(cluster)}")
  if task_type in cluster and not 0 <= int(task_index) < len(cluster[task_type]):
    raise errors.UserInputError(
        f"TF_CONFIG task.index {task_index} is out of range for job "
        f"{task_type!r} with {len(cluster[task_type])} tasks")
  return ClusterTask(task_type=task_type, task_index=int(task_index), cluster=cluster)


def _tpu_hinted(tpu: Optional[str], environ: Mapping[str, str]) -> bool:
  """Whether it is worth asking a TPU resolver (asking costs seconds elsewhere)."""
  return bool(tpu) or "TPU_NAME" in environ or bool(glob.glob("/dev/accel*")) or bool(
      glob.glob("/dev/vfio/[0-9]*"))


def _connect_tpu(tpu: str):
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return resolver


def resolve_strategy_name(name: str,
                          num_gpus: int,
                          tpu: Optional[str] = None,
                          environ: Optional[Mapping[str, str]] = None,
                          tpu_found: Optional[bool] = None) -> str:
  """What `auto` means here: TPU, then a TF_CONFIG cluster, then GPUs, then one device.

  `tpu_found` lets a caller (and tests) say whether a TPU resolver found a TPU;
  by default it is whether one was hinted by --tpu, TPU_NAME or /dev/accel*.
  """
  environ = os.environ if environ is None else environ
  if name not in STRATEGIES:
    raise errors.UserInputError(f"--strategy={name!r} is not one of {', '.join(STRATEGIES)}")
  if name != "auto":
    return name
  if tpu_found is None:
    tpu_found = _tpu_hinted(tpu, environ)
  task = parse_tf_config(environ)
  if tpu_found:
    return "tpu"
  if task is not None and task.num_workers > 1:
    return "multi_worker_mirrored"
  if num_gpus > 1:
    return "mirrored"
  return "one_device"


def get_distribution_strategy(name: str = "auto",
                              num_devices: Optional[int] = None,
                              tpu: Optional[str] = None,
                              environ: Optional[Mapping[str, str]] = None
                             ) -> tf.distribute.Strategy:
  """Builds the strategy for `--strategy=name`.

  Args:
    name: one of STRATEGIES.
    num_devices: for `mirrored`, how many local devices to use (GPUs, or CPUs
      split with `tf.config.set_logical_device_configuration` as the tests do);
      None = all GPUs. For `one_device` it must be None or 1.
    tpu: TPU name or `local` (TPU VM) for `tpu`; also a hint for `auto`.
    environ: the environment (TF_CONFIG, TPU_NAME); os.environ by default.

  Raises:
    ValueError: unknown name, or hardware the name needs is not there.
  """
  environ = os.environ if environ is None else environ
  # Physical, not logical: listing logical devices initialises TensorFlow, after
  # which MultiWorkerMirroredStrategy can no longer configure its collectives.
  gpus = tf.config.list_physical_devices("GPU")
  if name == "auto" and _tpu_hinted(tpu, environ):
    try:
      resolver = _connect_tpu(tpu or "local")
      logging.info("auto strategy: found a TPU through %r", tpu or "local")
      return tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as e:
      logging.warning("auto strategy: a TPU was hinted but not found (%s); "
                      "falling back to GPUs/CPU", e)
  resolved = resolve_strategy_name(name, len(gpus), tpu, environ, tpu_found=False)
  if resolved != name:
    logging.info("--strategy=auto resolved to %s", resolved)

  if resolved == "one_device":
    if num_devices not in (None, 1):
      raise errors.UserInputError(
          f"--strategy=one_device uses one device; got --num_devices={num_devices}")
    device = "/gpu:0" if gpus else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device)

  if resolved == "mirrored":
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    kind = "GPU" if gpus else "CPU"
    count = len(devices) if num_devices is None else num_devices
    if count < 1 or count > len(devices):
      raise errors.UserInputError(
          f"--strategy=mirrored asked for {count} devices but this host has "
          f"{len(devices)} {kind} device(s) visible "
          f"({', '.join(d.name for d in devices) or 'none'})")
    names = [d.name for d in devices[:count]]
    # Without GPUs, NCCL all-reduce is unavailable; the CPU all-reduce works
    # with logical CPU devices (used in tests and for debugging).
    cross_device_ops = None if gpus else tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(names, cross_device_ops=cross_device_ops)

  if resolved == "multi_worker_mirrored":
    task = parse_tf_config(environ)
    if task is None:
      raise errors.UserInputError(
          "--strategy=multi_worker_mirrored needs TF_CONFIG to name the cluster "
          "(Vertex AI sets it; see README 'Distributed training')")
    communication = tf.distribute.experimental.CommunicationImplementation.AUTO
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=communication))

  if resolved == "tpu":
    try:
      resolver = _connect_tpu(tpu or "local")
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as e:
      raise errors.UserInputError(
          f"--strategy=tpu could not reach the TPU {tpu or 'local'!r}: {e}. "
          "Pass --tpu=NAME (TPU node) or --tpu=local (TPU VM).") from e
    return tf.distribute.TPUStrategy(resolver)

  raise AssertionError(resolved)  # resolve_strategy_name validated the name.


def replica_batch_size(global_batch_size: int, num_replicas: int) -> int:
  """Per-replica batch; a global batch that does not divide is an error."""
  if global_batch_size < 1:
    raise errors.UserInputError(f"--global_batch_size must be positive, got {global_batch_size}")
  if global_batch_size % num_replicas:
    raise errors.UserInputError(
        f"--global_batch_size={global_batch_size} does not divide over "
        f"{num_replicas} replicas; use a multiple of {num_replicas}")
  return global_batch_size // num_replicas


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Only the chief writes summaries, metrics, exports and the real checkpoints."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or isinstance(strategy, tf.distribute.TPUStrategy):
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type is None:
    return True
  if "chief" in resolver.cluster_spec().as_dict():
    return task_type == "chief"
  return task_type == "worker" and task_id == 0


def worker_write_dir(path: str, strategy: tf.distribute.Strategy) -> str:
  """Where this worker saves: the real path on the chief, a private temp elsewhere.

  MultiWorkerMirroredStrategy needs every worker to take part in a save
  (variables are synchronised by collectives), but only the chief's copy is
  kept; the others write beside it and the caller deletes theirs.
  """
  if is_chief(strategy):
    return path
  resolver = strategy.cluster_resolver
  return os.path.join(os.path.dirname(path.rstrip("/")) or ".",
                      f".tmp_worker_{resolver.task_type}_{resolver.task_id}",
                      os.path.basename(path.rstrip("/")))


def describe(strategy: tf.distribute.Strategy) -> dict:
  """Numbers for the start-of-run log line."""
  resolver = getattr(strategy, "cluster_resolver", None)
  num_workers = 1
  if resolver is not None and not isinstance(strategy, tf.distribute.TPUStrategy):
    spec = resolver.cluster_spec().as_dict()
    num_workers = max(1, len(spec.get("chief", [])) + len(spec.get("worker", [])))
  return {
      "strategy": type(strategy).__name__,
      "replicas": strategy.num_replicas_in_sync,
      "workers": num_workers,
      "chief": is_chief(strategy),
  }
