"""trainer.models: the seed body exactly, the U-Net, finetune wiring, FLOPs.

The Keras-application backbones have their own (heavier) tests: test_backbones.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import models

SIZE = (32, 48)
OWN_ARCHITECTURES = ("seed", "unet")  # the models.py bodies


def _images(batch=2, size=SIZE, seed=0):
  return np.random.default_rng(seed).uniform(size=(batch, *size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def seed_gradient():
  return models.build_network("gradient", "seed", SIZE)


def test_seed_body_is_the_notebook_network():
  model = models.build_network("rough", "seed")
  layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
  # (class, filters, kernel weight shape, activation) in order.
  expected = []
  cin = 3
  for filters in (50, 50, 80, 120, 120, 80, 50):
    expected += [("Conv2D", filters, (3, 3, cin, filters), "relu"),
                 ("BatchNormalization", None, None, None)]
    cin = filters
  expected += [("Conv2DTranspose", 50, (3, 2, 50, 50), "linear"),  # (kh, kw, out, in)
               ("BatchNormalization", None, None, None),
               ("Conv2D", 1, (3, 3, 50, 1), "relu")]
  actual = []
  for layer in layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      actual.append(("BatchNormalization", None, None, None))
      continue
    assert layer.padding == "same" and tuple(layer.strides) == (1, 1), layer.name
    actual.append((type(layer).__name__, layer.filters, tuple(layer.kernel.shape),
                   layer.activation.__name__))
  assert actual == expected
  assert model.layers[-1].dtype_policy.name == "float32"
  for layer in layers:  # Keras' defaults, as in the notebook
    if isinstance(layer, keras.layers.BatchNormalization):
      assert (layer.momentum, layer.epsilon) == (0.99, 1e-3)


@pytest.mark.parametrize("architecture", OWN_ARCHITECTURES)
@pytest.mark.parametrize("image_size", [SIZE, None])
def test_output_shapes(architecture, image_size):
  model = models.build_network("rough", architecture, image_size)
  assert model.input.shape == (None, *(image_size or (None, None)), 3)
  assert model.output.shape == (None, *(image_size or (None, None)), 1)
  out = model(_images())
  assert out.shape == (2, *SIZE, 1) and out.dtype == tf.float32
  assert np.all(out.numpy() >= 0)  # ReLU output


def test_unet_accepts_sizes_not_divisible_by_its_stride():
  model = models.build_network("rough", "unet")
  fn = tf.function(model, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  assert fn(_images(1, (30, 45))).shape == (1, 30, 45, 1)
  static = models.build_network("gradient", "unet", (30, 45))
  assert static(_images(1, (30, 45))).shape == (1, 30, 45, 1)


def test_bad_arguments_are_clear_errors(seed_gradient):
  with pytest.raises(ValueError, match="gradient_network"):
    models.build_network("finetune", "seed", SIZE)
  with pytest.raises(ValueError, match="only used by stage='finetune'"):
    models.build_network("rough", "seed", SIZE, gradient_network=seed_gradient)
  with pytest.raises(ValueError, match="unet"):
    models.build_network("rough", "resnet")
  with pytest.raises(ValueError, match="finetune"):
    models.build_network("fine", "seed")


@pytest.mark.parametrize("architecture", OWN_ARCHITECTURES)
def test_finetune_contains_frozen_gradient_net(architecture):
  gradient = models.build_network("gradient", architecture, SIZE)
  model = models.build_network("finetune", architecture, SIZE, gradient_network=gradient)
  assert gradient in model.layers and not gradient.trainable
  # The gradient output is concatenated with the first block's features.
  concat = model.get_layer("concat_gradient")
  assert concat.input[-1].shape[-1] == 1
  assert not {id(v) for v in gradient.weights} & {id(v) for v in model.trainable_weights}

  images = _images()
  before_gradient = [w.numpy().copy() for w in gradient.weights]  # incl. BN moving stats
  before_own = [w.numpy().copy() for w in model.trainable_weights]
  optimizer = keras.optimizers.Adam(0.01)
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(tf.square(model(images, training=True) - 1.0))
  grads = tape.gradient(loss, model.trainable_weights)
  optimizer.apply_gradients(zip(grads, model.trainable_weights))
  for old, new in zip(before_gradient, gradient.weights):
    np.testing.assert_array_equal(old, new.numpy())
  changed = [not np.array_equal(o, n.numpy()) for o, n in zip(before_own, model.trainable_weights)]
  assert all(changed)

  # The gradient channel fed onward is the gradient net's inference output
  # (also after training mode: BatchNorm uses the moving statistics).
  probe = keras.Model(model.input, concat.output)
  expected = gradient(images, training=False).numpy()
  h, w = SIZE
  for training in (False, True):
    fed = probe(images, training=training).numpy()[..., -1:]
    # (The U-Net zero-pads to a multiple of 32: 32x48 -> 32x64.)
    np.testing.assert_allclose(fed[:, :h, :w], expected, rtol=1e-5, atol=1e-6)
    assert np.all(fed[:, h:, w:] == 0)


def test_finetune_seed_second_conv_sees_gradient_channel(seed_gradient):
  model = models.build_network("finetune", "seed", SIZE, gradient_network=seed_gradient)
  assert tuple(model.get_layer("conv2").kernel.shape) == (3, 3, 51, 50)


def test_build_stage_network_nests_a_fresh_gradient_network():
  finetune = models.build_stage_network("finetune", "seed", SIZE)
  gradient = models.gradient_subnetwork(finetune)
  assert gradient.name == "seed_gradient" and not gradient.trainable
  with pytest.raises(ValueError, match="expected exactly one"):
    models.gradient_subnetwork(models.build_stage_network("rough", "seed", SIZE))


@pytest.mark.parametrize("architecture", OWN_ARCHITECTURES)
def test_finetune_started_from_rough_predicts_what_rough_does(architecture):
  rough = models.build_network("rough", architecture, SIZE)
  finetune = models.build_stage_network("finetune", architecture, SIZE)
  images = _images()
  # Fresh networks differ; after the copy only the (zero-weighted) gradient input does.
  assert not np.allclose(rough(images, training=False), finetune(images, training=False))
  copied = models.init_finetune_from_rough(rough, finetune)
  assert copied == len(rough.weights)
  np.testing.assert_allclose(finetune(images, training=False), rough(images, training=False),
                             rtol=1e-5, atol=1e-6)
  # The gradient channel's new weights are trainable from there: not stuck at zero.
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(finetune(images, training=True))
  first = finetune.get_layer("conv2" if architecture == "seed" else "enc1_conv").kernel
  gradient = tape.gradient(loss, first)
  assert np.any(gradient.numpy()[..., -1, :] != 0)


def test_finetune_from_rough_of_another_architecture_is_refused():
  rough = models.build_network("rough", "seed", SIZE)
  with pytest.raises(ValueError, match="has no counterpart"):
    models.init_finetune_from_rough(rough, models.build_stage_network("finetune", "unet", SIZE))


@pytest.mark.parametrize("architecture", OWN_ARCHITECTURES)
def test_initial_depth_starts_the_output_there(architecture):
  model = models.build_network("rough", architecture, SIZE, initial_depth=2.5)
  depth = model(_images(), training=False).numpy()
  # The bias sets the level; the fresh convolutions add a little noise around it.
  assert abs(float(np.median(depth)) - 2.5) < 0.1 and depth.min() > 1.5
  zero_bias = models.build_network("rough", architecture, SIZE)
  assert abs(float(np.median(zero_bias(_images(), training=False))) - 2.5) > 1.0
  with pytest.raises(ValueError, match="depth stages"):
    models.build_network("gradient", architecture, SIZE, initial_depth=2.5)
  with pytest.raises(ValueError, match="positive"):
    models.build_network("rough", architecture, SIZE, initial_depth=0.0)


def test_unfrozen_gradient_is_trained_jointly():
  gradient = models.build_network("gradient", "seed", SIZE)
  model = models.build_network("finetune", "seed", SIZE, gradient_network=gradient,
                               freeze_gradient=False)
  trainable = {id(v) for v in model.trainable_weights}
  assert gradient.trainable and all(id(v) in trainable for v in gradient.trainable_weights)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("architecture", OWN_ARCHITECTURES)
def test_output_is_float32_under_mixed_policy(policy, architecture):
  previous = keras.mixed_precision.global_policy()
  try:
    keras.mixed_precision.set_global_policy(policy)
    gradient = models.build_network("gradient", architecture, SIZE)
    model = models.build_network("finetune", architecture, SIZE, gradient_network=gradient)
    assert model.get_layer("conv2" if architecture == "seed" else "enc1_conv").compute_dtype != "float32"
    out = model(_images())
    assert out.dtype == tf.float32 and model.output.dtype == "float32"
    assert np.all(np.isfinite(out.numpy()))
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert keras.mixed_precision.global_policy().name == previous.name


# --- FLOPs -----------------------------------------------------------------

# Seed body MACs per pixel by hand: 3x3 convs cin*9*cout along
# 3-50-50-80-120-120-80-50, the (3,2) transpose conv 50*6*50, the 3x3 output 50*9*1.
SEED_MACS_PER_PIXEL = (9 * (3 * 50 + 50 * 50 + 50 * 80 + 80 * 120 + 120 * 120 + 120 * 80
                            + 80 * 50) + 6 * 50 * 50 + 9 * 50)


def test_count_flops_seed_matches_hand_computation(seed_gradient):
  assert SEED_MACS_PER_PIXEL == 413_700  # README: 413,700 multiply-adds per pixel
  h, w = 192, 256
  model = models.build_network("rough", "seed")
  assert models.count_flops(model, (h, w)) == 2 * SEED_MACS_PER_PIXEL * h * w
  # Finetune = its own body (conv2 gets one more input channel) + the gradient net.
  finetune = models.build_network("finetune", "seed", SIZE, gradient_network=seed_gradient)
  expected = 2 * SIZE[0] * SIZE[1] * (SEED_MACS_PER_PIXEL + 9 * 1 * 50 + SEED_MACS_PER_PIXEL)
  assert models.count_flops(finetune, SIZE) == expected


def _graph_flops(model, size):
  """Independent count: FLOPs of the conv / matmul ops in the traced TF graph."""
  fn = tf.function(lambda x: model(x, training=False))
  graph = fn.get_concrete_function(tf.TensorSpec((1, *size, 3), tf.float32)).graph
  total = 0
  for op in graph.get_operations():
    if op.type == "Conv2D":
      kh, kw, cin, cout = op.inputs[1].shape
      total += 2 * np.prod(op.outputs[0].shape[1:3]) * kh * kw * cin * cout
    elif op.type == "DepthwiseConv2dNative":
      kh, kw, cin, mult = op.inputs[1].shape
      total += 2 * np.prod(op.outputs[0].shape[1:3]) * kh * kw * cin * mult
    elif op.type == "Conv2DBackpropInput":  # transpose conv: per input pixel
      kh, kw, cout, cin = op.inputs[1].shape
      total += 2 * np.prod(op.inputs[2].shape[1:3]) * kh * kw * cin * cout
    elif op.type in ("MatMul", "BatchMatMulV2"):
      raise AssertionError("no dense layers expected")
  return int(total)


@pytest.mark.parametrize("architecture", OWN_ARCHITECTURES)
@pytest.mark.parametrize("size", [(64, 96), (40, 50)])
def test_count_flops_matches_traced_graph(architecture, size):
  gradient = models.build_network("gradient", architecture)
  finetune = models.build_network("finetune", architecture, gradient_network=gradient)
  for model in (gradient, finetune):
    assert models.count_flops(model, size) == _graph_flops(model, size)


@pytest.mark.parametrize("architecture", OWN_ARCHITECTURES)
def test_count_flops_agrees_with_tf_profiler(architecture):
  # The profiler also counts bias adds, BatchNorm, resizes, ...: the layer count
  # must be slightly below its total (elementwise ops are a few % at most).
  model = models.build_network("rough", architecture)
  fn = tf.function(lambda x: model(x, training=False))
  graph = fn.get_concrete_function(tf.TensorSpec((1, 64, 96, 3), tf.float32)).graph
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options["output"] = "none"
  profiled = tf.compat.v1.profiler.profile(graph, options=options).total_float_ops
  counted = models.count_flops(model, (64, 96))
  assert 0.95 * profiled < counted <= profiled


def test_count_flops_dense_and_depthwise():
  inp = keras.Input((8, 8, 4))
  x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(inp)
  x = keras.layers.Dense(5)(x)
  model = keras.Model(inp, x)
  assert models.count_flops(model, (8, 8)) == 2 * 64 * (9 * 4 * 2 + 8 * 5)


def test_unet_is_at_least_10x_cheaper_than_seed():
  seed = models.build_network("rough", "seed")
  unet = models.build_network("rough", "unet")
  for size in [(192, 256), (128, 96)]:
    ratio = models.count_flops(seed, size) / models.count_flops(unet, size)
    assert ratio >= 10, (size, ratio)
