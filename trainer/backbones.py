"""Keras-application encoders (MobileNetV3Large, ResNet50) under the U-Net's decoder.

A backbone network maps `image` float32 [B, H, W, 3] in [0, 1] to [B, H, W, 1]
like every network of `models.py` (see `backbone_body` for the shapes):

  pad        [B, H', W', 3]  zero-padded bottom/right to a multiple of 32
  encoder    preprocessing (ours, in the model: [0, 1] -> what the application
             expects), then the application (include_top=False) as ONE nested
             keras.Model named "encoder" whose outputs are its feature maps at
             strides 2, 4, 8, 16, 32 (taken by layer name, `_BACKBONES`)
  stem       ours, full resolution: 3x3 conv on the padded [0, 1] image (24),
             [finetune: ++ the gradient net's output, 25 channels], separable
             3x3 conv "stem2" (24): the stride-1 skip
  decoder    the U-Net's (`models.unet_decoder`): x2 upsampling + skip concat +
             separable conv at strides 16..1, softplus output (float32), crop.

Encoder weights (`encoder_weights`): None / "none" (random), "imagenet"
(Keras' own file, from the Keras cache or downloaded into it) or a path to a
`.weights.h5` / `.keras` / legacy `.h5` file of the application
(`build_backbone(...).save_weights(path)`). Whatever cannot be honoured raises
EncoderWeightsError: never a silent fall-back to random weights.

This module does not import `models` at load time (`models` imports it).
"""

import dataclasses
import hashlib
import os
import socket
from typing import Callable

from absl import logging
import keras
import tensorflow as tf

from trainer import errors

ARCHITECTURES = ("mobilenet_v3", "resnet50")
ENCODER_NAME = "encoder"  # the nested keras.Model holding the application's layers
STRIDE = 32  # the deepest feature map's stride: inputs are padded to a multiple of it
# Seconds any one socket operation of the ImageNet download may block (the
# download itself may take longer): offline machines that drop packets instead
# of refusing connections must fail, not hang.
DOWNLOAD_TIMEOUT_SECONDS = 30
_KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


class EncoderWeightsError(errors.UserInputError):
  """`--encoder_weights` cannot be honoured (missing, unreadable or mismatched weights)."""


@keras.saving.register_keras_serializable(package="depth2d")
class CaffePreprocess(keras.layers.Layer):
  """[0, 1] RGB -> `keras.applications.resnet.preprocess_input` of the 0..255 image.

  ("caffe" mode: RGB -> BGR, minus the ImageNet channel means, no scaling.)
  """

  BGR_MEAN = (103.939, 116.779, 123.68)

  def call(self, x):
    bgr = tf.reverse(x * 255.0, axis=[-1])
    return bgr - tf.constant(self.BGR_MEAN, dtype=x.dtype)


@keras.saving.register_keras_serializable(package="depth2d")
class FrozenStatisticsBatchNormalization(keras.layers.BatchNormalization):
  """BatchNorm that always normalises with its moving statistics (see `_freeze`).

  Its gamma and beta stay trainable: it is an affine layer that training tunes
  but never re-estimates, in training mode as at inference.
  """

  def call(self, inputs, training=None, mask=None):
    del training
    return super().call(inputs, training=False, mask=mask)


@dataclasses.dataclass(frozen=True)
class _Backbone:
  application: Callable[..., keras.Model]
  kwargs: dict
  # Feature maps at strides 2, 4, 8, 16 as (layer name, "input" | "output");
  # stride 32 is the application's output.
  skips: tuple
  preprocess: Callable[[], keras.layers.Layer]  # [0, 1] RGB -> the application's input
  imagenet_file: str  # Keras' own file name (include_top=False)
  imagenet_md5: str   # its hash, as in keras/src/applications/*.py
  imagenet_folder: str  # where Keras downloads it from, under _KERAS_WEIGHTS_URL

  @property
  def imagenet_origin(self):
    return f"{_KERAS_WEIGHTS_URL}{self.imagenet_folder}/{self.imagenet_file}"


_BACKBONES = {
    # MobileNetV3Large expects 0..255 (include_preprocessing: its own Rescaling
    # to [-1, 1]). Skips: the expanded (widest) activations right before each
    # stride-2 depthwise conv, by the name of that conv's padding layer: the
    # activations' own names are generated (re_lu_N) and differ between builds.
    # Channels 64, 72, 240, 672; 960 at stride 32.
    "mobilenet_v3": _Backbone(
        keras.applications.MobileNetV3Large, {"include_preprocessing": True},
        (("expanded_conv_1_depthwise_pad", "input"), ("expanded_conv_3_depthwise_pad", "input"),
         ("expanded_conv_6_depthwise_pad", "input"), ("expanded_conv_12_depthwise_pad", "input")),
        lambda: keras.layers.Rescaling(255.0, name="preprocess"),
        "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        "07fb09a5933dd0c8eaafa16978110389", "mobilenet_v3"),
    # ResNet50: caffe preprocessing. Skips: the output of each stage (channels
    # 64, 256, 512, 1024; 2048 at stride 32).
    "resnet50": _Backbone(
        keras.applications.ResNet50, {},
        (("conv1_relu", "output"), ("conv2_block3_out", "output"),
         ("conv3_block4_out", "output"), ("conv4_block6_out", "output")),
        lambda: CaffePreprocess(name="preprocess"),
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626", "resnet"),
}
assert tuple(_BACKBONES) == ARCHITECTURES


def _spec(architecture):
  if architecture not in _BACKBONES:
    raise ValueError(f"Unknown backbone architecture {architecture!r}; valid: {ARCHITECTURES}")
  return _BACKBONES[architecture]


def build_backbone(architecture):
  """The bare Keras application, include_top=False, random weights, input [B, None, None, 3].

  What a weights file for `encoder_weights=PATH` is saved from:
  `build_backbone("resnet50").save_weights("resnet50.weights.h5")` after
  loading or training the weights you want.
  """
  spec = _spec(architecture)
  return spec.application(include_top=False, weights=None, input_shape=(None, None, 3),
                          **spec.kwargs)


# ----------------------------------------------------------------------------
# Encoder weights.


def normalize_encoder_weights(encoder_weights):
  """None / "none" -> None, "imagenet" -> "imagenet", anything else: a path string."""
  if encoder_weights is None:
    return None
  value = os.fspath(encoder_weights)
  if value.strip().lower() in ("", "none"):
    return None
  return "imagenet" if value.strip().lower() == "imagenet" else value


def check_no_encoder_weights(architecture, encoder_weights):
  """seed / unet have no pretrained encoder: refuse weights rather than ignore them."""
  if normalize_encoder_weights(encoder_weights) is not None:
    raise EncoderWeightsError(
        f"--encoder_weights={encoder_weights} is for the architectures with a pretrained "
        f"backbone {ARCHITECTURES}, not {architecture!r}: leave it unset (or 'none')")


def _keras_cache_dirs():
  """The `models` cache folders Keras' get_file uses, most specific first.

  $KERAS_HOME (read now, unlike Keras, which reads it once at import) or
  ~/.keras; get_file falls back to /tmp/.keras when that is not writable.
  """
  home = os.path.expanduser(os.environ.get("KERAS_HOME") or "~/.keras")
  dirs = [os.path.join(home, "models"), os.path.join("/tmp", ".keras", "models")]
  return dirs, home


def imagenet_weights_path(architecture):
  """Where Keras' ImageNet file for `architecture` goes, e.g. ~/.keras/models/<file>."""
  dirs, _ = _keras_cache_dirs()
  return os.path.join(dirs[0], _spec(architecture).imagenet_file)


def _md5(path):
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _how_to_give_weights(architecture):
  spec = _spec(architecture)
  return (f"To use ImageNet weights offline, download {spec.imagenet_origin} on a "
          f"machine with internet and place it, named exactly {spec.imagenet_file}, at "
          f"{imagenet_weights_path(architecture)} (the Keras cache: $KERAS_HOME/models/, "
          f"default ~/.keras/models/); or pass --encoder_weights=PATH to a .weights.h5 / "
          f".keras / .h5 file of keras.applications.{spec.application.__name__}"
          f"(include_top=False); or --encoder_weights=none for random weights.")


def _imagenet_file(architecture):
  """The path of Keras' ImageNet file: from the cache, else downloaded into it."""
  spec = _spec(architecture)
  dirs, home = _keras_cache_dirs()
  for folder in dirs:
    path = os.path.join(folder, spec.imagenet_file)
    if os.path.exists(path):
      try:
        md5 = _md5(path)
      except OSError as e:
        raise EncoderWeightsError(f"--encoder_weights=imagenet: cannot read {path} ({e}). "
                                  f"{_how_to_give_weights(architecture)}") from e
      if md5 != spec.imagenet_md5:
        raise EncoderWeightsError(
            f"--encoder_weights=imagenet: {path} is not Keras' ImageNet file for "
            f"{architecture} (md5 {md5}, expected {spec.imagenet_md5}; incomplete "
            f"download?): delete it. {_how_to_give_weights(architecture)}")
      return path
  origin = spec.imagenet_origin
  previous_timeout = socket.getdefaulttimeout()
  socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_SECONDS)
  try:
    return keras.utils.get_file(spec.imagenet_file, origin, cache_subdir="models",
                                cache_dir=home, file_hash=spec.imagenet_md5)
  except Exception as e:  # pylint: disable=broad-except  # any failure: the same advice
    raise EncoderWeightsError(
        f"--encoder_weights=imagenet: the ImageNet weights of {architecture} are not in "
        f"the Keras cache ({imagenet_weights_path(architecture)} is absent) and "
        f"downloading {origin} failed ({type(e).__name__}: {e}). "
        f"{_how_to_give_weights(architecture)}") from e
  finally:
    socket.setdefaulttimeout(previous_timeout)


def load_encoder_weights(backbone, architecture, encoder_weights):
  """Loads `encoder_weights` into the application `backbone`; returns what was loaded.

  Returns None for random weights, else the file path. Raises
  EncoderWeightsError (naming --encoder_weights, the path, why, and how to
  give a file) for a missing, unreadable or mismatched file.
  """
  weights = normalize_encoder_weights(encoder_weights)
  if weights is None:
    logging.info("encoder %s: random initial weights (--encoder_weights=none)", architecture)
    return None
  path = _imagenet_file(architecture) if weights == "imagenet" else weights
  if weights != "imagenet":
    if not path.endswith((".weights.h5", ".keras", ".h5")):
      raise EncoderWeightsError(
          f"--encoder_weights={path}: expected a .weights.h5, .keras or .h5 file. "
          f"{_how_to_give_weights(architecture)}")
    if not tf.io.gfile.exists(path):
      raise EncoderWeightsError(f"--encoder_weights={path}: no such file. "
                                f"{_how_to_give_weights(architecture)}")
  try:
    backbone.load_weights(path)
  except Exception as e:  # pylint: disable=broad-except  # h5py / Keras raise many kinds
    why = str(e).strip().split("\n")[0][:300]
    raise EncoderWeightsError(
        f"--encoder_weights={encoder_weights}: cannot load {path} into "
        f"{architecture}'s encoder ({type(e).__name__}: {why}); it must hold the weights of "
        f"keras.applications.{_spec(architecture).application.__name__}(include_top=False). "
        f"{_how_to_give_weights(architecture)}") from e
  logging.info("encoder %s: loaded %s weights from %s", architecture,
               "ImageNet" if weights == "imagenet" else "file", path)
  return path


# ----------------------------------------------------------------------------
# BatchNorm of the backbone.


def resolve_freeze_batch_norm(encoder_weights, freeze_batch_norm=None):
  """None -> freeze exactly when weights are loaded (imagenet or a file)."""
  if freeze_batch_norm is None:
    return normalize_encoder_weights(encoder_weights) is not None
  return bool(freeze_batch_norm)


def _freeze(backbone):
  """A copy of `backbone`, same weights, whose BatchNorm layers keep their statistics.

  Why: a pretrained encoder's BatchNorm statistics were estimated over
  ImageNet with large batches; ours hold 2-8 images per replica, consecutive
  frames of one room. In training mode every layer would normalise with the
  statistics of those few correlated frames (synchronizing replicas, as
  `models.batch_norm` does, still gives a few frames), which is not what the
  pretrained weights expect, and the moving averages (momentum 0.999 in
  MobileNetV3) would drift to statistics that eval / export use but training
  never saw (the lag `UNET_BN_MOMENTUM` measures). So the layers normalise
  with the loaded statistics in training as at inference; gamma and beta are
  still trained (an affine layer), like the convolutions. Done by class
  (FrozenStatisticsBatchNormalization), not by `trainable=False` or
  `training=False`: in Keras 3 an outer training=True
  overrides a nested call's training=False, and setting the encoder
  `trainable` (to unfreeze it after N steps) resets its layers' flag.
  (Weight files are loaded into the plain application first: `.weights.h5`
  keys layers by class name, so they would not match the copy's.)
  """
  def clone(layer):
    if type(layer) is keras.layers.BatchNormalization:  # pylint: disable=unidiomatic-typecheck
      return FrozenStatisticsBatchNormalization.from_config(layer.get_config())
    return layer.__class__.from_config(layer.get_config())
  frozen = keras.models.clone_model(backbone, clone_function=clone)
  frozen.set_weights(backbone.get_weights())  # same layers, same order
  return frozen


def _synchronize(backbone):
  """Random weights: BatchNorm trains like the project's own (`models.batch_norm`).

  Synchronized across replicas (tiny per-replica batches), and the U-Net's
  momentum instead of the applications' 0.99 / 0.999, whose moving statistics
  lag the weights for the first thousands of steps (`models.UNET_BN_MOMENTUM`).
  Both attributes are read at call time.
  """
  from trainer import models  # pylint: disable=import-outside-toplevel  # (cycle)
  for layer in backbone.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.synchronized = True
      layer.momentum = models.UNET_BN_MOMENTUM
  return backbone


def build_encoder(architecture, encoder_weights=None, freeze_batch_norm=None):
  """The nested "encoder": input the application's [B,H,W,3], outputs strides 2..32.

  H, W must be multiples of 32 (`backbone_body` pads). Output i has stride
  2**(i+1); the last is the application's output.
  """
  spec = _spec(architecture)
  backbone = build_backbone(architecture)
  load_encoder_weights(backbone, architecture, encoder_weights)
  frozen = resolve_freeze_batch_norm(encoder_weights, freeze_batch_norm)
  backbone = _freeze(backbone) if frozen else _synchronize(backbone)
  logging.info("encoder %s: BatchNorm %s", architecture, "with frozen (loaded) statistics"
               if frozen else "trained, synchronized across replicas")
  features = [getattr(backbone.get_layer(name), where) for name, where in spec.skips]
  return keras.Model(backbone.inputs, features + [backbone.output], name=ENCODER_NAME)


def backbone_body(architecture, image, gradient=None, output_bias=0.0, encoder_weights=None,
                  freeze_batch_norm=None):
  """image [B,H,W,3] in [0, 1] (+ gradient [B,H,W,1]) -> [B,H,W,1] float32 (module doc).

  The gradient net's output (finetune) joins at full resolution, after our
  first block ("stem"): the backbone's input stays the 3-channel RGB its
  weights were trained on, so the edges enter through the stride-1 skip:
  stem (24) ++ gradient (1) -> stem2 (separable 3x3, 24) = skip 0 -> concat
  with the decoder's upsampled stride-2 features -> dec0 (separable 3x3) ->
  output (3x3), like the U-Net's full-resolution skip (the U-Net also feeds
  them to its own encoder; a pretrained one keeps its RGB input). `init_finetune_from_rough`
  zeroes stem2's pointwise weights for the new channel, so the finetune net
  starts as rough.
  """
  from trainer import models  # pylint: disable=import-outside-toplevel  # (cycle)
  padded = models.PadToMultiple(STRIDE, name="pad")(image)  # [B,H',W',3]
  encoder = build_encoder(architecture, encoder_weights, freeze_batch_norm)
  features = encoder(_spec(architecture).preprocess()(padded))  # strides 2, 4, 8, 16, 32
  x = models.conv_bn_relu(padded, models.UNET_STEM, 1, "stem")  # [B,H',W',24]
  if gradient is not None:
    gradient = models.PadToMultiple(STRIDE, name="pad_gradient")(gradient)
    x = keras.layers.Concatenate(axis=-1, name="concat_gradient")([x, gradient])
  x = models.sep_bn_relu(x, models.UNET_STEM, 1, "stem2")
  return models.unet_decoder(features[-1], [x] + features[:-1], image, output_bias)


def encoder_variables(model):
  """The trainable variables of every backbone "encoder" in `model`, nested ones included.

  Only those `model` trains (a frozen gradient net's encoder is left out), in
  `model.trainable_variables` order; [] for seed / unet. For an encoder
  learning-rate multiplier, or to hold the encoder still for N steps: leave
  these out of `apply_gradients` (zeroed gradients are not enough once Adam
  has momentum, nor with weight decay) rather than toggling `trainable`,
  which changes `model.trainable_variables` under a traced train step.
  """
  ids = set()

  def collect(layer):
    for sub in getattr(layer, "layers", ()):
      if isinstance(sub, keras.Model) and sub.name == ENCODER_NAME:
        ids.update(id(v) for v in sub.trainable_variables)
      elif isinstance(sub, keras.Model):
        collect(sub)

  collect(model)
  return [v for v in model.trainable_variables if id(v) in ids]
