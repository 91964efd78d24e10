"""The one image preprocessing of training and serving.

`network_input(images, size)`: uint8 RGB [..., H, W, 3] -> float32
[..., h, w, 3] in [0, 1] at the training size (h, w), bilinear with
antialiasing, clipped (antialiasing can overshoot slightly). The input
pipeline and the exported serving function both call it, so a served image
reaches the network exactly as a training image did.
"""

import tensorflow as tf


def network_input(images: tf.Tensor, size) -> tf.Tensor:
  """uint8 [..., H, W, 3] (or [H, W, 3]) -> float32 [..., h, w, 3] in [0, 1]."""
  x = tf.image.convert_image_dtype(images, tf.float32)  # uint8 / 255
  x = tf.image.resize(x, size, method="bilinear", antialias=True)
  return tf.clip_by_value(x, 0.0, 1.0)
