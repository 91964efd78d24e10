"""Nothing lost, nothing mixed: reruns with other settings, corrupt checkpoints,
two trainers on one workdir, predict outputs that would clash, 16-bit inputs,
and errors shown without a traceback."""

import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from trainer import errors
from trainer import predict
from trainer import stages
from trainer import train
from trainer import workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(make_config, tmp_path_factory):
  """A rough stage trained 4 steps (checkpoints at 2 and 4) and exported."""
  config = make_config(tmp_path_factory.mktemp("trained"), stage="rough", mode="train")
  stages.train_and_evaluate(config)
  return config


def _tree(root) -> dict:
  """{relative path: bytes} of every file under root."""
  out = {}
  for path in glob.glob(f"{root}/**", recursive=True):
    if os.path.isfile(path):
      out[os.path.relpath(path, root)] = open(path, "rb").read()
  return out


# ---------------------------------------------------------------------------
# Reruns with other settings.
# ---------------------------------------------------------------------------
def test_rerun_with_other_network_settings_stops_before_touching_anything(trained):
  before = _tree(trained.model_dir)
  other = dataclasses.replace(trained, image_size=(24, 32), architecture="seed", train_steps=6)
  with pytest.raises(errors.ConfigMismatchError) as raised:
    stages.train_and_evaluate(other)
  message = str(raised.value)
  # Each differing flag with its stored and given value; the allowed change is not blocking.
  assert "--image_size: stored [32, 24], given [24, 32]" in message
  assert "--architecture: stored 'unet', given 'seed'" in message
  assert "--train_steps" not in message and "--config_mismatch=allow" in message
  assert _tree(trained.model_dir) == before  # config.json, checkpoints: byte for byte


def test_allowed_changes_resume_and_are_recorded_in_the_history(trained, make_config):
  longer = dataclasses.replace(trained, train_steps=6, log_every_steps=3)
  assert stages.train_and_evaluate(longer)["rough"].step == 6
  stored = json.load(open(f"{trained.model_dir}/config.json"))
  assert stored["train_steps"] == 6
  history = [json.loads(line) for line in open(f"{trained.model_dir}/config_history.jsonl")]
  assert len(history) == 2 and history[0]["changed"] == {}
  assert history[1]["changed"]["train_steps"] == {"stored": 4, "given": 6}
  # --config_mismatch=allow goes on knowingly (here: another learning rate).
  allowed = dataclasses.replace(longer, learning_rate=1e-3, config_mismatch="allow")
  stages.train_and_evaluate(allowed)
  last = json.loads(open(f"{trained.model_dir}/config_history.jsonl").readlines()[-1])
  assert last["changed"]["learning_rate"] == {"stored": 2e-3, "given": 1e-3}


# ---------------------------------------------------------------------------
# Corrupt checkpoints.
# ---------------------------------------------------------------------------
def _truncate(checkpoint_path: str) -> None:
  data = glob.glob(f"{checkpoint_path}.data-*")[0]
  content = open(data, "rb").read()
  open(data, "wb").write(content[:len(content) // 3])


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(make_config, tmp_path,
                                                                     caplog):
  config = make_config(tmp_path, stage="rough", mode="train")
  stages.train_and_evaluate(config)
  ckpt_dir = workdir.checkpoint_dir(config, "rough")
  _truncate(f"{ckpt_dir}/ckpt-4")
  longer = dataclasses.replace(config, train_steps=6)
  with caplog.at_level("WARNING", logger="absl"):
    result = stages.train_and_evaluate(longer)["rough"]
  assert result.step == 6
  assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-6")
  warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert f"{ckpt_dir}/ckpt-4: cannot be read" in warnings
  assert "fell back to" in warnings and "steps 3..4 will be redone" in warnings


def test_no_readable_checkpoint_refuses_to_start_from_scratch(make_config, tmp_path):
  config = make_config(tmp_path, stage="rough", mode="train")
  stages.train_and_evaluate(config)
  ckpt_dir = workdir.checkpoint_dir(config, "rough")
  for path in ("ckpt-2", "ckpt-4"):
    _truncate(f"{ckpt_dir}/{path}")
  with pytest.raises(errors.CheckpointError, match="none can be read.*refusing to start"):
    stages.train_and_evaluate(dataclasses.replace(config, train_steps=6))


def test_nan_before_any_checkpoint_says_so(make_config, tmp_path, monkeypatch):
  real = train.stage_loss
  monkeypatch.setattr(train, "stage_loss", lambda config, stage: (
      lambda t, p, m: real(config, stage)(t, p, m) * np.nan))
  config = make_config(tmp_path, stage="rough", mode="train")
  with pytest.raises(train.NonFiniteLossError, match="latest: no checkpoint yet"):
    stages.train_and_evaluate(config)


# ---------------------------------------------------------------------------
# Two trainers on one workdir.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_trainer_stops_at_once_and_a_stale_lock_is_taken_over(
    make_config, tiny_record3d, tmp_path, subprocess_env):
  data_dir, _ = tiny_record3d
  command = [sys.executable, "-m", "trainer.main", f"--model_dir={tmp_path}",
             "--dataset=record3d/pairs", f"--data_dir={data_dir}", "--image_size=32,24",
             "--global_batch_size=4", "--strategy=one_device", "--mixed_precision=float32",
             "--stage=rough", "--mode=train", "--warmup_steps=1", "--train_steps=100000",
             "--steps_per_loop=1"]
  first = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  lock = f"{tmp_path}/rough/{workdir.LOCK_FILE}"
  deadline = time.time() + 240
  while not os.path.exists(lock) and time.time() < deadline and first.poll() is None:
    time.sleep(0.2)
  try:
    assert os.path.exists(lock), "the first trainer never took the lock"
    holder = json.load(open(lock))
    assert holder["pid"] == first.pid and holder["host"] and holder["started"]
    second = make_config(tmp_path, stage="rough", mode="train", train_steps=100000,
                         steps_per_loop=1)
    with pytest.raises(errors.WorkdirLockedError, match=f"pid {first.pid}"):
      stages.train_and_evaluate(second)
  finally:
    first.kill()  # kill -9: the lock stays behind
    first.wait()
  assert os.path.exists(lock)
  # Its process is gone: the next run takes the lock over (with a warning) and trains.
  resumed = make_config(tmp_path, stage="rough", mode="train", train_steps=2, steps_per_loop=1)
  assert stages.train_and_evaluate(resumed)["rough"].step >= 2
  assert not os.path.exists(lock)  # released at the end


# ---------------------------------------------------------------------------
# Predict: outputs never clash, inputs converted or refused.
# ---------------------------------------------------------------------------
def _rgb(path, size=(20, 15), seed=0):
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)).save(path)


def test_predict_refuses_inputs_that_would_overwrite_each_other(trained, tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  _rgb(tmp_path / "a" / "good.jpg")
  _rgb(tmp_path / "b" / "good.png", seed=1)
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="a/good.jpg and .*b/good.png"):
    predict.predict_files(f"{trained.model_dir}/export",
                          [str(tmp_path / "a" / "good.jpg"), str(tmp_path / "b" / "good.png")],
                          str(out))
  assert not out.exists() or not list(out.iterdir())  # nothing written


def test_predict_keeps_existing_outputs_unless_told(trained, tmp_path):
  _rgb(tmp_path / "photo.png")
  out = tmp_path / "out"
  export = f"{trained.model_dir}/export"
  assert predict.predict_files(export, [str(tmp_path / "photo.png")], str(out)) == {
      str(tmp_path / "photo.png"): None}
  first = (out / "photo_depth.npy").read_bytes()
  _rgb(tmp_path / "photo.png", seed=5)
  with pytest.raises(ValueError, match="already exist.*--overwrite"):
    predict.predict_files(export, [str(tmp_path / "photo.png")], str(out))
  assert (out / "photo_depth.npy").read_bytes() == first
  predict.predict_files(export, [str(tmp_path / "photo.png")], str(out), overwrite=True)
  assert (out / "photo_depth.npy").read_bytes() != first


def test_predict_converts_16_bit_grey_and_refuses_float_images(tmp_path):
  ramp = np.linspace(1000, 60000, 20 * 15).reshape(20, 15).astype(np.uint16)
  Image.fromarray(ramp).save(tmp_path / "grey16.png")
  assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
  rgb = predict.read_rgb(str(tmp_path / "grey16.png"))
  assert rgb.dtype == np.uint8 and rgb.shape == (20, 15, 3)
  np.testing.assert_allclose(rgb[..., 0], np.round(ramp / 257.0), atol=1)
  assert (rgb == 255).mean() < 0.05  # not clipped to white
  Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tif")
  with pytest.raises(ValueError, match="floating-point image"):
    predict.read_rgb(str(tmp_path / "float.tif"))
  (tmp_path / "empty.png").write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty file \(0 bytes\)"):
    predict.read_rgb(str(tmp_path / "empty.png"))


# ---------------------------------------------------------------------------
# Errors as one message, without a traceback or the help text.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_errors_are_one_message(trained, tmp_path, subprocess_env):
  base = [sys.executable, "-m", "trainer.main", f"--model_dir={trained.model_dir}",
          "--dataset=record3d/pairs", f"--data_dir={trained.data_dir}", "--stage=rough",
          "--strategy=one_device", "--mixed_precision=float32", "--global_batch_size=4"]
  flag = subprocess.run(base + ["--image_size=abc"], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert flag.returncode == 2
  assert "trainer.main: error: --image_size='abc' must be H,W" in flag.stderr
  assert "Traceback" not in flag.stderr and "--model_dir:" not in flag.stderr  # no help text
  mismatch = subprocess.run(base + ["--image_size=40,30"], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
  assert mismatch.returncode == 2, mismatch.stderr[-2000:]
  assert "--image_size: stored [32, 24], given [40, 30]" in mismatch.stderr
  assert "Traceback" not in mismatch.stderr
