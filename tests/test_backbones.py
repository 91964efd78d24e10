"""trainer.backbones: Keras-application encoders, their weights, BatchNorm mode, stages, FLOPs.

Kept small: 32x48 images, few builds (a ResNet50 build takes seconds here).
"""

import dataclasses
import os
import socket
import time

import h5py
import keras
from keras.src.legacy.saving import legacy_h5_format
import numpy as np
import pytest
import tensorflow as tf

from trainer import backbones
from trainer import models

SIZE = (32, 48)
BACKBONES = backbones.ARCHITECTURES


def _images(batch=2, size=SIZE, seed=0):
  return np.random.default_rng(seed).uniform(size=(batch, *size, 3)).astype(np.float32)


def _assert_same_weights(expected_model, actual_model):
  expected, actual = expected_model.weights, actual_model.weights
  assert [v.path for v in expected] == [v.path for v in actual]
  for e, a in zip(expected, actual):
    np.testing.assert_array_equal(e.numpy(), a.numpy(), err_msg=a.path)


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
  """(path, backbone) of a MobileNetV3Large weights file written by the test."""
  backbone = backbones.build_backbone("mobilenet_v3")
  path = str(tmp_path_factory.mktemp("weights") / "mobilenet_v3.weights.h5")
  backbone.save_weights(path)
  return path, backbone


def test_architectures_are_listed_once():
  assert models.ARCHITECTURES == ("seed", "unet", "mobilenet_v3", "resnet50")
  assert models.EncoderWeightsError is backbones.EncoderWeightsError
  assert issubclass(backbones.EncoderWeightsError, ValueError)


@pytest.mark.parametrize("architecture", BACKBONES)
def test_stages_any_size_and_finetune_from_rough(architecture):
  rough = models.build_network("rough", architecture)  # dynamic H, W
  fn = tf.function(rough, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  for size in [(30, 45), SIZE]:  # padded to 32x64 inside
    out = fn(_images(1, size))
    assert out.shape == (1, *size, 1) and out.dtype == tf.float32
    assert np.all(out.numpy() >= 0)

  finetune = models.build_stage_network("finetune", architecture, SIZE)
  gradient = models.gradient_subnetwork(finetune)
  assert gradient.name == f"{architecture}_gradient" and not gradient.trainable
  assert finetune.get_layer("concat_gradient").input[-1].shape[-1] == 1
  assert tuple(finetune.get_layer("stem2_sep").pointwise_kernel.shape) == (1, 1, 25, 24)
  # Only the finetune net's own encoder is trained, not the frozen gradient net's.
  own = models.encoder_variables(finetune)
  assert own and {id(v) for v in own} == {
      id(v) for v in finetune.get_layer(backbones.ENCODER_NAME).trainable_variables}
  assert not {id(v) for v in own} & {id(v) for v in gradient.weights}
  assert models.encoder_variables(models.build_network("rough", "unet", SIZE)) == []

  images = _images()
  copied = models.init_finetune_from_rough(rough, finetune)
  assert copied == len(rough.weights)
  np.testing.assert_allclose(finetune(images, training=False), rough(images, training=False),
                             rtol=1e-5, atol=1e-6)
  # The zero-initialised gradient channel is trainable from there.
  kernel = finetune.get_layer("stem2_sep").pointwise_kernel
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(finetune(images, training=True))
  assert np.any(tape.gradient(loss, kernel).numpy()[..., -1, :] != 0)
  with pytest.raises(ValueError, match="has no counterpart"):
    models.init_finetune_from_rough(models.build_network("rough", "unet", SIZE), finetune)


def test_preprocessing_is_the_applications():
  x = _images(1)
  resnet = backbones.CaffePreprocess()(x).numpy()
  np.testing.assert_allclose(resnet, keras.applications.resnet.preprocess_input(x * 255.0),
                             rtol=1e-5, atol=1e-3)
  # MobileNetV3: ours scales to 0..255, the application's own Rescaling to [-1, 1].
  ours = backbones._BACKBONES["mobilenet_v3"].preprocess()  # pylint: disable=protected-access
  own = backbones.build_backbone("mobilenet_v3").layers[1]
  assert isinstance(own, keras.layers.Rescaling)
  np.testing.assert_allclose(own(ours(x)).numpy(), 2 * x - 1, atol=1e-5)


def test_weights_from_a_file_the_test_wrote(mobilenet_file, tmp_path, caplog):
  path, saved = mobilenet_file
  with caplog.at_level("INFO", logger="absl"):
    model = models.build_network("rough", "mobilenet_v3", SIZE, encoder_weights=path)
  _assert_same_weights(saved, model.get_layer(backbones.ENCODER_NAME))
  assert f"encoder mobilenet_v3: loaded file weights from {path}" in caplog.text
  # A .keras file of the application works the same way.
  keras_path = str(tmp_path / "mobilenet_v3.keras")
  saved.save(keras_path)
  model = models.build_network("gradient", "mobilenet_v3", SIZE, encoder_weights=keras_path)
  _assert_same_weights(saved, model.get_layer(backbones.ENCODER_NAME))
  # Random weights differ from the file's.
  fresh = models.build_network("rough", "mobilenet_v3", SIZE, encoder_weights="none")
  assert not np.array_equal(fresh.get_layer(backbones.ENCODER_NAME).weights[0].numpy(),
                            saved.weights[0].numpy())  # conv kernel


def test_bad_weight_files_are_clear_errors(mobilenet_file, tmp_path):
  path, _ = mobilenet_file
  junk = tmp_path / "junk.weights.h5"
  junk.write_text("not hdf5")
  small = str(tmp_path / "small.weights.h5")
  keras.applications.MobileNetV3Small(include_top=False, weights=None,
                                      input_shape=(None, None, 3)).save_weights(small)
  backbone = backbones.build_backbone("mobilenet_v3")
  for bad, why in [(str(tmp_path / "missing.weights.h5"), "no such file"),
                   (str(junk), "cannot load"), (small, "cannot load"),
                   (str(tmp_path / "weights.npz"), "expected a .weights.h5")]:
    with pytest.raises(backbones.EncoderWeightsError) as error:
      backbones.load_encoder_weights(backbone, "mobilenet_v3", bad)
    message = str(error.value)
    assert f"--encoder_weights={bad}" in message and why in message, message
    # ... and says how to give a file.
    assert "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5" in message
    assert "--encoder_weights=PATH" in message
  with pytest.raises(backbones.EncoderWeightsError, match="not 'unet'"):
    models.build_network("rough", "unet", SIZE, encoder_weights=path)


def _offline(*args, **kwargs):
  raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")


def test_imagenet_offline_with_an_empty_cache_fails_fast(tmp_path, monkeypatch):
  # KERAS_HOME is read at call time; DNS fails as on this project's machines
  # (and deterministically on machines that do have a network).
  monkeypatch.setenv("KERAS_HOME", str(tmp_path))
  monkeypatch.setattr(socket, "getaddrinfo", _offline)
  backbone = backbones.build_backbone("resnet50")
  start = time.monotonic()
  with pytest.raises(backbones.EncoderWeightsError) as error:
    backbones.load_encoder_weights(backbone, "resnet50", "imagenet")
  assert time.monotonic() - start < 10
  message = str(error.value)
  expected_path = os.path.join(str(tmp_path), "models",
                               "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
  assert "--encoder_weights=imagenet" in message and expected_path in message
  assert "downloading https://storage.googleapis.com/" in message and "test: offline" in message
  assert socket.getdefaulttimeout() is None  # the download's timeout was restored


def test_imagenet_from_a_pre_placed_cache_file(tmp_path, monkeypatch):
  """Keras' ImageNet files are legacy .h5: a file of that layout, pre-placed, loads offline."""
  monkeypatch.setenv("KERAS_HOME", str(tmp_path))
  monkeypatch.setattr(socket, "getaddrinfo", _offline)
  source = backbones.build_backbone("mobilenet_v3")
  path = backbones.imagenet_weights_path("mobilenet_v3")
  assert path == os.path.join(str(tmp_path), "models",
                              "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5")
  os.makedirs(os.path.dirname(path))
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, source)
  spec = backbones._BACKBONES["mobilenet_v3"]  # pylint: disable=protected-access
  # A file that is not Keras' (hash) is refused, not loaded nor re-downloaded.
  with pytest.raises(backbones.EncoderWeightsError, match="is not Keras' ImageNet file"):
    backbones.build_encoder("mobilenet_v3", "imagenet")
  # pylint: disable=protected-access
  placed = dataclasses.replace(spec, imagenet_md5=backbones._md5(path))
  monkeypatch.setitem(backbones._BACKBONES, "mobilenet_v3", placed)
  encoder = backbones.build_encoder("mobilenet_v3", "imagenet")
  _assert_same_weights(source, encoder)


@pytest.mark.parametrize("architecture", BACKBONES)
def test_batch_norm_frozen_with_loaded_weights_synchronized_without(architecture):
  assert backbones.resolve_freeze_batch_norm("imagenet") is True
  assert backbones.resolve_freeze_batch_norm("/w.weights.h5") is True
  assert backbones.resolve_freeze_batch_norm("none") is False
  assert backbones.resolve_freeze_batch_norm(None, True) is True

  frozen = backbones.build_encoder(architecture, None, freeze_batch_norm=True)
  norms = [l for l in frozen.layers if isinstance(l, keras.layers.BatchNormalization)]
  assert norms and all(isinstance(l, backbones.FrozenStatisticsBatchNormalization)
                       for l in norms)
  x = _images(2, (32, 32)) * 255.0
  stats = [w.numpy().copy() for w in frozen.non_trainable_weights]
  inference = frozen(x, training=False)
  frozen.trainable = False  # (toggling trainable, as a freeze-then-unfreeze would)
  frozen.trainable = True
  for expected, actual in zip(inference, frozen(x, training=True)):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
  for old, new in zip(stats, frozen.non_trainable_weights):
    np.testing.assert_array_equal(old, new.numpy())  # moving statistics never updated
  assert any("gamma" in v.path for v in frozen.trainable_variables)  # still tuned

  trained = backbones.build_encoder(architecture, "none")
  norms = [l for l in trained.layers if isinstance(l, keras.layers.BatchNormalization)]
  assert not any(isinstance(l, backbones.FrozenStatisticsBatchNormalization) for l in norms)
  assert all(l.synchronized and l.momentum == models.UNET_BN_MOMENTUM for l in norms)
  before = norms[0].moving_mean.numpy().copy()
  trained(x, training=True)
  assert not np.array_equal(before, norms[0].moving_mean.numpy())


def test_weights_move_between_batch_norm_modes(tmp_path):
  """A frozen-statistics net's weights restore into a plain rebuild (export, --init_from)."""
  images = _images(1)
  frozen = models.build_network("rough", "mobilenet_v3", SIZE, freeze_encoder_batch_norm=True)
  expected = frozen(images, training=False).numpy()
  by_order = models.build_network("rough", "mobilenet_v3", SIZE)  # export's float32 copy
  by_order.set_weights(frozen.get_weights())
  np.testing.assert_array_equal(by_order(images, training=False), expected)
  path = tf.train.Checkpoint(model=frozen).save(str(tmp_path / "ckpt"))
  restored = models.build_network("rough", "mobilenet_v3", SIZE)
  tf.train.Checkpoint(model=restored).restore(path).assert_existing_objects_matched()
  np.testing.assert_array_equal(restored(images, training=False), expected)


@pytest.mark.parametrize("architecture", BACKBONES)
def test_initial_depth_and_float32_output_under_mixed_float16(architecture):
  depth = models.build_network("rough", architecture, SIZE, initial_depth=2.5)(
      _images(), training=False).numpy()
  # Random encoder features add more spread around the bias than the U-Net's.
  assert abs(float(np.median(depth)) - 2.5) < 0.3
  zero_bias = models.build_network("rough", architecture, SIZE)(_images(), training=False)
  assert abs(float(np.median(zero_bias)) - 2.5) > 1.0

  previous = keras.mixed_precision.global_policy()
  try:
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = models.build_network("rough", architecture, SIZE, freeze_encoder_batch_norm=True)
    encoder = model.get_layer(backbones.ENCODER_NAME)
    assert encoder.layers[2].compute_dtype == "float16"  # the first conv
    out = model(_images(1), training=True)  # (float16 convolutions are slow on CPU)
    assert out.dtype == tf.float32 and model.output.dtype == "float32"
    assert np.all(np.isfinite(out.numpy()))
  finally:
    keras.mixed_precision.set_global_policy(previous)


# Published multiply-accumulates at 224x224 with the classifier head, which
# include_top=False drops (a few M): MobileNetV3Large 219 M (Howard et al.
# 2019), ResNet50 3.8-4.1 G (He et al. 2016 count 3.8 G multiply-adds).
@pytest.mark.parametrize("architecture, published_macs", [("mobilenet_v3", 219e6),
                                                          ("resnet50", 3.9e9)])
def test_count_flops(architecture, published_macs):
  backbone_flops = models.count_flops(backbones.build_backbone(architecture), (224, 224))
  assert 0.95 * published_macs < backbone_flops / 2 < 1.05 * published_macs
  model = models.build_network("rough", architecture)
  small, large = models.count_flops(model, (64, 64)), models.count_flops(model, (128, 128))
  assert small > 0
  # 4x the pixels, ~4x the FLOPs (the squeeze-excite 1x1 convs on pooled
  # features do not grow with the image).
  assert 3.9 < large / small <= 4.0
