"""TFLite export in three precisions, run with LiteRT, checked against the SavedModel.

One tiny U-Net rough network (32x24, trained a few Adam steps so its depth
varies over the image) is exported as our SavedModel (trainer.export) and as
depth_{float32,float16,int8}.tflite (trainer.tflite_export); every file is
loaded through trainer.exported_model and compared with the SavedModel on the
same held-out images. The conversions take most of the time: the tests that
need them are marked slow; the preprocessing and bad-input tests are quick.
"""

import json
import logging as std_logging
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import export
from trainer import exported_model
from trainer import models
from trainer import preprocessing
from trainer import tflite_export

SIZE = (32, 24)  # training size (H, W), portrait like the iPhone's frames
LANDSCAPE = (24, 32)
MAX_DEPTH = 10.0


def smooth_images(rng, count, size):
  """uint8 [count, H, W, 3]: smooth colour fields plus noise (a scene-like, learnable input)."""
  low = rng.uniform(0, 255, (count, 4, 3, 3)).astype(np.float32)
  x = tf.image.resize(low, size, method="bicubic").numpy() + rng.normal(0, 8, (count, *size, 3))
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def abs_rel(prediction, reference):
  """Mean |p - r| / r over images [N, H, W] (the reference depth is > 0 here)."""
  return float(np.mean(np.abs(prediction - reference) / reference))


def predict_all(model, images):
  return np.stack([model.predict(image) for image in images])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The network, its SavedModel, the three TFLite files, and held-out test images."""
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  network = models.build_stage_network("rough", "unet", SIZE, initial_depth=2.5)
  train = smooth_images(rng, 16, SIZE)
  x = preprocessing.network_input(train, SIZE).numpy()
  # Depth 1..5 m from brightness: 20 Adam steps give a net whose output spans
  # meters (checked below), so relative errors are measured on real variation.
  network.compile(keras.optimizers.Adam(3e-3), "mae", jit_compile=False)
  network.fit(x, 1.0 + 4.0 * x.mean(-1, keepdims=True), batch_size=4, epochs=5, verbose=0)
  root = tmp_path_factory.mktemp("tflite")
  config = config_lib.Config(model_dir=str(root), architecture="unet", image_size=SIZE,
                             max_depth=MAX_DEPTH)
  saved_model = export.export_saved_model(config, "rough", network, str(root / "export"))
  # Calibration on training-like images (the lead feeds training images), testing on others.
  tflite = tflite_export.export_tflite(network, SIZE, MAX_DEPTH, str(root / "export"),
                                       calibration_images=list(smooth_images(rng, 16, SIZE)))
  test_images = smooth_images(rng, 4, SIZE)
  reference = predict_all(exported_model.load(saved_model), test_images)
  return {"network": network, "saved_model": saved_model, "tflite": tflite, "rng": rng,
          "images": test_images, "reference": reference, "calibration": train}


@pytest.mark.slow
def test_reference_depth_varies(trained):
  # Guards the accuracy tests below: a near-constant net would pass them trivially.
  reference = trained["reference"]
  assert reference.shape == (4, *SIZE)
  # (measured: std 0.2-0.4 m over 1.9-4 m; predicting the mean everywhere would
  # be ~0.07 abs_rel off, well above the int8 bound of 0.02)
  assert reference.std() > 0.1 and reference.max() - reference.min() > 0.5, (
      reference.std(), reference.min(), reference.max())


@pytest.mark.slow
def test_files_and_signature(trained):
  paths = trained["tflite"]
  assert sorted(paths) == sorted(tflite_export.PRECISIONS)
  for precision, path in paths.items():
    assert os.path.basename(path) == f"depth_{precision}.tflite"
    model = exported_model.load(path)
    assert isinstance(model, exported_model.TFLiteModel)
    assert model.input_size == SIZE
    assert model.file_size_bytes == os.path.getsize(path)
  saved = exported_model.load(trained["saved_model"])
  assert isinstance(saved, exported_model.SavedModel)
  assert saved.input_size is None
  assert saved.metadata["image_size"] == list(SIZE)
  assert saved.file_size_bytes > os.path.getsize(os.path.join(trained["saved_model"],
                                                              "saved_model.pb"))


def test_runs_with_litert():
  # The test extra installs ai-edge-litert: the deprecated fallback must not be in use.
  from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
  assert exported_model.interpreter_class() is litert.Interpreter


@pytest.mark.slow
def test_float32_matches_saved_model(trained):
  depth = predict_all(exported_model.load(trained["tflite"]["float32"]), trained["images"])
  assert depth.dtype == np.float32 and depth.shape == trained["reference"].shape
  assert np.abs(depth - trained["reference"]).max() < 1e-3


@pytest.mark.slow
def test_float16_matches_saved_model(trained):
  depth = predict_all(exported_model.load(trained["tflite"]["float16"]), trained["images"])
  assert abs_rel(depth, trained["reference"]) < 0.005


@pytest.mark.slow
def test_int8_matches_saved_model(trained):
  depth = predict_all(exported_model.load(trained["tflite"]["int8"]), trained["images"])
  assert abs_rel(depth, trained["reference"]) < 0.02
  assert np.all((depth >= 0) & (depth <= MAX_DEPTH))


@pytest.mark.slow
def test_file_sizes(trained):
  sizes = {p: os.path.getsize(path) for p, path in trained["tflite"].items()}
  assert sizes["float16"] < 0.55 * sizes["float32"]
  # Issue 15 asks for int8 < 1/4 of float32: unreachable by construction. int8
  # weights are exactly 1/4 of float32 ones, int32 biases are as large as
  # float32 ones, and each per-channel quantized tensor adds a float32 scale and
  # an int64 zero point per channel: measured 0.30 for this unet (and for the
  # demo's finetune chain, where weights + biases alone are 0.2517).
  assert sizes["int8"] < 0.32 * sizes["float32"], sizes


@pytest.mark.slow
def test_int8_is_integer_except_the_boundaries(trained):
  # uint8 image -> CAST -> QUANTIZE -> int8 network -> DEQUANTIZE -> meters.
  float_ops = tflite_export.float_ops(trained["tflite"]["int8"])
  assert float_ops == ["CAST x1", "DEQUANTIZE x1", "QUANTIZE x1"], float_ops
  # The float32 file really computes in float (the check above can fail).
  assert "CONV_2D x17" in tflite_export.float_ops(trained["tflite"]["float32"])


@pytest.mark.slow
def test_landscape_input_size(trained, tmp_path):
  # A portrait network exported for landscape images: the file resizes 24x32 ->
  # 32x24 like the SavedModel does (network_input), and the depth back.
  rng = trained["rng"]
  paths = tflite_export.export_tflite(
      trained["network"], SIZE, MAX_DEPTH, str(tmp_path), ["float32", "int8"],
      input_size=LANDSCAPE, calibration_images=list(smooth_images(rng, 16, LANDSCAPE)))
  images = smooth_images(rng, 3, LANDSCAPE)
  reference = predict_all(exported_model.load(trained["saved_model"]), images)
  float32 = exported_model.load(paths["float32"])
  assert float32.input_size == LANDSCAPE
  depth = predict_all(float32, images)
  assert depth.shape == (3, *LANDSCAPE)
  assert np.abs(depth - reference).max() < 1e-3
  assert abs_rel(predict_all(exported_model.load(paths["int8"]), images), reference) < 0.02


@pytest.mark.slow
def test_other_image_size_is_resized_once(trained, caplog):
  # A 64x48 photo into the fixed 32x24 float32 file: resized to 32x24 (uint8),
  # depth resized back to 64x48, said once in the log however many images.
  model = exported_model.load(trained["tflite"]["float32"])
  saved = exported_model.load(trained["saved_model"])
  images = smooth_images(trained["rng"], 2, (64, 48))
  with caplog.at_level(std_logging.INFO, logger="absl"):  # absl logs through it
    depth = predict_all(model, images)
  assert depth.shape == (2, 64, 48)
  messages = [r.getMessage() for r in caplog.records if "fixed input" in r.getMessage()]
  assert len(messages) == 1 and "(64, 48)" in messages[0], messages
  # The SavedModel resizes the float image instead of a uint8 copy: close, not equal.
  assert abs_rel(depth, predict_all(saved, images)) < 0.01


@pytest.mark.slow
def test_latency(trained):
  model = exported_model.load(trained["tflite"]["int8"])
  for threads in (1, None):
    latency = model.latency_ms(threads, repeats=3, warmup=1)
    assert 0 < latency < 10_000
  with pytest.raises(ValueError, match="fixed at"):
    model.latency_ms(1, image_size=(64, 48))


@pytest.mark.slow
def test_saved_model_latency_in_subprocess(trained):
  latency = exported_model.load(trained["saved_model"]).latency_ms(1, repeats=2, warmup=1)
  assert 0 < latency < 10_000


# ----------------------------------------------------------------------------
# Quick tests: preprocessing, names, bad input.


@pytest.mark.parametrize("input_size", [(32, 24), (24, 32), (64, 48), (100, 75), (20, 13)])
def test_fixed_size_input_matches_network_input(input_size):
  images = np.random.default_rng(1).integers(0, 256, (2, *input_size, 3), dtype=np.uint8)
  fixed = tflite_export._FixedSizeInput(input_size, SIZE)
  expected = preprocessing.network_input(images, SIZE).numpy()
  np.testing.assert_allclose(fixed(tf.constant(images)).numpy(), expected, atol=2e-6)
  # At the training size network_input is the identity: no resize ops at all.
  assert (not fixed._axes) == (input_size == SIZE)


def test_parse_precisions():
  assert tflite_export.parse_precisions("int8, float32,int8") == ("int8", "float32")
  with pytest.raises(ValueError, match=r"--tflite.*'int4'.*float32, float16, int8"):
    tflite_export.parse_precisions("float32,int4")
  with pytest.raises(ValueError, match="--tflite: no precision"):
    tflite_export.parse_precisions(" , ")


@pytest.fixture(scope="module")
def tiny_network():
  """A 2-layer float32 depth-like net: conversions of it take a second or two."""
  image = keras.Input((8, 6, 3))
  x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(image)
  return keras.Model(image, keras.layers.Conv2D(1, 3, padding="same", activation="softplus")(x))


def test_int8_without_calibration_images(tiny_network, tmp_path):
  for images in (None, [], iter(())):
    with pytest.raises(ValueError, match="zero images"):
      tflite_export.export_tflite(tiny_network, (8, 6), MAX_DEPTH, str(tmp_path), ["int8"],
                                  calibration_images=images)
  assert not os.listdir(tmp_path)  # nothing half-written


def test_calibration_image_of_wrong_type(tiny_network, tmp_path):
  with pytest.raises(ValueError, match=r"calibration image 1: need uint8 \[H, W, 3\]"):
    tflite_export.export_tflite(tiny_network, (8, 6), MAX_DEPTH, str(tmp_path), ["int8"],
                                calibration_images=[np.zeros((8, 6, 3), np.uint8),
                                                    np.zeros((8, 6, 3), np.float32)])


def test_mixed_precision_network_is_refused(tmp_path):
  previous = keras.mixed_precision.global_policy().name
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    image = keras.Input((8, 6, 3))
    network = keras.Model(image, keras.layers.Conv2D(1, 3, padding="same")(image))
  finally:
    keras.mixed_precision.set_global_policy(previous)
  with pytest.raises(ValueError, match="float32_copy"):
    tflite_export.export_tflite(network, (8, 6), MAX_DEPTH, str(tmp_path), ["float32"])


def test_tiny_export_predicts(tiny_network, tmp_path):
  # Also the positive control of the bad-input tests: a file of ours loads.
  path = tflite_export.export_tflite(tiny_network, (8, 6), MAX_DEPTH, str(tmp_path),
                                     ["float32"])["float32"]
  rgb = np.full((8, 6, 3), 128, np.uint8)
  expected = tiny_network(preprocessing.network_input(rgb[None], (8, 6)))[0, :, :, 0]
  np.testing.assert_allclose(exported_model.load(path).predict(rgb), expected, atol=1e-5)
  with pytest.raises(ValueError, match=r"uint8 RGB image \[H, W, 3\]"):
    exported_model.load(path).predict(rgb.astype(np.float32))
  with pytest.raises(ValueError, match=r"uint8 RGB image \[H, W, 3\]"):
    exported_model.load(path).predict(rgb[None])


def test_quantization_friendly_softplus_is_softplus():
  x = tf.constant(np.linspace(-30, 30, 6001, dtype=np.float32))
  np.testing.assert_allclose(tflite_export.quantization_friendly_softplus(x).numpy(),
                             keras.activations.softplus(x).numpy(), rtol=1e-6, atol=1e-7)


def _near_and_far_network():
  """1x1 conv + softplus (the unet's output head): depth softplus(7 * mean(rgb) - 1), 0.31..6 m."""
  image = keras.Input((8, 6, 3))
  head = keras.layers.Conv2D(1, 1, activation="softplus", name="output")
  network = keras.Model(image, head(image))
  head.set_weights([np.full((1, 1, 3, 1), 7.0 / 3, np.float32), np.array([-1.0], np.float32)])
  return network, head


def _ramps(rng, count):
  """uint8 [8, 6, 3] brightness ramps over the whole 0..255 (depths 0.31..6 m in every image)."""
  ramp = np.linspace(0, 255, 48).reshape(8, 6, 1)
  return [np.clip(np.roll(ramp, shift) + rng.normal(0, 3, (8, 6, 3)), 0, 255).astype(np.uint8)
          for shift in rng.integers(0, 48, count)]


def test_int8_softplus_keeps_near_depths(tmp_path):
  # Issue 15: the converter writes Keras' softplus as log(1 + exp(x)); in int8
  # exp(x) spans 0..exp(6) = 403 in steps of ~1.6, so every depth under ~1 m
  # came out of exp(x) in {0, 1.6}: near abs_rel 0.27 (measured) without the
  # rewrite, 0.015 with it.
  network, head = _near_and_far_network()
  rng = np.random.default_rng(0)
  path = tflite_export.export_tflite(network, (8, 6), MAX_DEPTH, str(tmp_path), ["int8"],
                                     calibration_images=_ramps(rng, 16))["int8"]
  assert tflite_export.float_ops(path) == ["CAST x1", "DEQUANTIZE x1", "QUANTIZE x1"]
  assert head.activation is keras.activations.softplus  # restored after the int8 trace
  images = _ramps(rng, 8)
  reference = np.stack([network(preprocessing.network_input(image[None], (8, 6)))[0, ..., 0]
                        for image in images])
  depth = predict_all(exported_model.load(path), images)
  near = reference < 1.5
  assert 0.2 < near.mean() < 0.5 and reference.max() > 5.5  # near and far in every file
  assert abs_rel(depth[near], reference[near]) < 0.05
  assert abs_rel(depth, reference) < 0.02


def test_int8_softplus_rewrite_is_checked(tmp_path, monkeypatch):
  # The rewrite must be the same function in float: a different one fails the export.
  network, head = _near_and_far_network()
  monkeypatch.setattr(tflite_export, "quantization_friendly_softplus", tf.nn.relu)
  with pytest.raises(RuntimeError, match="not the same function as softplus"):
    tflite_export.export_tflite(network, (8, 6), MAX_DEPTH, str(tmp_path), ["int8"],
                                calibration_images=_ramps(np.random.default_rng(0), 2))
  assert head.activation is keras.activations.softplus
  assert not os.listdir(tmp_path)


def _write_tflite(path, function, module=None):
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [function.get_concrete_function()], module)
  with open(path, "wb") as f:
    f.write(converter.convert())
  return str(path)


def test_tflite_not_ours(tmp_path):
  garbage = tmp_path / "garbage.tflite"
  garbage.write_bytes(b"not a flatbuffer at all" * 10)
  with pytest.raises(ValueError, match=f"{garbage}: not a TFLite model"):
    exported_model.load(str(garbage))

  class Module(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([1, 8, 6, 3], tf.float32, name="x")])
    def wrong_name(self, x):
      return {"depth": x[..., 0]}

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 6, 3], tf.float32, name="images")])
    def float_images(self, images):
      return {"depth": images[..., 0]}

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 6, 3], tf.uint8, name="images")])
    def wrong_output(self, images):
      return {"depth": tf.cast(images, tf.float32)}  # [1, 8, 6, 3], not [1, 8, 6]

  module = Module()
  cases = {"wrong_name": "not a depth2d TFLite model: need signature 'serving_default' "
                         "with input 'images'",
           "float_images": r"input 'images' must be uint8 \[1, H, W, 3\], got float32",
           "wrong_output": r"output 'depth' must be float32 \[1, 8, 6\]"}
  for name, message in cases.items():
    path = _write_tflite(tmp_path / f"{name}.tflite", getattr(module, name), module)
    with pytest.raises(ValueError, match=message) as error:
      exported_model.load(path)
    assert path in str(error.value)


def test_saved_model_not_ours(tmp_path):
  with pytest.raises(ValueError, match="no such file or folder"):
    exported_model.load(str(tmp_path / "missing"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=f"{empty}: not a SavedModel folder"):
    exported_model.load(str(empty))

  class Module(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="x")])
    def serve(self, x):
      return {"depth": x[..., 0]}

  module = Module()
  other = str(tmp_path / "other")
  tf.saved_model.save(module, other, signatures={"serving_default": module.serve})
  with pytest.raises(ValueError, match=f"{other}: not a depth2d SavedModel: serving_default "
                                       "must take one input 'images' uint8"):
    exported_model.load(other)
  unsigned = str(tmp_path / "unsigned")
  tf.saved_model.save(module, unsigned, signatures={"predict": module.serve})
  with pytest.raises(ValueError, match=r"no 'serving_default' signature \(found \['predict'\]\)"):
    exported_model.load(unsigned)
  with open(os.path.join(other, "depth2d.json"), "w") as f:
    json.dump({"stage": "rough"}, f)  # a metadata file does not make it ours
  with pytest.raises(ValueError, match="not a depth2d SavedModel"):
    exported_model.load(other)


def test_fallback_without_litert(tiny_network, tmp_path, monkeypatch, caplog):
  # ai-edge-litert missing: tf.lite.Interpreter runs the file, with one warning.
  path = tflite_export.export_tflite(tiny_network, (8, 6), MAX_DEPTH, str(tmp_path),
                                     ["float32"])["float32"]
  monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # makes the import fail
  monkeypatch.setattr(exported_model, "_warned_fallback", False)
  with caplog.at_level(std_logging.WARNING, logger="absl"):
    assert exported_model.interpreter_class() is tf.lite.Interpreter
    depth = exported_model.load(path).predict(np.full((8, 6, 3), 128, np.uint8))
    assert "CONV_2D x2" in tflite_export.float_ops(path)  # op details work there too
  assert depth.shape == (8, 6)
  warnings = [r for r in caplog.records if "ai-edge-litert is not installed" in r.getMessage()]
  assert len(warnings) == 1
