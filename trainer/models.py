"""Depth networks: the seed's body and an efficient U-Net, for the three stages.

Every network maps one input, `image` float32 [B, H, W, 3] in [0, 1], to
[B, H, W, 1] float32, never negative (the seed: ReLU output; the U-Net: softplus):
- stage "rough" / "finetune": depth in meters;
- stage "gradient": the Sobel gradient magnitude of the depth, in meters per
  pixel (`depth_ops.sobel_magnitude`).
The last layer has dtype float32, so the output stays float32 under a
mixed_float16 / mixed_bfloat16 global policy.

Finetune networks CONTAIN the gradient network (a nested keras.Model, called
on the same image, frozen by default): exporting the finetune model alone
gives the whole chain.

Architectures:
- "seed": the notebook's body exactly, no downsampling (~0.41 M MACs/pixel).
- "unet": encoder-decoder down to stride 32 with skip connections and
  depthwise-separable convolutions (see `_unet_body`); any H, W works (the
  input is zero-padded bottom/right to a multiple of 32 inside the model and
  the output cropped back), 33x fewer FLOPs than the seed.
- "mobilenet_v3", "resnet50" (`backbones.py`): a Keras application encoder
  (MobileNetV3Large / ResNet50, its input preprocessing inside the model,
  random or pretrained: `encoder_weights`), one nested keras.Model "encoder",
  under the U-Net's stem, decoder, skips and padding.
"""

import math

import keras
import tensorflow as tf

from trainer import backbones

# The single list of architectures (flags and the benchmark read it).
ARCHITECTURES = ("seed", "unet") + backbones.ARCHITECTURES
EncoderWeightsError = backbones.EncoderWeightsError
STAGES = ("rough", "gradient", "finetune")

# The seed's body: Conv2D 3x3 'same' + ReLU, then BatchNorm, for each of these.
SEED_FILTERS = (50, 50, 80, 120, 120, 80, 50)

# U-Net widths. Full resolution stem, then one entry per stride 2, 4, ..., 32.
UNET_STEM = 24
UNET_ENCODER = (48, 64, 128, 256, 384)
# Decoder widths at strides 16, 8, 4, 2, 1.
UNET_DECODER = (256, 128, 96, 48, 24)
UNET_STRIDE = 2 ** len(UNET_ENCODER)
# BatchNorm moving-average momentum of the U-Net (Keras' default is 0.99, which
# the seed keeps). With 20 BatchNorm layers and small per-replica batches the
# moving statistics lag the weights for the first ~thousand steps at 0.99, so
# inference-mode output (eval, export, a frozen gradient net) is far worse than
# training-mode output in short runs: on a toy task after 300 steps the eval L1
# was 0.57 at 0.99 against 0.14 at 0.9 (training L1 ~0.2 for both).
UNET_BN_MOMENTUM = 0.9


# ----------------------------------------------------------------------------
# Small layers for the U-Net's padding (dynamic shapes: H, W may be None).


@keras.saving.register_keras_serializable(package="depth2d")
class PadToMultiple(keras.layers.Layer):
  """Zero-pads H and W (bottom / right) up to a multiple of `multiple`."""

  def __init__(self, multiple, **kwargs):
    super().__init__(**kwargs)
    self.multiple = int(multiple)

  def call(self, x):
    shape = tf.shape(x)
    pad_h = (-shape[1]) % self.multiple
    pad_w = (-shape[2]) % self.multiple
    return tf.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])

  def compute_output_shape(self, input_shape):
    def up(n):
      return None if n is None else -(-n // self.multiple) * self.multiple
    return (input_shape[0], up(input_shape[1]), up(input_shape[2]), input_shape[3])

  def get_config(self):
    return {**super().get_config(), "multiple": self.multiple}


@keras.saving.register_keras_serializable(package="depth2d")
class CropLike(keras.layers.Layer):
  """crop([x, reference]) -> x[:, :H_ref, :W_ref]: undoes PadToMultiple."""

  def call(self, inputs):
    x, reference = inputs
    shape = tf.shape(reference)
    return x[:, :shape[1], :shape[2], :]

  def compute_output_shape(self, input_shapes):
    x_shape, ref_shape = input_shapes
    return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[3])


@keras.saving.register_keras_serializable(package="depth2d")
class Upsample2x(keras.layers.Layer):
  """Bilinear x2 upsampling that works with dynamic H, W in graph mode.

  (keras.layers.UpSampling2D(interpolation="bilinear") fails in a tf.function
  traced with unknown H, W, which a SavedModel taking any image size needs.)
  """

  def call(self, x):
    size = tf.shape(x)[1:3] * 2
    # tf.image.resize returns float32 for bilinear: cast back (mixed precision).
    return tf.cast(tf.image.resize(x, size, method="bilinear"), x.dtype)

  def compute_output_shape(self, input_shape):
    def up(n):
      return None if n is None else 2 * n
    return (input_shape[0], up(input_shape[1]), up(input_shape[2]), input_shape[3])


# ----------------------------------------------------------------------------
# Bodies. Each takes the image tensor [B,H,W,3] and, for the finetune stage,
# the gradient network's output [B,H,W,1] to concatenate with early features;
# it returns the float32 output tensor [B,H,W,1].


def batch_norm(**kwargs):
  """BatchNorm whose training statistics cover the GLOBAL batch under tf.distribute.

  Per-replica batches are tiny (the seed trained with 2 examples), so replica-local
  statistics would be noisy and would make N replicas train differently from one
  device with the same global batch. With one replica the all-reduce is a no-op.
  """
  return keras.layers.BatchNormalization(synchronized=True, **kwargs)


def _seed_first_block(image):
  x = keras.layers.Conv2D(SEED_FILTERS[0], 3, padding="same", activation="relu",
                          name="conv1")(image)
  return batch_norm(name="bn1")(x)


def _seed_body(image, gradient=None, output_bias=0.0):
  """The notebook's network. `gradient` [B,H,W,1] joins after the first block."""
  x = _seed_first_block(image)
  if gradient is not None:
    # Finetune: [B,H,W,50] ++ [B,H,W,1] -> the second conv sees 51 channels.
    x = keras.layers.Concatenate(axis=-1, name="concat_gradient")([x, gradient])
  for i, filters in enumerate(SEED_FILTERS[1:], start=2):
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                            name=f"conv{i}")(x)
    x = batch_norm(name=f"bn{i}")(x)
  x = keras.layers.Conv2DTranspose(50, (3, 2), strides=1, padding="same",
                                   name="deconv")(x)
  x = batch_norm(name=f"bn{len(SEED_FILTERS) + 1}")(x)
  return keras.layers.Conv2D(1, 3, padding="same", activation="relu", dtype="float32",
                             bias_initializer=keras.initializers.Constant(output_bias),
                             name="output")(x)


def conv_bn_relu(x, filters, strides, name):
  x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                          name=f"{name}_conv")(x)
  x = batch_norm(momentum=UNET_BN_MOMENTUM, name=f"{name}_bn")(x)
  return keras.layers.ReLU(name=f"{name}_relu")(x)


def sep_bn_relu(x, filters, strides, name, kernel_size=3):
  x = keras.layers.SeparableConv2D(filters, kernel_size, strides=strides, padding="same",
                                   use_bias=False, name=f"{name}_sep")(x)
  x = batch_norm(momentum=UNET_BN_MOMENTUM, name=f"{name}_bn")(x)
  return keras.layers.ReLU(name=f"{name}_relu")(x)


def _unet_body(image, gradient=None, output_bias=0.0):
  """Encoder-decoder. Shapes for an input [B, H, W, 3], S = UNET_STRIDE = 32.

  pad      [B, H', W', 3]   H', W' = H, W rounded up to a multiple of 32
  stem     [B, H', W', 24]  plain 3x3 conv at full resolution
  (finetune: the gradient net's output, zero-padded the same way, is
  concatenated here -> 25 channels; this tensor feeds both the first
  stride-2 conv AND the full-resolution skip of the last decoder step, so the
  edges reach the output directly)
  enc1     [B, H'/2, W'/2, 48]   plain 3x3 conv, stride 2
  enc2..5  strides 4..32, widths 64, 128, 256, 384: separable conv stride 2 +
           separable conv (+ one more at stride 32); 5x5 depthwise kernels at
           strides 16 and 32 (cheap there), so the receptive field is ~500 px
           and covers a whole 192x256 scene (the seed's is 17 px)
  dec      at strides 16, 8, 4, 2, 1: bilinear x2 upsampling, concat with the
           encoder feature of that stride, separable 3x3 conv (256, 128, 96,
           48, 24)
  Cost: ~12.4 k MACs per (padded) pixel, 33x fewer than the seed's 413.7 k.
  output   [B, H', W', 1] 3x3 conv + softplus (float32), cropped to [B, H, W, 1].
           Softplus, not the seed's ReLU: a ReLU output can die for good (a
           600-step rough run at 64x48 ended with every prediction 0, abs_rel
           0.91, while softplus always passes a gradient).
  """
  x = PadToMultiple(UNET_STRIDE, name="pad")(image)
  x = conv_bn_relu(x, UNET_STEM, 1, "stem")
  if gradient is not None:
    gradient = PadToMultiple(UNET_STRIDE, name="pad_gradient")(gradient)
    x = keras.layers.Concatenate(axis=-1, name="concat_gradient")([x, gradient])
  skips = [x]
  x = conv_bn_relu(x, UNET_ENCODER[0], 2, "enc1")
  skips.append(x)
  for level, filters in enumerate(UNET_ENCODER[1:], start=2):
    kernel = 5 if level >= 4 else 3
    x = sep_bn_relu(x, filters, 2, f"enc{level}a", kernel)
    x = sep_bn_relu(x, filters, 1, f"enc{level}b", kernel)
    if level == len(UNET_ENCODER):  # bottleneck, stride 32: one more
      x = sep_bn_relu(x, filters, 1, f"enc{level}c", kernel)
    skips.append(x)
  # skips[i] has stride 2**i; the last one (stride 32) is x itself.
  return unet_decoder(x, skips, image, output_bias)


def unet_decoder(x, skips, image, output_bias):
  """The U-Net's "dec" and "output" (above): x of stride 32, skips[i] of stride 2**i."""
  for level in reversed(range(len(UNET_DECODER))):
    x = Upsample2x(name=f"up{level}")(x)
    x = keras.layers.Concatenate(axis=-1, name=f"skip{level}")([x, skips[level]])
    x = sep_bn_relu(x, UNET_DECODER[len(UNET_DECODER) - 1 - level], 1, f"dec{level}")
  x = keras.layers.Conv2D(1, 3, padding="same", activation="softplus", dtype="float32",
                          bias_initializer=keras.initializers.Constant(output_bias),
                          name="output_padded")(x)
  return CropLike(dtype="float32", name="output")([x, image])


_BODIES = {"seed": _seed_body, "unet": _unet_body}
# The output activation of each body, to invert for `initial_depth`: ReLU (for
# y > 0) for the seed, softplus for the U-Net and the backbones (same decoder).
_OUTPUT_ACTIVATION_INVERSE = {
    "seed": lambda y: y,
    **{a: lambda y: math.log(math.expm1(y)) for a in ARCHITECTURES if a != "seed"},
}


def build_network(stage, architecture, image_size=None, gradient_network=None,
                  freeze_gradient=True, initial_depth=None, name=None,
                  encoder_weights=None, freeze_encoder_batch_norm=None):
  """Builds the network of one stage.

  Args:
    stage: one of STAGES.
    architecture: one of ARCHITECTURES.
    image_size: (H, W) for a static input shape, or None for [B, None, None, 3].
      Both architectures accept any H, W (the U-Net pads internally).
    gradient_network: finetune only (required): the trained gradient network.
      It is called on the same image and its output is concatenated with the
      first block's features (seed: after conv1/bn1; unet: after the stem).
    freeze_gradient: finetune only. True (default): `gradient_network.trainable`
      is set to False, so BatchNorm uses its moving statistics (in Keras 3
      an outer training=True overrides the call's training=False) and
      optimizer steps on the finetune model never change it. False: it is
      set trainable and trained jointly.
      NOTE: this sets the `trainable` attribute of the model passed in.
    initial_depth: rough / finetune: meters (> 0) the output layer's bias is
      started at, so a fresh network predicts about this everywhere (give the
      training median depth). Its inputs are BatchNorm'd features, so the bias
      sets the starting level: from 0 the seed's ReLU output can die before it
      climbs to room-scale depths (a 500-step seed rough run predicted 0
      everywhere). None: zero bias (Keras' default).
    name: model name; default "<architecture>_<stage>".
    encoder_weights, freeze_encoder_batch_norm: backbone architectures only
      (None / "none" otherwise): None / "none" (random), "imagenet" or a file
      path; BatchNorm mode of the backbone (None: frozen iff weights were
      loaded). See `backbones.backbone_body`; raises EncoderWeightsError.

  Returns:
    keras.Model, input "image" [B, H, W, 3] float32, output [B, H, W, 1] float32.
  """
  if stage not in STAGES:
    raise ValueError(f"Unknown stage {stage!r}; valid: {STAGES}")
  if architecture not in ARCHITECTURES:
    raise ValueError(f"Unknown architecture {architecture!r}; valid: {ARCHITECTURES}")
  if stage == "finetune" and gradient_network is None:
    raise ValueError(
        "stage='finetune' needs gradient_network: build and restore the trained "
        "gradient-stage network first and pass it as gradient_network=...")
  if stage != "finetune" and gradient_network is not None:
    raise ValueError(f"gradient_network is only used by stage='finetune', not {stage!r}")
  output_bias = 0.0
  if initial_depth is not None:
    if stage == "gradient":
      raise ValueError("initial_depth is for the depth stages (rough, finetune), not gradient")
    if not initial_depth > 0:
      raise ValueError(f"initial_depth must be a positive depth in meters, got {initial_depth}")
    output_bias = _OUTPUT_ACTIVATION_INVERSE[architecture](float(initial_depth))
  height, width = image_size if image_size is not None else (None, None)
  image = keras.Input(shape=(height, width, 3), dtype="float32", name="image")
  gradient = None
  if gradient_network is not None:
    gradient_network.trainable = not freeze_gradient
    if freeze_gradient:
      gradient = gradient_network(image, training=False)
    else:
      gradient = gradient_network(image)
  if architecture in backbones.ARCHITECTURES:
    output = backbones.backbone_body(architecture, image, gradient, output_bias,
                                     encoder_weights, freeze_encoder_batch_norm)
  else:
    backbones.check_no_encoder_weights(architecture, encoder_weights)
    output = _BODIES[architecture](image, gradient, output_bias)
  return keras.Model(image, output, name=name or f"{architecture}_{stage}")


def build_stage_network(stage, architecture, image_size=None, freeze_gradient=True,
                        initial_depth=None, encoder_weights=None,
                        freeze_encoder_batch_norm=None):
  """`build_network` for a stage, with the networks it contains built too.

  For finetune, a freshly initialised gradient network is built inside it; the
  caller restores the trained weights (the whole model from a finetune
  checkpoint, or `gradient_subnetwork(model)` from a gradient checkpoint), so
  its encoder gets no `encoder_weights`, only the same BatchNorm mode.
  """
  gradient_network = None
  freeze_bn = backbones.resolve_freeze_batch_norm(encoder_weights, freeze_encoder_batch_norm)
  if stage == "finetune":
    gradient_network = build_network("gradient", architecture, image_size,
                                     freeze_encoder_batch_norm=freeze_bn)
  return build_network(stage, architecture, image_size, gradient_network=gradient_network,
                       freeze_gradient=freeze_gradient, initial_depth=initial_depth,
                       encoder_weights=encoder_weights, freeze_encoder_batch_norm=freeze_bn)


# The pretrained backbone's trainable variables in a model (learning-rate
# multiplier, freezing the encoder for N steps); [] for seed / unet.
encoder_variables = backbones.encoder_variables


def gradient_subnetwork(finetune_model):
  """The gradient network nested in a finetune model (not its backbone "encoder")."""
  nested = [layer for layer in finetune_model.layers if isinstance(layer, keras.Model)
            and layer.name != backbones.ENCODER_NAME]
  if len(nested) != 1:
    raise ValueError(f"{finetune_model.name} holds {len(nested)} nested networks, expected "
                     "exactly one (the gradient network of a finetune model)")
  return nested[0]


def init_finetune_from_rough(rough, finetune):
  """Starts the finetune network's body from a trained rough network: the seed's
  "finetune", fine-tuning the baseline with the gradient net's edges as an extra input.

  Both bodies have the same layers under the same names; the only difference
  is the gradient channel appended (last) to the input of the layers that read
  the concatenation (seed: conv2; unet: enc1_conv and dec0_sep; backbones:
  stem2_sep, and the "encoder" is copied whole). Those kernels
  get rough's weights for the other input channels and ZERO mixing weights for
  the new one, so at step 0 the finetune net predicts exactly what rough does
  and training can only start from there. (A depthwise kernel keeps its fresh
  initialisation for the new channel: with both depthwise and pointwise
  weights at zero, neither would ever get a gradient.)

  Returns the number of variables copied. Raises ValueError when a rough layer
  has no counterpart or a shape differs other than by the appended channel.
  """
  gradient = gradient_subnetwork(finetune)
  body = {layer.name: layer for layer in finetune.layers if layer is not gradient}
  copied = 0
  for layer in rough.layers:
    if not layer.weights:
      continue
    if layer.name not in body or len(body[layer.name].weights) != len(layer.weights):
      raise ValueError(f"rough layer {layer.name!r} has no counterpart in {finetune.name}")
    for source, target in zip(layer.weights, body[layer.name].weights):
      value = source.numpy()
      if tuple(target.shape) == value.shape:
        target.assign(value)
      else:
        # Kernels [..., C_in, C_out] (conv, pointwise) or [kh, kw, C_in, 1]
        # (depthwise): the finetune net reads C_in + k channels, the new ones last.
        grown = tuple(target.shape)
        if (len(grown) != len(value.shape) or grown[:-2] != value.shape[:-2]
            or grown[-1] != value.shape[-1] or grown[-2] <= value.shape[-2]):
          raise ValueError(f"{layer.name}: cannot start {target.path} {grown} from rough's "
                           f"{value.shape}; only appended input channels are supported")
        new_value = target.numpy()
        if "depthwise" not in target.path:
          new_value[..., value.shape[-2]:, :] = 0.0
        new_value[..., :value.shape[-2], :] = value
        target.assign(new_value)
      copied += 1
  return copied


# ----------------------------------------------------------------------------
# FLOP counting.


def _layer_macs(layer, input_shape, output_shape):
  """Multiply-accumulates of one layer for one example, from static shapes.

  Only the layers that matter are counted (convolutions and Dense); bias adds,
  BatchNorm, activations, padding, resizing and concatenation are elementwise
  and ignored (a few FLOPs per activation: ~1-3% for these networks).
  """
  def pixels(shape):  # product of the spatial dims (between batch and channels)
    n = 1
    for d in shape[1:-1]:
      n *= d
    return n

  if isinstance(layer, keras.layers.SeparableConv2D):
    cin, multiplier = input_shape[-1], layer.depth_multiplier
    kernel = layer.kernel_size[0] * layer.kernel_size[1]
    return pixels(output_shape) * cin * multiplier * (kernel + output_shape[-1])
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    kernel = layer.kernel_size[0] * layer.kernel_size[1]
    return pixels(output_shape) * kernel * output_shape[-1]
  if isinstance(layer, keras.layers.Conv2DTranspose):
    # Every INPUT pixel is multiplied by the whole kernel (scatter).
    kernel = layer.kernel_size[0] * layer.kernel_size[1]
    return pixels(input_shape) * kernel * input_shape[-1] * output_shape[-1]
  if isinstance(layer, keras.layers.Conv2D):
    kernel = layer.kernel_size[0] * layer.kernel_size[1]
    groups = getattr(layer, "groups", 1)
    return pixels(output_shape) * kernel * (input_shape[-1] // groups) * output_shape[-1]
  if isinstance(layer, keras.layers.Dense):
    return pixels(output_shape) * input_shape[-1] * output_shape[-1]
  return 0


def _count_macs(model, inputs):
  """MACs of `model` called on symbolic `inputs` (KerasTensors of static shape).

  Walks the functional graph in topological order (Keras' own executor,
  `_run_through_graph`), computing every layer's output spec from its inputs'
  specs; nested models are walked recursively with their call-site shapes.
  """
  if isinstance(model, keras.Sequential):
    model = model._functional  # pylint: disable=protected-access
  total = 0

  def operation_fn(op):
    def run(*args, **kwargs):
      nonlocal total
      if isinstance(op, keras.Model):
        macs, outputs = _count_macs(op, keras.tree.flatten(args))
        total += macs
        return outputs
      outputs = op.compute_output_spec(*args, **kwargs)
      first_input = keras.tree.flatten(args)[0]
      total += _layer_macs(op, first_input.shape, keras.tree.flatten(outputs)[0].shape)
      return outputs
    return run

  outputs = model._run_through_graph(inputs, operation_fn=operation_fn)  # pylint: disable=protected-access
  return total, outputs


def count_flops(model, image_size):
  """FLOPs of one forward pass for ONE example of size image_size = (H, W).

  Counted layer by layer from the model (nested models included) with the
  shapes each layer sees at that size; 1 multiply-accumulate = 2 FLOPs.
  Convolutions (Conv2D, DepthwiseConv2D, SeparableConv2D, Conv2DTranspose) and
  Dense are counted; elementwise ops are not (see `_layer_macs`).
  """
  height, width = image_size
  channels = model.inputs[0].shape[-1]
  inputs = [keras.KerasTensor((1, height, width, channels), dtype="float32")]
  macs, _ = _count_macs(model, inputs)
  return int(2 * macs)
