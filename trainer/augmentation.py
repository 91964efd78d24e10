"""Training augmentation: what is drawn, and where it is applied.

One set of draws per example (from its stateless seed, in the input
pipeline): a horizontal flip and a mild colour jitter (brightness delta,
contrast factor, saturation factor). They are applied either

- on the host, per example, in the tf.data pipeline (`apply_to_example`,
  TensorFlow's fused image ops: fastest on a CPU), or
- on the accelerator, per batch, at the start of the train step
  (`apply_to_batch`, elementwise ops XLA compiles for TPU and GPU): the
  pipeline then only carries the draws, `PARAMS` [B, 4] float32, and the host
  CPU is left to decoding and resizing (the step also makes the mask and the
  target there, and resizes the image when the split has one image size:
  input_pipeline.finish_batch, device_decode_shape). The saturation is
  written in closed form there.

Both give the same training tensors to float rounding (tests/test_augmentation.py).
--augment_on=auto picks the accelerator when this process sees a GPU or TPU,
else the host.
"""

from __future__ import annotations

import tensorflow as tf

PLACES = ("auto", "host", "device")  # --augment_on
PARAMS = "augment"  # the batch key of the draws on their way to the train step

# The draws' ranges; brightness is kept mild because shading is a depth cue.
MAX_BRIGHTNESS_DELTA = 0.05
CONTRAST_RANGE = (0.85, 1.15)
SATURATION_RANGE = (0.85, 1.15)


def resolve_place(name: str) -> str:
  """--augment_on -> "host" | "device". auto: device with a GPU or TPU here."""
  if name not in PLACES:
    raise ValueError(f"--augment_on={name!r} is not one of {', '.join(PLACES)}")
  if name != "auto":
    return name
  accelerators = tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")
  return "device" if accelerators else "host"


def draw(seed: tf.Tensor) -> tf.Tensor:
  """One example's draws from its stateless seed [2]: float32 [4] = (flip in
  {0, 1}, brightness delta, contrast factor, saturation factor). The same
  values tf.image.stateless_random_{brightness,contrast,saturation} draw from
  these seeds."""
  seeds = tf.random.experimental.stateless_split(seed, num=4)
  flip = tf.cast(tf.random.stateless_uniform([], seeds[0]) < 0.5, tf.float32)
  brightness = tf.random.stateless_uniform([], seeds[1], -MAX_BRIGHTNESS_DELTA,
                                           MAX_BRIGHTNESS_DELTA)
  contrast = tf.random.stateless_uniform([], seeds[2], *CONTRAST_RANGE)
  saturation = tf.random.stateless_uniform([], seeds[3], *SATURATION_RANGE)
  return tf.stack([flip, brightness, contrast, saturation])


def apply_to_example(image: tf.Tensor, depth: tf.Tensor, params: tf.Tensor):
  """Host: image [H,W,3], depth [H,W,1], params [4] -> (image, depth)."""
  # tf.reverse, not image[:, ::-1]: the same values, but a StridedSlice with a
  # negative stride was measured 5x slower (1.7 vs 0.33 ms for both at 192x144).
  # One cond for both.
  image, depth = tf.cond(params[0] > 0.5,
                         lambda: (tf.reverse(image, axis=[1]), tf.reverse(depth, axis=[1])),
                         lambda: (image, depth))
  image = tf.image.adjust_brightness(image, params[1])
  image = tf.image.adjust_contrast(image, params[2])
  image = tf.image.adjust_saturation(image, params[3])
  return tf.clip_by_value(image, 0.0, 1.0), depth


def apply_to_batch(batch: dict) -> dict:
  """Accelerator: a training batch with its draws batch[PARAMS] [B,4] -> the
  batch as apply_to_example per example would have made it (without PARAMS).

  The flip moves every [B,H,W,C] map the batch carries (image and depth from
  train_dataset; a mask or a target too, if present: the Sobel magnitude of a
  mirrored map is the mirrored magnitude); the jitter touches only the image.
  """
  params = batch[PARAMS]
  per_image = lambda column: tf.reshape(params[:, column], [-1, 1, 1, 1])  # [B,1,1,1]
  flip = per_image(0) > 0.5
  out = {key: tf.where(flip, tf.reverse(value, axis=[2]), value)
         for key, value in batch.items() if key != PARAMS}
  image = out["image"] + per_image(1)
  # adjust_contrast: each channel of each image about its own mean.
  mean = tf.reduce_mean(image, axis=[1, 2], keepdims=True)
  image = (image - mean) * per_image(2) + mean
  image = saturate(image, per_image(3))
  out["image"] = tf.clip_by_value(image, 0.0, 1.0)
  return out


def saturate(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """tf.image.adjust_saturation in closed form, with a factor per image.

  adjust_saturation goes to HSV, scales S by `factor` clipped to [0, 1], and
  back. Hue and value V = max(r, g, b) are kept, so every channel keeps its
  distance from V in proportion: c' = V - (V - c) * S'/S, where S = (V - min) / V
  and S'/S = clip(factor, 0, V / (V - min)). A pixel with V <= 0 has S = 0
  there, so it becomes grey at V; a grey pixel (V = min) is unchanged.
  """
  value = tf.reduce_max(image, axis=-1, keepdims=True)
  chroma = value - tf.reduce_min(image, axis=-1, keepdims=True)
  ratio = tf.minimum(tf.maximum(factor, 0.0), tf.math.divide_no_nan(value, chroma))  # [B,H,W,1]
  ratio = tf.where(value > 0.0, ratio, tf.zeros_like(ratio))
  return value - (value - image) * ratio
