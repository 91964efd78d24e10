"""Generalisation features of the trainer: pretrained-backbone architectures through
the real loop, --init_from, --encoder_weights, --freeze_encoder_steps,
--encoder_learning_rate_multiplier and --min_confidence."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from trainer import checkpoints
from trainer import config as config_lib
from trainer import datasets
from trainer import errors
from trainer import input_pipeline
from trainer import losses
from trainer import models
from trainer import stages
from trainer import train
from trainer import workdir


@pytest.fixture(scope="module")
def rough_run(make_config, tmp_path_factory):
  """A unet rough stage trained 4 steps: the source of --init_from."""
  config = make_config(tmp_path_factory.mktemp("source"), stage="rough", mode="train")
  return config, stages.train_and_evaluate(config)["rough"]


# ---------------------------------------------------------------------------
# --init_from
# ---------------------------------------------------------------------------
def test_init_from_restores_the_other_run_exactly(rough_run, make_config, tmp_path):
  source, result = rough_run
  target = make_config(tmp_path, stage="rough", mode="train", init_from=source.model_dir)
  fresh = train.stage_network(target, "rough")
  image = tf.random.stateless_uniform((2, 32, 24, 3), seed=(3, 4))
  before = fresh(image, training=False).numpy()
  path = checkpoints.init_from_run(target, "rough", fresh)
  assert path.endswith("rough/checkpoints/ckpt-4")
  expected = result.model(image, training=False).numpy()
  np.testing.assert_array_equal(fresh(image, training=False).numpy(), expected)
  assert not np.allclose(before, expected)  # it really changed the weights
  # A stage folder works as well as the model_dir.
  assert checkpoints.init_from_dir(
      dataclasses.replace(target, init_from=f"{source.model_dir}/rough"), "rough").endswith(
          "rough/checkpoints")


def test_init_from_trains_with_a_fresh_optimizer(rough_run, make_config, tmp_path):
  source, _ = rough_run
  target = make_config(tmp_path, stage="rough", mode="train", init_from=source.model_dir,
                       train_steps=2)
  result = stages.train_and_evaluate(target)["rough"]
  assert result.step == 2  # counted from 0: the optimizer (and its step) starts fresh


@pytest.mark.parametrize("problem", ["missing", "architecture", "image_size", "other_stage"])
def test_bad_init_from_is_a_clear_error_before_anything_is_written(rough_run, make_config,
                                                                  tmp_path, problem):
  source, _ = rough_run
  model_dir = tmp_path / "model"
  kwargs = dict(stage="rough", mode="train", init_from=source.model_dir)
  expected = "--init_from"
  if problem == "missing":
    kwargs["init_from"] = str(tmp_path / "nothing_here")
    expected = "no checkpoint of stage 'rough'"
  elif problem == "architecture":
    kwargs["architecture"] = "seed"
    expected = "--architecture=unet, this run has --architecture=seed"
  elif problem == "image_size":
    kwargs["image_size"] = (24, 32)
    expected = "--image_size=\\[32, 24\\]"
  else:
    kwargs["stage"] = "gradient"  # the source trained rough only
    expected = "no checkpoint of stage 'gradient'"
  config = make_config(model_dir, **kwargs)
  with pytest.raises(errors.UserInputError, match=expected):
    stages.train_and_evaluate(config)
  assert not model_dir.exists()  # nothing in --model_dir was created or changed


def test_init_from_stages_limits_which_stages_start_from_the_other_run(rough_run, make_config,
                                                                       tmp_path):
  source, _ = rough_run  # trained rough only
  default = make_config(tmp_path / "a", init_from=source.model_dir)
  no_checkpoint = str(tmp_path / "none")
  # By default finetune starts from this run's own rough net, the others from DIR.
  assert [train._how_to_start(default, s, no_checkpoint) for s in stages.STAGE_ORDER] == [
      "init_from", "init_from", "rough"]
  with pytest.raises(errors.UserInputError, match="no checkpoint of stage 'gradient'"):
    train.preflight(default, ["rough", "gradient"])
  every = dataclasses.replace(default, init_from_stages=("rough", "gradient", "finetune"))
  assert train._how_to_start(every, "finetune", no_checkpoint) == "init_from"
  rough_only = dataclasses.replace(default, init_from_stages=("rough",))
  train.preflight(rough_only, ["rough", "gradient", "finetune"])  # nothing else is read
  assert [train._how_to_start(rough_only, s, no_checkpoint) for s in stages.STAGE_ORDER] == [
      "init_from", "fresh", "rough"]
  with pytest.raises(ValueError, match="--init_from_stages"):
    config_lib.validate(dataclasses.replace(default, init_from_stages=("rouhg",)))


# ---------------------------------------------------------------------------
# A pretrained-backbone architecture through the real loop.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_mobilenet_v3_runs_every_stage_and_exports(make_config, tmp_path):
  # mode=train (no eval, no report): the backbone's cost is its graph, traced per stage
  # (once each: --freeze_encoder_steps, a second trace per stage, is the next test's).
  config = make_config(tmp_path, architecture="mobilenet_v3", encoder_weights="none",
                       train_steps=2, mode="train", encoder_learning_rate_multiplier=0.5)
  results = stages.train_and_evaluate(config)
  assert [results[s].step for s in ("rough", "gradient", "finetune")] == [2, 2, 2]
  serving = tf.saved_model.load(workdir.export_dir(config)).signatures["serving_default"]
  images = np.random.default_rng(0).integers(0, 256, (1, 32, 24, 3), dtype=np.uint8)
  exported = serving(images=tf.constant(images))["depth"].numpy()
  expected = results["finetune"].model(images.astype(np.float32) / 255.0, training=False)
  np.testing.assert_allclose(exported, np.clip(expected.numpy()[..., 0], 0, config.max_depth),
                             rtol=1e-4, atol=1e-4)
  # The encoder has its own optimizer in the checkpoint (the multiplier).
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(
      workdir.checkpoint_dir(config, "rough")))
  assert any(k.startswith("encoder_optimizer/") for k in reader.get_variable_to_shape_map())


def _iterations(reader, optimizer: str) -> int:
  return int(reader.get_tensor(f"{optimizer}/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))


@pytest.mark.slow
def test_freeze_encoder_steps_switches_inside_the_real_loop(make_config, tmp_path):
  # Step 1 frozen, step 2 with the encoder, in ONE loop call (steps_per_loop=2): the
  # loop must stop at the switch. The encoder's own optimizer (multiplier 0.5) counts
  # the steps that updated the encoder.
  config = make_config(tmp_path, architecture="mobilenet_v3", encoder_weights="none",
                       stage="rough", train_steps=2, freeze_encoder_steps=1, mode="train",
                       encoder_learning_rate_multiplier=0.5, export=False)
  assert stages.train_and_evaluate(config)["rough"].step == 2
  reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(
      workdir.checkpoint_dir(config, "rough")))
  assert (_iterations(reader, "optimizer"), _iterations(reader, "encoder_optimizer")) == (2, 1)


def test_frozen_train_loop_leaves_the_encoder_alone(make_config, tmp_path):
  config = make_config(tmp_path, architecture="mobilenet_v3", encoder_weights="none",
                       stage="rough")
  strategy = tf.distribute.get_strategy()
  model, optimizer, encoder_optimizer = train.build_model_and_optimizer(
      config, "rough", strategy, "float32")
  assert encoder_optimizer is None  # multiplier 1: one Adam
  builder = datasets.get_builder(config.dataset, config.data_dir)
  batch = next(iter(input_pipeline.train_dataset(config, "rough", builder)))
  loop = train.make_train_loop(strategy, model, optimizer, train.stage_loss(config, "rough"),
                               config.global_batch_size, "rough", train_encoder=False)
  encoder = models.encoder_variables(model)
  before = [v.numpy() for v in encoder]
  decoder_before = model.get_layer("output_padded").kernel.numpy()
  loop(iter(tf.data.Dataset.from_tensors(batch).repeat()), tf.constant(2))
  for value, variable in zip(before, encoder):
    np.testing.assert_array_equal(value, variable.numpy())
  assert not np.array_equal(decoder_before, model.get_layer("output_padded").kernel.numpy())


def test_bad_encoder_weights_stop_before_anything_is_written(make_config, tmp_path):
  model_dir = tmp_path / "model"
  config = make_config(model_dir, architecture="mobilenet_v3", stage="rough",
                       encoder_weights=str(tmp_path / "missing.weights.h5"))
  with pytest.raises(models.EncoderWeightsError, match="--encoder_weights=.*missing"):
    stages.train_and_evaluate(config)
  assert not model_dir.exists()


def test_backbone_architectures_default_to_imagenet_and_others_refuse_weights(make_config,
                                                                            tmp_path):
  assert make_config(tmp_path, architecture="resnet50").encoder_weights == "imagenet"
  assert make_config(tmp_path).encoder_weights == "none"
  with pytest.raises(ValueError, match="--encoder_weights=imagenet is for"):
    make_config(tmp_path, architecture="unet", encoder_weights="imagenet")
  with pytest.raises(ValueError, match="--freeze_encoder_steps is for"):
    make_config(tmp_path, freeze_encoder_steps=3)


# ---------------------------------------------------------------------------
# --min_confidence
# ---------------------------------------------------------------------------
def test_low_confidence_depth_is_invalid_in_the_losses_and_the_metrics(make_config, tmp_path):
  config = make_config(tmp_path, image_size=(2, 2), depth_resize="nearest")
  depth = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
  confidence = np.array([[2, 1], [0, 2]], np.uint8)
  example = {"image": np.zeros((2, 2, 3), np.uint8), "depth": depth, "confidence": confidence}
  for level, kept in ((0, [1, 2, 3, 4]), (1, [1, 2, 4]), (2, [1, 4])):
    resized = input_pipeline.resize_example(example, config, level)["depth"].numpy()[..., 0]
    assert sorted(resized[resized > 0].tolist()) == kept, level
  # Training (--min_confidence=1) and the metrics (--eval_min_confidence=2) each use theirs.
  strict = dataclasses.replace(config, min_confidence=1, eval_min_confidence=2, augment=False)
  trained = input_pipeline.preprocess(example, strict, "rough", training=True,
                                      seed=tf.constant([1, 2], tf.int64))
  scored = input_pipeline.preprocess(example, strict, "rough", training=False)
  assert float(tf.reduce_sum(trained["mask"])) == 3 and float(tf.reduce_sum(scored["mask"])) == 2
  # Hand values: prediction 2 m everywhere, L1 over the pixels confidence keeps.
  prediction = tf.fill((1, 2, 2, 1), 2.0)
  l1 = losses.get_loss("l1")(trained["target"][None], prediction, trained["target_mask"][None])
  np.testing.assert_allclose(l1.numpy(), [(1.0 + 0.0 + 2.0) / 3])  # |2-1|, |2-2|, |2-4|


def test_min_confidence_flag_range(make_config, tmp_path):
  with pytest.raises(ValueError, match="--min_confidence must be 0, 1 or 2"):
    make_config(tmp_path, min_confidence=3)
  with pytest.raises(ValueError, match="--eval_min_confidence must be 0, 1 or 2"):
    make_config(tmp_path, eval_min_confidence=-1)
