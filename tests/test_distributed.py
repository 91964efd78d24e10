"""Distribution, precision and fault tolerance, all on this CPU-only machine.

Strategies that need devices configured before TensorFlow starts (2 logical
CPUs, or a 2-worker cluster) run in subprocesses; the rest in-process.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import distribute
from trainer import precision
from trainer import stages
from trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trainer_command(data_dir, model_dir, *extra):
  return [sys.executable, "-m", "trainer.main", f"--model_dir={model_dir}",
          "--dataset=record3d/pairs", f"--data_dir={data_dir}", "--image_size=32,24",
          "--global_batch_size=4", "--strategy=one_device", "--mixed_precision=float32",
          "--stage=rough", "--mode=train", "--warmup_steps=1", *extra]


def start_trainer(command, env):
  """The trainer in the background, stderr kept (the log is read back by the test)."""
  return subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)


def wait_for_checkpoint(directory: str, step: int, proc, timeout: float = 240.0) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    latest = tf.train.latest_checkpoint(directory)
    if latest and int(latest.rsplit("-", 1)[-1]) >= step:
      return
    if proc.poll() is not None:
      raise AssertionError(f"trainer exited ({proc.returncode}) before checkpoint {step}: "
                           f"{proc.stderr.read()[-3000:]}")
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint >= {step} in {directory} after {timeout}s")


def checkpoint_values(path: str) -> dict:
  """All tensors of a checkpoint (reading every one proves it is not corrupted)."""
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if "model" in name}


# ---------------------------------------------------------------------------
# The strategy factory and batch arithmetic.
# ---------------------------------------------------------------------------
def test_global_batch_must_divide_over_replicas():
  assert distribute.replica_batch_size(8, 2) == 4
  with pytest.raises(ValueError, match="--global_batch_size=6 does not divide over 4"):
    distribute.replica_batch_size(6, 4)


def test_factory_errors_name_the_flag(monkeypatch):
  with pytest.raises(ValueError, match="--strategy='gpu' is not one of"):
    distribute.get_distribution_strategy("gpu")
  with pytest.raises(ValueError, match="--strategy=mirrored asked for 5 devices"):
    distribute.get_distribution_strategy("mirrored", num_devices=5)
  with pytest.raises(ValueError, match="needs TF_CONFIG"):
    distribute.get_distribution_strategy("multi_worker_mirrored", environ={})
  def no_tpu(name):  # what the resolver raises off Google Cloud (no metadata server)
    raise OSError(f"cannot resolve {name}")

  monkeypatch.setattr(distribute, "_connect_tpu", no_tpu)
  with pytest.raises(ValueError, match="--strategy=tpu could not reach the TPU 'my-tpu'"):
    distribute.get_distribution_strategy("tpu", tpu="my-tpu", environ={})


def test_auto_resolution_order():
  cluster = json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}})
  assert distribute.resolve_strategy_name("auto", 0, environ={}, tpu_found=True) == "tpu"
  assert distribute.resolve_strategy_name("auto", 4, environ={"TF_CONFIG": cluster},
                                          tpu_found=False) == "multi_worker_mirrored"
  assert distribute.resolve_strategy_name("auto", 4, environ={}, tpu_found=False) == "mirrored"
  assert distribute.resolve_strategy_name("auto", 1, environ={}, tpu_found=False) == "one_device"


def test_auto_precision_is_float32_on_cpu():
  strategy = distribute.get_distribution_strategy("one_device", environ={})
  assert precision.resolve_policy("auto", strategy) == "float32"
  with pytest.raises(ValueError, match="--mixed_precision='half'"):
    precision.resolve_policy("half", strategy)


# ---------------------------------------------------------------------------
# MirroredStrategy on 2 logical CPUs == one device, same global batch.
# ---------------------------------------------------------------------------
MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    from absl import logging
    import tensorflow as tf
    logging.set_verbosity(logging.INFO)
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from trainer import config as config_lib, train, workdir
    data_dir, out = sys.argv[1], sys.argv[2]
    # argv[4] "augment": augmentation on, on the host for one device and in the
    # mirrored train step (the same draws, so the same first step).
    augment = sys.argv[4] == "augment"
    for strategy, devices, place in (("one_device", None, "host"), ("mirrored", 2, "device")):
      config = config_lib.Config(
          model_dir=f"{out}/{strategy}", dataset="record3d/pairs", data_dir=data_dir,
          image_size=(32, 24), global_batch_size=4, train_steps=1, steps_per_loop=1,
          log_every_steps=1, checkpoint_every_steps=1, warmup_steps=0, lr_schedule="constant",
          learning_rate=2e-3,
          augment=augment, augment_on=place, shuffle_buffer=1, stage="rough", mode="train",
          strategy=strategy,
          num_devices=devices, mixed_precision="float32", architecture=sys.argv[3])
      # The real loop of the stage, set up as stages.train_and_evaluate does; its
      # SavedModel exports (not compared here) are left out.
      run = workdir.setup_run(config, ("rough",), preflight=train.preflight)
      try:
        train.train_stage(run, "rough")
      finally:
        workdir.release(run)
""")


@pytest.mark.slow
@pytest.mark.parametrize("architecture,augment", [("unet", "augment"), ("seed", "noaugment")])
def test_mirrored_two_replicas_first_step_equals_one_device(tiny_record3d, tmp_path, architecture,
                                                            augment, subprocess_env):
  data_dir, _ = tiny_record3d
  proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, data_dir, str(tmp_path),
                         architecture, augment],
                        cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "replicas=2" in proc.stderr and "2 per replica" in proc.stderr
  one = all_values(tf.train.latest_checkpoint(f"{tmp_path}/one_device/rough/checkpoints"))
  two = all_values(tf.train.latest_checkpoint(f"{tmp_path}/mirrored/rough/checkpoints"))
  assert one.keys() == two.keys() and len(one) > 10
  weights_close, weights_total = 0, 0
  for name in one:
    a, b = one[name].astype(np.float64), two[name].astype(np.float64)
    norm = np.linalg.norm(a)
    relative_error = np.linalg.norm(a - b) / max(norm, 1e-30)
    if name.startswith("optimizer/_variables/"):
      # Adam's moments are the gradient and its square. The all-reduced sums and
      # synchronised BatchNorm statistics add in another order than on one
      # device; float32 noise then flips a few ReLUs near 0, so per tensor the
      # gradients agree to ~1%, not bit for bit. Replica-local BatchNorm (the
      # semantic error this guards against) is off by ~100%. Tensors whose exact
      # gradient is 0 (conv biases before BatchNorm) hold only noise.
      if norm > 1e-6:
        assert relative_error < 0.03, (name, relative_error)
    else:
      # Weights after one Adam step (~lr * g / (|g| + eps)): where g is ~0 (e.g.
      # biases before BatchNorm) the noise above decides the step's sign, so
      # count agreement over all weights; the moments are the strict check.
      weights_close += int(np.isclose(a, b, rtol=1e-4, atol=1e-6).sum())
      weights_total += a.size
  assert weights_close > 0.99 * weights_total, (weights_close, weights_total)
  # Adam's moments hold the first step's gradients: equal above, and not zero
  # here, so the step really updated the weights (equality proves something).
  assert int(one["optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"]) == 1
  moments = [v for k, v in one.items() if k.startswith("optimizer/_variables/")]
  assert len(moments) > 10
  assert sum(np.abs(m).max() > 0 for m in moments) > 0.9 * len(moments)


def all_values(path: str) -> dict:
  reader = tf.train.load_checkpoint(path)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if not name.startswith("save_counter") and not name.startswith("_CHECKPOINTABLE")}


# ---------------------------------------------------------------------------
# MultiWorkerMirroredStrategy: two processes on 127.0.0.1.
# ---------------------------------------------------------------------------
def free_ports(count: int) -> list:
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


@pytest.mark.slow
def test_multi_worker_trains_to_the_end_and_only_the_chief_writes(tiny_record3d, tmp_path,
                                                                  subprocess_env):
  data_dir, _ = tiny_record3d
  workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
  model_dir = tmp_path / "model"
  procs = []
  for index in range(2):
    tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
    command = trainer_command(data_dir, model_dir, "--train_steps=4", "--steps_per_loop=2",
                              "--checkpoint_every_steps=2", "--mode=train_and_eval")
    command[command.index("--strategy=one_device")] = "--strategy=multi_worker_mirrored"
    procs.append(subprocess.Popen(command, cwd=REPO, env=subprocess_env(TF_CONFIG=tf_config),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  logs = []
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    logs.append(err)
    assert proc.returncode == 0, err[-3000:]
  assert all("workers=2" in log and "global batch 4 = 2 per replica" in log for log in logs)
  fingerprints = [re.findall(r"weights fingerprint at step 4: (\S+)", log) for log in logs]
  assert fingerprints[0] and fingerprints[0] == fingerprints[1], fingerprints
  assert tf.train.latest_checkpoint(f"{model_dir}/rough/checkpoints").endswith("ckpt-4")
  written = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*"))
  assert not [p for p in written if ".tmp_worker" in p], written
  assert "config.json" in written and "rough/metrics.json" in written
  assert "export/saved_model.pb" in written
  events = list((model_dir / "rough" / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1  # the chief's only


# ---------------------------------------------------------------------------
# Fault tolerance.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_finishes(tiny_record3d, tmp_path, subprocess_env):
  data_dir, _ = tiny_record3d
  ckpt_dir = f"{tmp_path}/rough/checkpoints"
  # 120 steps: the kill comes within ~0.1 s of checkpoint 6, and the 114 steps
  # left take seconds (~6 steps/s on 2 cores), so it lands mid-run; the rerun
  # then trains those to the end.
  command = trainer_command(data_dir, tmp_path, "--train_steps=120", "--steps_per_loop=1",
                            "--checkpoint_every_steps=3", "--keep_checkpoints=2",
                            "--image_size=64,48")
  proc = start_trainer(command, subprocess_env())
  wait_for_checkpoint(ckpt_dir, 6, proc)
  proc.kill()  # SIGKILL: no handler, no chance to save
  proc.wait()
  latest = tf.train.latest_checkpoint(ckpt_dir)
  killed_at = int(latest.rsplit("-", 1)[-1])
  assert killed_at < 120
  # Reading every tensor of the checkpoint left by the kill proves it whole.
  assert checkpoint_values(latest)
  rerun = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from {latest} at step {killed_at}" in rerun.stderr
  assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-120")


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_exits_cleanly(tiny_record3d, tmp_path,
                                                             subprocess_env):
  data_dir, _ = tiny_record3d
  ckpt_dir = f"{tmp_path}/rough/checkpoints"
  command = trainer_command(data_dir, tmp_path, "--train_steps=5000", "--steps_per_loop=1",
                            "--checkpoint_every_steps=1000", "--log_every_steps=1000",
                            "--image_size=64,48")
  proc = start_trainer(command, subprocess_env())
  # Wait until training is under way (the first loop has logged its tracing).
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    time.sleep(0.5)
    if tf.io.gfile.exists(f"{tmp_path}/rough/tensorboard"):
      break
  time.sleep(3.0)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  match = re.search(r"stopped by SIGTERM at step (\d+)", err)
  assert match, err[-3000:]
  stopped = int(match.group(1))
  assert 0 < stopped < 5000
  assert tf.train.latest_checkpoint(ckpt_dir).endswith(f"ckpt-{stopped}")
  assert checkpoint_values(tf.train.latest_checkpoint(ckpt_dir))


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    make_config, tmp_path, monkeypatch):
  good = make_config(tmp_path, stage="rough", mode="train", train_steps=4)
  stages.train_and_evaluate(good)
  ckpt_dir = f"{tmp_path}/rough/checkpoints"
  last_good = tf.train.latest_checkpoint(ckpt_dir)
  before = checkpoint_values(last_good)

  real_stage_loss = train.stage_loss

  def poisoned_stage_loss(config, stage):
    loss_fn = real_stage_loss(config, stage)
    return lambda target, prediction, mask: loss_fn(target, prediction, mask) * np.nan

  monkeypatch.setattr(train, "stage_loss", poisoned_stage_loss)
  longer = make_config(tmp_path, stage="rough", mode="train", train_steps=10)
  with pytest.raises(train.NonFiniteLossError, match=r"loss became nan in steps 5\.\.6"):
    stages.train_and_evaluate(longer)
  assert tf.train.latest_checkpoint(ckpt_dir) == last_good
  after = checkpoint_values(last_good)
  for name in before:
    np.testing.assert_array_equal(before[name], after[name])


# ---------------------------------------------------------------------------
# Mixed precision on CPU.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_runs_a_few_steps(make_config, tmp_path, policy):
  config = make_config(tmp_path, stage="rough", train_steps=3,
                       mixed_precision=policy)
  try:
    result = stages.train_and_evaluate(config)["rough"]
    assert keras.mixed_precision.global_policy().name == policy
    model = result.model
    assert model.layers[-1].dtype_policy.name in ("float32",)  # output stays float32
    assert any(layer.compute_dtype == policy.split("_")[1] for layer in model.layers)
    wrapped = precision.wrap_optimizer(keras.optimizers.Adam(), policy)
    assert isinstance(wrapped, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    assert np.isfinite(result.metrics["rmse"])
  finally:
    keras.mixed_precision.set_global_policy("float32")
