"""Augmentation on the host (per example) and on the accelerator (per batch,
in the train step) give the same training tensors; the train step applies
the draws a batch carries."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import augmentation
from trainer import datasets
from trainer import input_pipeline
from trainer import preprocessing
from trainer import train

TOLERANCE = 1e-6  # float rounding: the closed-form saturation, the flipped Sobel's sums


@pytest.mark.parametrize("factor", [0.0, 0.5, 0.85, 1.0, 1.15, 2.0, 10.0])
def test_closed_form_saturation_equals_adjust_saturation(factor):
  rng = np.random.default_rng(int(factor * 100))
  images = rng.uniform(-0.2, 1.2, (4, 9, 7, 3)).astype(np.float32)  # jitter overshoots [0, 1]
  images[1] = 0.5  # grey
  images[2] = -np.abs(images[2])  # V <= 0
  images[3, :3, :3] = [0.3, 0.3, 0.9]  # two channels at the minimum
  ours = augmentation.saturate(tf.constant(images), tf.fill([4, 1, 1, 1], factor))
  reference = np.stack([tf.image.adjust_saturation(image, factor) for image in images])
  np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE)


def test_draws_are_what_tf_image_stateless_random_draws():
  """apply_to_example(draw(seed)) is the chain of tf.image's stateless random
  ops on the same split seeds, value for value."""
  rng = np.random.default_rng(1)
  image = tf.constant(rng.random((12, 10, 3)).astype(np.float32))
  depth = tf.constant(rng.random((12, 10, 1)).astype(np.float32))
  flips = set()
  for s in range(12):
    seed = tf.constant([s, 3], tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    flip = bool(tf.random.stateless_uniform([], seeds[0]) < 0.5)
    flips.add(flip)
    expected = tf.reverse(image, axis=[1]) if flip else image
    expected = tf.image.stateless_random_brightness(expected, 0.05, seeds[1])
    expected = tf.image.stateless_random_contrast(expected, 0.85, 1.15, seeds[2])
    expected = tf.image.stateless_random_saturation(expected, 0.85, 1.15, seeds[3])
    ours, ours_depth = augmentation.apply_to_example(image, depth, augmentation.draw(seed))
    np.testing.assert_array_equal(ours, tf.clip_by_value(expected, 0.0, 1.0))
    np.testing.assert_array_equal(ours_depth, depth.numpy()[:, ::-1] if flip else depth)
  assert flips == {True, False}


@pytest.mark.parametrize("stage", ["gradient", "rough"])
def test_device_batches_equal_host_batches(make_config, tmp_path, stage):
  """train_dataset with --augment_on=device, then finish_batch (what the
  train step does: augmentation, mask, target), equals train_dataset with
  --augment_on=host."""
  host = make_config(tmp_path, shuffle_buffer=4, augment_on="host")
  device = dataclasses.replace(host, augment_on="device")
  builder = datasets.get_builder(host.dataset, host.data_dir)
  host_batches = list(input_pipeline.train_dataset(host, stage, builder).take(4)
                      .as_numpy_iterator())
  device_batches = list(input_pipeline.train_dataset(device, stage, builder).take(4))
  assert augmentation.PARAMS not in host_batches[0]
  # The host's CPU only decodes (and resizes depth): no mask, no target yet,
  # and the images arrive as uint8 decodes (one size in the dummy split).
  assert sorted(device_batches[0]) == sorted(["image", "depth", augmentation.PARAMS])
  assert device_batches[0]["image"].dtype == tf.uint8
  assert device_batches[0][augmentation.PARAMS].shape == (host.global_batch_size, 4)
  flips = np.concatenate([b[augmentation.PARAMS][:, 0] for b in device_batches])
  assert 0 < flips.sum() < flips.size  # some flipped, some not: both paths are checked
  for ours, reference in zip(device_batches, host_batches):
    ours = input_pipeline.finish_batch(ours, stage)
    assert sorted(ours) == sorted(reference)
    for key in reference:
      np.testing.assert_allclose(ours[key], reference[key], rtol=0, atol=TOLERANCE,
                                 err_msg=key)


@pytest.mark.parametrize("stage", ["gradient", "rough"])
def test_train_step_finishes_the_batches_that_carry_draws(make_config, tmp_path, stage):
  """The loss of the real train step on a batch with draws (and decoded uint8
  images, resized in the step) equals its loss on the host-finished batch
  (resized, augmented per example, then mask and the stage's target; learning
  rate 0: the same weights see both), and differs from the loss on the batch
  finished without augmentation."""
  config = make_config(tmp_path, stage=stage, architecture="unet")
  strategy = tf.distribute.get_strategy()
  # The same initial weights whichever tests ran before in this process (with
  # some, the rough stage's loss moved by less than 1e-4 with augmentation).
  keras.utils.set_random_seed(config.seed)
  model, _, _ = train.build_model_and_optimizer(config, stage, strategy, "float32")
  loop = train.make_train_loop(strategy, model, keras.optimizers.SGD(learning_rate=0.0),
                               train.stage_loss(config, stage), config.global_batch_size,
                               stage)
  builder = datasets.get_builder(config.dataset, config.data_dir)
  batch = next(iter(input_pipeline.train_dataset(
      dataclasses.replace(config, augment_on="device"), stage, builder)))
  params = np.array([[1.0, 0.05, 1.15, 0.85]] * config.global_batch_size, np.float32)
  with_draws = {**batch, augmentation.PARAMS: tf.constant(params)}
  # One image size in the dummy split: the host only decodes, the step resizes.
  assert batch["image"].dtype == tf.uint8
  resized = {"image": preprocessing.network_input(batch["image"], config.image_size),
             "depth": batch["depth"]}
  images, depths = zip(*(augmentation.apply_to_example(resized["image"][i], resized["depth"][i],
                                                       tf.constant(params[i]))
                         for i in range(config.global_batch_size)))
  # The host path's finish (mask, target) on whole batches, augmentation off.
  finish = lambda features: input_pipeline.finish_example(features, stage, augment_it=False)
  host = finish({"image": tf.stack(images), "depth": tf.stack(depths)})
  plain = finish(resized)
  loss = lambda b: float(loop(iter(tf.data.Dataset.from_tensors(b).repeat()), tf.constant(1)))
  device_loss, host_loss, plain_loss = loss(with_draws), loss(host), loss(plain)
  assert device_loss == pytest.approx(host_loss, rel=1e-5)
  assert abs(device_loss - plain_loss) > 1e-4 * abs(plain_loss)


def test_the_host_resizes_when_the_step_cannot(make_config, tmp_path, monkeypatch):
  """The image resize stays on the host (float32 images at the training size)
  when the split lists several image sizes (no one batch shape for the step),
  or when the uint8 decodes would not fit the memory cache that holds the
  resized split."""
  config = make_config(tmp_path, shuffle_buffer=4, augment_on="device")
  # Half the usual training size, so that the uint8 decodes take more memory
  # than the float32 resized images.
  config = dataclasses.replace(config, image_size=tuple(v // 2 for v in config.image_size))
  builder = datasets.get_builder(config.dataset, config.data_dir)
  image = lambda: next(iter(input_pipeline.train_dataset(config, "rough", builder)))["image"]
  shape = input_pipeline.device_decode_shape(config, builder, "train")
  assert shape and image().dtype == tf.uint8
  decoded = input_pipeline._cached_bytes(builder, "train", config, image_shape=shape)
  resized = input_pipeline._cached_bytes(builder, "train", config)
  assert decoded > resized
  monkeypatch.setattr(input_pipeline, "CACHE_LIMIT_BYTES", (decoded + resized) // 2)
  assert input_pipeline.device_decode_shape(config, builder, "train") is None
  assert image().dtype == tf.float32 and image().shape[1:3] == config.image_size
  monkeypatch.undo()
  stats = builder.info.metadata["stats"]["train"]
  monkeypatch.setitem(stats, "image_sizes", stats["image_sizes"] + [[7, 9]])
  assert input_pipeline.device_decode_shape(config, builder, "train") is None
  assert image().dtype == tf.float32


def test_auto_is_host_without_an_accelerator_and_bad_names_are_refused():
  assert not tf.config.list_logical_devices("GPU") and not tf.config.list_logical_devices("TPU")
  assert augmentation.resolve_place("auto") == "host"
  assert augmentation.resolve_place("device") == "device"
  with pytest.raises(ValueError, match="--augment_on='gpu'"):
    augmentation.resolve_place("gpu")
