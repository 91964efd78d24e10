"""The real training loop, a few steps at a time, on the tiny record3d/pairs dataset."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import export as export_lib
from trainer import stages
from trainer import workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def all_stages(make_config, tmp_path_factory):
  """One `--stage=all` run (rough, gradient, finetune, export, report, predict)."""
  config = make_config(tmp_path_factory.mktemp("all"), tflite=("float32", "int8"),
                       tflite_calibration_examples=4)
  return config, stages.train_and_evaluate(config)


def test_stage_all_runs_every_stage_and_writes_the_workdir(all_stages, event_scalars):
  config, results = all_stages
  assert list(results) == ["rough", "gradient", "finetune"]
  base = config.model_dir
  resolved = json.load(open(f"{base}/config.json"))
  assert resolved["image_size"] == [32, 24] and resolved["stage"] == "all"
  for stage in results:
    assert results[stage].step == config.train_steps
    assert tf.train.latest_checkpoint(f"{base}/{stage}/checkpoints").endswith("ckpt-4")
    saved = json.load(open(f"{base}/{stage}/metrics.json"))
    assert saved["step"] == 4 and saved["num_images"] == 4  # the whole tiny test split
    assert event_scalars(f"{base}/{stage}/tensorboard", "train/loss")
  depth_metrics = json.load(open(f"{base}/finetune/metrics.json"))
  for name in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2",
               "delta3", "silog", "mse"):
    assert np.isfinite(depth_metrics[name]), name
  assert "edge_rmse" in json.load(open(f"{base}/gradient/metrics.json"))
  for path in ("export/saved_model.pb", "rough/export/saved_model.pb", "results.md",
               "comparison.png", "predict/outputs", "export/depth_float32.tflite",
               "export/depth_int8.tflite"):
    assert os.path.exists(f"{base}/{path}"), path
  # The chain's export is finetune's own, copied: the same files, byte for byte.
  main, finetune = f"{base}/export", f"{base}/finetune/export"
  copied = {os.path.relpath(os.path.join(d, f), finetune)
            for d, _, files in os.walk(finetune) for f in files}
  assert copied and copied <= {os.path.relpath(os.path.join(d, f), main)
                               for d, _, files in os.walk(main) for f in files}
  for name in copied:
    assert open(f"{main}/{name}", "rb").read() == open(f"{finetune}/{name}", "rb").read(), name
  table = open(f"{base}/results.md").read()
  assert "constant (train median" in table and "finetune (unet)" in table
  figure = Image.open(f"{base}/comparison.png")
  # 2 rows (num_image_summaries) of RGB | truth | rough | finetune + colour bar: wider than tall.
  assert figure.format == "PNG" and figure.width > figure.height > 200


def test_finetune_keeps_the_frozen_gradient_net_and_depends_on_it(all_stages):
  config, results = all_stages
  finetune = results["finetune"].model
  gradient_net = next(layer for layer in finetune.layers if isinstance(layer, keras.Model))
  assert not gradient_net.trainable
  trained = results["gradient"].model
  for before, after in zip(trained.weights, gradient_net.weights):
    np.testing.assert_array_equal(before.numpy(), after.numpy(), err_msg=before.path)
  # And its output really feeds the finetune net: disturbing it changes depth.
  image = tf.random.stateless_uniform((1, 32, 24, 3), seed=(1, 2))
  reference = finetune(image, training=False).numpy()
  saved = [w.numpy() for w in gradient_net.weights]
  try:
    for weight in gradient_net.trainable_weights or gradient_net.weights:
      weight.assign(weight.numpy() + 0.5)
    assert not np.allclose(finetune(image, training=False).numpy(), reference)
  finally:
    for weight, value in zip(gradient_net.weights, saved):
      weight.assign(value)


def test_export_round_trip_matches_the_keras_model(all_stages):
  config, results = all_stages
  serving = tf.saved_model.load(f"{config.model_dir}/export").signatures["serving_default"]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 32, 24, 3), dtype=np.uint8)
  exported = serving(images=tf.constant(images))["depth"].numpy()
  expected = results["finetune"].model(images.astype(np.float32) / 255.0, training=False)
  expected = np.clip(expected.numpy()[..., 0], 0.0, config.max_depth)
  np.testing.assert_allclose(exported, expected, rtol=1e-4, atol=1e-4)
  # Any input size: depth comes back at the caller's size.
  other = serving(images=tf.constant(rng.integers(0, 256, (1, 50, 37, 3), dtype=np.uint8)))
  assert other["depth"].shape == (1, 50, 37)


def test_rerun_of_a_finished_model_dir_trains_nothing(all_stages, make_config):
  config, _ = all_stages
  rerun = stages.train_and_evaluate(make_config(config.model_dir, stage="rough",
                                               mode="train"))
  assert rerun["rough"].step == 4
  assert tf.train.latest_checkpoint(f"{config.model_dir}/rough/checkpoints").endswith("ckpt-4")


def test_finetune_without_gradient_checkpoint_is_a_clear_error(make_config, tmp_path):
  config = make_config(tmp_path, stage="finetune")
  with pytest.raises(FileNotFoundError, match="--stage=gradient first"):
    stages.train_and_evaluate(config)


def test_finetune_init_rough_needs_the_rough_checkpoint_and_scratch_does_not(
    all_stages, make_config, tmp_path):
  config, _ = all_stages
  shutil.copytree(workdir.stage_dir(config, "gradient"), tmp_path / "gradient")  # gradient net only
  finetune = make_config(tmp_path, stage="finetune", mode="train")
  with pytest.raises(FileNotFoundError, match="--finetune_init=scratch"):
    stages.train_and_evaluate(finetune)
  scratch = dataclasses.replace(finetune, finetune_init="scratch")
  assert stages.train_and_evaluate(scratch)["finetune"].step == scratch.train_steps


def test_seed_architecture_trains_and_exports(make_config, tmp_path):
  config = make_config(tmp_path, stage="rough", architecture="seed",
                       train_steps=2, global_batch_size=2)
  result = stages.train_and_evaluate(config)["rough"]
  assert result.step == 2 and np.isfinite(result.metrics["rmse"])
  assert json.load(open(f"{tmp_path}/export/depth2d.json"))["architecture"] == "seed"


def test_loss_drops(make_config, tmp_path, event_scalars):
  """Learning, not just running: the training loss falls clearly within 60 steps."""
  config = make_config(tmp_path, stage="rough", mode="train", train_steps=60,
                       steps_per_loop=5, log_every_steps=5, checkpoint_every_steps=60,
                       augment=False, learning_rate=3e-3, warmup_steps=5)
  stages.train_and_evaluate(config)
  losses = event_scalars(f"{tmp_path}/rough/tensorboard", "train/loss")
  first, last = losses[min(losses)], np.mean([losses[s] for s in sorted(losses)[-3:]])
  assert last < 0.6 * first, losses


@pytest.mark.slow
def test_predict_cli_reports_bad_files_and_processes_the_rest(all_stages, tmp_path):
  config, _ = all_stages
  good = tmp_path / "good.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), np.uint8)).save(good)
  truncated = tmp_path / "truncated.jpg"
  Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "full.jpg")
  truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:100])
  missing = tmp_path / "missing.png"
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "trainer.predict", f"--export_dir={config.model_dir}/export",
       f"--output_dir={out}", "--ply", str(truncated), str(good), str(missing)],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "truncated.jpg" in proc.stderr and "missing.png" in proc.stderr
  depth_png = np.asarray(Image.open(out / "good_depth.png"))
  assert depth_png.dtype == np.uint16 and depth_png.shape == (40, 30)
  depth = np.load(out / "good_depth.npy")
  np.testing.assert_allclose(depth_png, np.clip(np.round(depth * 1000), 0, 65535), atol=1)
  assert (out / "good_depth_color.png").exists() and (out / "good.ply").exists()
  assert open(out / "good.ply", "rb").read(3) == b"ply"
  assert not list(out.glob("truncated*")) and not list(out.glob("missing*"))


def test_float32_copy_has_identical_weights(all_stages):
  config, results = all_stages
  copy = export_lib.float32_copy(config, "finetune", results["finetune"].model)
  for a, b in zip(copy.weights, results["finetune"].model.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_tflite_export_of_the_chain_matches_the_saved_model(all_stages):
  """--tflite after --stage=all: the finetune chain, run by LiteRT, agrees with the SavedModel."""
  from trainer import exported_model
  config, _ = all_stages
  images = np.random.default_rng(3).integers(0, 256, (2, 32, 24, 3), dtype=np.uint8)
  saved = exported_model.load(f"{config.model_dir}/export")
  lite = exported_model.load(f"{config.model_dir}/export/depth_float32.tflite")
  assert lite.input_size == (32, 24)
  for image in images:
    np.testing.assert_allclose(lite.predict(image), saved.predict(image), atol=1e-3)


def test_noexport_is_refused_where_exports_are_the_point(make_config, tmp_path):
  config = make_config(tmp_path, export=False)
  config_lib.validate(config)  # training without exports is fine
  with pytest.raises(ValueError, match="--mode=export writes the exports: drop --noexport"):
    config_lib.validate(dataclasses.replace(config, mode="export"))
  with pytest.raises(ValueError, match="--tflite=int8 needs the exports: drop --noexport"):
    config_lib.validate(dataclasses.replace(config, tflite=("int8",)))
