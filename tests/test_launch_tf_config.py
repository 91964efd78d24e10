"""A TF_CONFIG as Vertex AI writes it reaches the strategy factory intact.

Vertex AI gives each replica of a chief pool + worker pool job a TF_CONFIG
like the ones below (task types "chief"/"worker", plus "environment" and
"job" keys TensorFlow ignores). The last test builds a real
MultiWorkerMirroredStrategy in two processes on 127.0.0.1.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from trainer import distribute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vertex_tf_config(cluster, task_type, index):
  """The shape Vertex AI uses (see 'Distributed training' in its docs)."""
  return json.dumps({
      "cluster": cluster,
      "environment": "cloud",
      "task": {"type": task_type, "index": index, "trial": ""},
      "job": {"worker_pool_specs": [{"replica_count": 1}, {"replica_count": 2}]},
  })


VERTEX_CLUSTER = {
    "chief": ["cmle-training-workerpool0-ab12cd-0:2222"],
    "worker": ["cmle-training-workerpool1-ab12cd-0:2222",
               "cmle-training-workerpool1-ab12cd-1:2222"],
}


@pytest.mark.parametrize("task_type,index,is_chief", [
    ("chief", 0, True), ("worker", 0, False), ("worker", 1, False)])
def test_vertex_tf_config_gives_task_and_cluster(task_type, index, is_chief):
  environ = {"TF_CONFIG": vertex_tf_config(VERTEX_CLUSTER, task_type, index)}
  task = distribute.parse_tf_config(environ)
  assert (task.task_type, task.task_index, task.is_chief) == (task_type, index, is_chief)
  assert task.cluster == VERTEX_CLUSTER
  assert task.num_workers == 3
  # What --strategy=auto picks from it on a GPU-less replica, and on a multi-GPU one.
  assert distribute.resolve_strategy_name("auto", 0, environ=environ, tpu_found=False) \
      == "multi_worker_mirrored"
  assert distribute.resolve_strategy_name("auto", 4, environ=environ, tpu_found=False) \
      == "multi_worker_mirrored"


def test_single_replica_vertex_job_is_not_multi_worker():
  environ = {"TF_CONFIG": vertex_tf_config({"chief": ["host:2222"]}, "chief", 0)}
  assert distribute.parse_tf_config(environ).num_workers == 1
  assert distribute.resolve_strategy_name("auto", 2, environ=environ, tpu_found=False) \
      == "mirrored"


_WORKER_SCRIPT = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import tensorflow as tf
from trainer import distribute
if sys.argv[1] == "factory":
  strategy = distribute.get_distribution_strategy("multi_worker_mirrored")
else:  # TensorFlow's own constructor, reading the same TF_CONFIG
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
resolver = strategy.cluster_resolver
print("RESULT " + json.dumps({
    "task_type": resolver.task_type, "task_id": resolver.task_id,
    "cluster": resolver.cluster_spec().as_dict(),
    "is_chief": distribute.is_chief(strategy),
    "describe": distribute.describe(strategy),
}), flush=True)
"""


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def _run_two_workers(mode):
  """Chief and worker on 127.0.0.1 with Vertex-style TF_CONFIGs; their RESULTs."""
  chief_port, worker_port = _free_ports(2)
  cluster = {"chief": [f"127.0.0.1:{chief_port}"], "worker": [f"127.0.0.1:{worker_port}"]}
  processes = []
  for task_type in ("chief", "worker"):
    env = dict(os.environ, TF_CONFIG=vertex_tf_config(cluster, task_type, 0),
               CUDA_VISIBLE_DEVICES="")
    processes.append(subprocess.Popen([sys.executable, "-c", _WORKER_SCRIPT, mode], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
  results = {}
  try:
    for task_type, process in zip(("chief", "worker"), processes):
      out, err = process.communicate(timeout=120)
      assert process.returncode == 0, err[-3000:]
      line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
      results[task_type] = json.loads(line[len("RESULT "):])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  return cluster, results


def _check_two_workers(cluster, results):
  chief, worker = results["chief"], results["worker"]
  assert (chief["task_type"], chief["task_id"], chief["is_chief"]) == ("chief", 0, True)
  assert (worker["task_type"], worker["task_id"], worker["is_chief"]) == ("worker", 0, False)
  for result in (chief, worker):
    assert result["cluster"] == cluster
    # TF 2.21's MultiWorkerMirroredStrategy class is named CollectiveAllReduceStrategy.
    assert result["describe"]["strategy"] in ("MultiWorkerMirroredStrategy",
                                              "CollectiveAllReduceStrategy")
    assert result["describe"]["workers"] == 2
    assert result["describe"]["replicas"] == 2  # one CPU device per worker


@pytest.mark.slow
def test_vertex_tf_config_drives_a_real_multi_worker_strategy():
  """TF's resolver reads the Vertex TF_CONFIG; distribute.is_chief/describe agree."""
  _check_two_workers(*_run_two_workers("tensorflow"))


@pytest.mark.slow
def test_strategy_factory_builds_multi_worker_strategy_from_vertex_tf_config():
  _check_two_workers(*_run_two_workers("factory"))
