"""Standard single-image depth metrics (Eigen et al. 2014; BTS `compute_errors`).

`depth_metrics` is TensorFlow (it runs on replicas inside `strategy.run`) and
returns PER-IMAGE values; `accumulate` / `finalize` average them over images
on the host, skipping images without any valid pixel. Per image, then averaged
over images, as BTS does (not pooled over all pixels of the split).
"""

import numpy as np
import tensorflow as tf

METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1",
                "delta2", "delta3", "silog", "mse")
# Also in the per-image dict: the number of valid pixels of each image.
NUM_VALID = "num_valid"
# In `finalize`'s result: how many images were averaged.
NUM_IMAGES = "num_images"


def valid_pixels(gt, min_depth=1e-3, max_depth=10.0, mask=None):
  """bool [B, H, W]: where gt (any rank-3/4 float) is finite, in (min_depth,
  max_depth) and `mask` (same shape, bool or numeric: nonzero = valid) allows."""
  gt = _squeeze_channel(tf.cast(gt, tf.float32))
  valid = tf.math.is_finite(gt) & (gt > min_depth) & (gt < max_depth)
  if mask is not None:
    mask = _squeeze_channel(tf.convert_to_tensor(mask))
    valid &= mask if mask.dtype == tf.bool else tf.not_equal(mask, tf.zeros_like(mask))
  return valid


def _squeeze_channel(x):
  return x[..., 0] if x.shape.rank == 4 else x


def depth_metrics(gt, pred, min_depth=1e-3, max_depth=10.0, mask=None):
  """Per-image depth metrics.

  Args:
    gt: [B, H, W] or [B, H, W, 1] ground truth depth in meters; pixels outside
      (min_depth, max_depth) or not finite are excluded.
    pred: predicted depth, same shape (any float dtype); clipped to
      [min_depth, max_depth] before the errors (BTS), so a 0 prediction is
      finite in the log metrics.
    min_depth, max_depth: valid range in meters.
    mask: optional extra validity, [B, H, W] or [B, H, W, 1], bool or numeric
      (nonzero = valid), e.g. `confidence >= min_confidence`: a pixel counts
      only where it is in range AND allowed by the mask.

  Returns:
    dict name -> float32 [B] for every name in METRIC_NAMES, plus NUM_VALID
    (valid pixel count, float32 [B]). Images with no valid pixel give 0 for
    every metric and num_valid 0: exclude them when averaging (see accumulate).
    Units: rmse in meters, mse (the seed's metric, after clipping) in meters^2,
    sq_rel in meters, silog = 100 * sqrt(var(ln p - ln g)), deltas are fractions.
  """
  gt = _squeeze_channel(tf.cast(gt, tf.float32))
  pred = _squeeze_channel(tf.cast(pred, tf.float32))
  valid = valid_pixels(gt, min_depth, max_depth, mask)
  weight = tf.cast(valid, tf.float32)  # [B, H, W]
  # Invalid pixels get g = p = 1 so that logs and divisions stay finite; the
  # weight removes them from every sum.
  g = tf.where(valid, gt, 1.0)
  p = tf.where(valid, tf.clip_by_value(pred, min_depth, max_depth), 1.0)

  count = tf.reduce_sum(weight, axis=[1, 2])  # [B]

  def mean(x):
    return tf.math.divide_no_nan(tf.reduce_sum(x * weight, axis=[1, 2]), count)

  diff = g - p
  log_diff = tf.math.log(p) - tf.math.log(g)  # d = ln p - ln g
  ratio = tf.maximum(g / p, p / g)
  mse = mean(tf.square(diff))
  mean_log_diff = mean(log_diff)
  ln10 = tf.math.log(10.0)
  return {
      "abs_rel": mean(tf.abs(diff) / g),
      "sq_rel": mean(tf.square(diff) / g),
      "rmse": tf.sqrt(mse),
      "rmse_log": tf.sqrt(mean(tf.square(log_diff))),
      "log10": mean(tf.abs(log_diff) / ln10),
      "delta1": mean(tf.cast(ratio < 1.25, tf.float32)),
      "delta2": mean(tf.cast(ratio < 1.25**2, tf.float32)),
      "delta3": mean(tf.cast(ratio < 1.25**3, tf.float32)),
      # max(., 0): rounding can make the variance slightly negative.
      "silog": 100.0 * tf.sqrt(tf.maximum(
          mean(tf.square(log_diff)) - tf.square(mean_log_diff), 0.0)),
      "mse": mse,
      NUM_VALID: count,
  }


def masked_median(values, valid):
  """Per-image median of `values` [B, H, W] over the `valid` [B, H, W] pixels: [B].

  numpy's median (the mean of the two middle values for an even count). Sorts
  each image with the invalid pixels moved to the end; static-shape ops only,
  so it runs on replicas (and TPU). An image without a valid pixel gives 0.
  """
  values = tf.cast(values, tf.float32)
  batch = tf.shape(values)[0]
  flat = tf.reshape(tf.where(valid, values, np.inf), [batch, -1])  # [B, H*W]
  ordered = tf.sort(flat, axis=1)
  count = tf.reduce_sum(tf.cast(tf.reshape(valid, [batch, -1]), tf.int32), axis=1)  # [B]
  lower = tf.maximum((count - 1) // 2, 0)
  upper = tf.maximum(count // 2, 0)
  pick = lambda index: tf.gather(ordered, index[:, None], axis=1, batch_dims=1)[:, 0]
  return tf.where(count > 0, 0.5 * (pick(lower) + pick(upper)), 0.0)


def median_scale(gt, pred, min_depth=1e-3, max_depth=10.0, mask=None):
  """Per-image factor median(gt) / median(pred) over the valid pixels: [B].

  Valid pixels are those of `depth_metrics` (range, finiteness, `mask`).
  Predictions below min_depth count as min_depth in the median (the metrics
  clip them so too), so a network that outputs 0 still gets a finite factor.
  An image without a valid pixel gets 1.
  """
  gt = _squeeze_channel(tf.cast(gt, tf.float32))
  pred = _squeeze_channel(tf.cast(pred, tf.float32))
  valid = valid_pixels(gt, min_depth, max_depth, mask)
  gt_median = masked_median(gt, valid)
  pred_median = masked_median(tf.maximum(pred, min_depth), valid)
  return tf.where(pred_median > 0, tf.math.divide_no_nan(gt_median, pred_median), 1.0)


def median_scaled_metrics(gt, pred, min_depth=1e-3, max_depth=10.0, mask=None):
  """`depth_metrics` after per-image median scaling (the protocol for networks
  whose scale is unknown, e.g. Monodepth2's evaluation): each prediction is
  multiplied by median(gt) / median(pred) over its image's valid pixels, then
  clipped and scored as usual. Same keys and shapes as `depth_metrics`.
  """
  pred = _squeeze_channel(tf.cast(pred, tf.float32))
  scale = median_scale(gt, pred, min_depth, max_depth, mask)  # [B]
  return depth_metrics(gt, pred * scale[:, None, None], min_depth, max_depth, mask)


MEDIAN_SCALED = "median_scaled"  # key of the nested median-scaled metrics
_MEDIAN_PREFIX = MEDIAN_SCALED + "/"


def with_median_scaled(gt, pred, min_depth=1e-3, max_depth=10.0, mask=None):
  """Per-image metric and median-scaled metrics in one flat dict for `accumulate`:
  the `depth_metrics` keys, plus "median_scaled/<name>" for every METRIC_NAMES
  name. `nest_median_scaled` turns `finalize`'s result into the nested form."""
  per_image = dict(depth_metrics(gt, pred, min_depth, max_depth, mask))
  scaled = median_scaled_metrics(gt, pred, min_depth, max_depth, mask)
  per_image.update({_MEDIAN_PREFIX + name: scaled[name] for name in METRIC_NAMES})
  return per_image


def nest_median_scaled(result: dict) -> dict:
  """{"abs_rel": .., "median_scaled/abs_rel": ..} -> {"abs_rel": .., "median_scaled":
  {"abs_rel": .., "num_images": ..}}; a result without such keys is returned as is."""
  flat = {k: v for k, v in result.items() if not k.startswith(_MEDIAN_PREFIX)}
  scaled = {k[len(_MEDIAN_PREFIX):]: v for k, v in result.items() if k.startswith(_MEDIAN_PREFIX)}
  if scaled:
    if NUM_IMAGES in result:  # the same images count in both
      scaled[NUM_IMAGES] = result[NUM_IMAGES]
    flat[MEDIAN_SCALED] = scaled
  return flat


def edge_metrics(target, pred, mask):
  """Per-image metric of the gradient stage, judged on its own target.

  Args:
    target: [B, H, W, 1] Sobel magnitude of the ground-truth depth.
    pred: the gradient network's output, same shape.
    mask: [B, H, W, 1], 1 where the target is defined.

  Returns:
    dict: edge_rmse [B] (RMSE over the masked pixels) and NUM_VALID [B].
  """
  target = tf.cast(target, tf.float32)
  pred = tf.cast(pred, tf.float32)
  mask = tf.cast(mask, tf.float32)
  count = tf.reduce_sum(mask, axis=[1, 2, 3])
  squared = tf.reduce_sum(mask * tf.square(target - pred), axis=[1, 2, 3])
  return {"edge_rmse": tf.sqrt(tf.math.divide_no_nan(squared, count)), NUM_VALID: count}


def accumulate(sums, per_image):
  """Adds one batch of per-image metrics to running sums; returns new sums.

  Args:
    sums: the previous result of `accumulate`, or {} / None to start.
    per_image: dict name -> [B] values (numpy arrays or eager tensors), as
      returned by `depth_metrics` (gathered from all replicas). Images with
      num_valid == 0 are skipped.

  Returns:
    A new dict with, for every metric, the sum over counted images, and
    NUM_IMAGES, the number of counted images. `sums` is not modified.
  """
  sums = dict(sums or {})
  counted = np.asarray(per_image[NUM_VALID]).reshape(-1) > 0
  for name in per_image:
    if name == NUM_VALID:
      continue
    values = np.asarray(per_image[name], np.float64).reshape(-1)
    sums[name] = sums.get(name, 0.0) + float(values[counted].sum())
  sums[NUM_IMAGES] = sums.get(NUM_IMAGES, 0) + int(counted.sum())
  return sums


def finalize(sums):
  """Mean of each metric over the counted images: dict name -> float.

  Includes NUM_IMAGES. With no counted image every metric is NaN.
  """
  sums = sums or {}
  n = sums.get(NUM_IMAGES, 0)
  names = [name for name in sums if name != NUM_IMAGES] or METRIC_NAMES
  result = {name: (sums.get(name, 0.0) / n if n else float("nan")) for name in names}
  result[NUM_IMAGES] = n
  return result
