"""Masked depth losses.

Every loss has the signature `fn(target, prediction, mask) -> [B] float32`:
- target, prediction: [B, H, W, 1] depth (meters, or whatever the stage
  predicts, e.g. the Sobel magnitude for the gradient stage).
- mask: [B, H, W, 1] float 0/1 or bool; 1 where the target is valid.
It returns a PER-EXAMPLE loss so that the training loop can reduce over the
GLOBAL batch with `tf.nn.compute_average_loss`. Each example's loss is a mean
over its own valid pixels; an example without valid pixels gives exactly 0 (and
no NaN, also in the gradient). Computation is float32 whatever the prediction's
dtype (mixed_float16 / mixed_bfloat16 models).
"""

import tensorflow as tf

LOSSES = ("mse", "l1", "silog")

# Depth (meters) below which log-space losses clamp their input: log(0) is
# -inf and ReLU outputs are often exactly 0. 1 mm is below any sensor's range.
LOG_EPSILON = 1e-3


def _prepare(target, prediction, mask):
  """Casts to float32 and zeroes masked-out values (NaN * 0 would stay NaN)."""
  mask = tf.cast(mask, tf.float32)
  valid = mask > 0.0
  target = tf.where(valid, tf.cast(target, tf.float32), 0.0)
  prediction = tf.where(valid, tf.cast(prediction, tf.float32), 0.0)
  return target, prediction, mask


def _masked_mean(values, mask):
  """Per-example mean of `values` [B,H,W,C] over `mask`; 0 for empty masks."""
  total = tf.reduce_sum(values * mask, axis=[1, 2, 3])
  count = tf.reduce_sum(mask, axis=[1, 2, 3])
  return tf.math.divide_no_nan(total, count)


def masked_mse(target, prediction, mask):
  """Mean squared error over valid pixels (the seed's loss, plus the mask)."""
  target, prediction, mask = _prepare(target, prediction, mask)
  return _masked_mean(tf.square(prediction - target), mask)


def masked_l1(target, prediction, mask):
  """Mean absolute error over valid pixels."""
  target, prediction, mask = _prepare(target, prediction, mask)
  return _masked_mean(tf.abs(prediction - target), mask)


def _log_depth(depth):
  # Clamp (not log(x + eps)): keeps log exact for real depths and finite for
  # 0 / negative predictions. Below LOG_EPSILON the gradient is 0.
  return tf.math.log(tf.maximum(depth, LOG_EPSILON))


def scale_invariant_log(target, prediction, mask, variance_focus=0.85):
  """Scale-invariant log loss (Eigen et al. 2014), per example.

  d = ln(pred) - ln(target) over valid pixels;
  loss = mean(d^2) - variance_focus * mean(d)^2.
  variance_focus (Eigen's lambda) = 0.85 by default as in BTS: lambda = 1 is
  fully scale invariant (pred = k * target gives 0), lambda = 0 is plain
  squared log error; 0.85 keeps a small penalty on the global scale, which a
  metric depth model needs. Unlike BTS we do not take a square root (which has
  an infinite gradient at 0); the minimiser is the same. Both depths are
  clamped to LOG_EPSILON before the log.
  """
  target, prediction, mask = _prepare(target, prediction, mask)
  d = (_log_depth(prediction) - _log_depth(target)) * mask
  mean_d2 = _masked_mean(tf.square(d), mask)
  mean_d = _masked_mean(d, mask)
  return mean_d2 - variance_focus * tf.square(mean_d)


def gradient_matching(target, prediction, mask, scales=4, log_space=True):
  """Multi-scale gradient matching (MegaDepth / MiDaS style), per example.

  R = f(pred) - f(target) with f = ln (log_space=True, as MegaDepth: penalises
  relative errors in edges, independent of scale) or identity (meters). At each
  scale s = 0..scales-1 the maps are subsampled by 2^s (every 2^s-th pixel, as
  MiDaS) and the loss adds mean(|dR/dx|) + mean(|dR/dy|), where a finite
  difference only counts if both of its pixels are valid, each mean being over
  that scale's valid differences. Smooths flat regions and sharpens edges.
  """
  target, prediction, mask = _prepare(target, prediction, mask)
  if log_space:
    residual = (_log_depth(prediction) - _log_depth(target)) * mask
  else:
    residual = (prediction - target) * mask
  total = tf.zeros_like(residual[:, 0, 0, 0])
  for scale in range(scales):
    step = 2 ** scale
    r = residual[:, ::step, ::step, :]
    m = mask[:, ::step, ::step, :]
    dx = tf.abs(r[:, :, 1:, :] - r[:, :, :-1, :])
    mx = m[:, :, 1:, :] * m[:, :, :-1, :]
    dy = tf.abs(r[:, 1:, :, :] - r[:, :-1, :, :])
    my = m[:, 1:, :, :] * m[:, :-1, :, :]
    total += _masked_mean(dx, mx) + _masked_mean(dy, my)
  return total


_BASE_LOSSES = {
    "mse": masked_mse,
    "l1": masked_l1,
    "silog": scale_invariant_log,
}


def get_loss(name, gradient_matching_weight=0.0):
  """Returns fn(target, prediction, mask) -> [B] for a loss name in LOSSES.

  With gradient_matching_weight > 0 the result is
  base + gradient_matching_weight * gradient_matching (log space).
  """
  if name not in _BASE_LOSSES:
    raise ValueError(f"Unknown loss {name!r}; valid names: {LOSSES}")
  if gradient_matching_weight < 0:
    raise ValueError(
        f"gradient_matching_weight must be >= 0, got {gradient_matching_weight}")
  base = _BASE_LOSSES[name]
  if not gradient_matching_weight:
    return base
  weight = float(gradient_matching_weight)

  def loss(target, prediction, mask):
    return base(target, prediction, mask) + weight * gradient_matching(
        target, prediction, mask)

  loss.__name__ = f"{name}_plus_{weight:g}_gradient_matching"
  return loss
