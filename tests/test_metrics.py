"""trainer.metrics against values computed by hand on tiny images."""

import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import metrics

NAN = float("nan")
# Three 2x2 images, valid range (0.1, 10):
# image 0: gt (1, 2 / 4, 0) -> pixel (1,1) invalid; pred (2, 2 / 3, 99).
# image 1: gt (8, 20 / nan, 0.5) -> 20 (>= max) and nan invalid;
#          pred (50, 1 / 1, 0) -> 50 clipped to 10 and 0 clipped to 0.1.
# image 2: every pixel invalid.
GT = np.array([[[1.0, 2.0], [4.0, 0.0]],
               [[8.0, 20.0], [NAN, 0.5]],
               [[0.0, 0.0], [10.0, 0.05]]], np.float32)
PRED = np.array([[[2.0, 2.0], [3.0, 99.0]],
                 [[50.0, 1.0], [1.0, 0.0]],
                 [[1.0, 1.0], [1.0, 1.0]]], np.float32)

LN2 = math.log(2.0)
# Hand computation, valid pairs (g, p): image 0: (1,2) (2,2) (4,3);
# image 1: (8,10) (0.5,0.1).
EXPECTED = {
    "abs_rel": [(1 + 0 + 0.25) / 3, (0.25 + 0.8) / 2, 0.0],
    "sq_rel": [(1 + 0 + 0.25) / 3, (4 / 8 + 0.16 / 0.5) / 2, 0.0],
    "mse": [2 / 3, (4 + 0.16) / 2, 0.0],
    "rmse": [math.sqrt(2 / 3), math.sqrt(2.08), 0.0],
    "rmse_log": [math.sqrt((LN2**2 + math.log(0.75)**2) / 3),
                 math.sqrt((math.log(1.25)**2 + math.log(0.2)**2) / 2), 0.0],
    "log10": [(math.log10(2) + math.log10(4 / 3)) / 3,
              (math.log10(1.25) + math.log10(5)) / 2, 0.0],
    # ratios: image 0: 2, 1, 4/3; image 1: 1.25 (not < 1.25), 5.
    "delta1": [1 / 3, 0.0, 0.0],
    "delta2": [2 / 3, 0.5, 0.0],
    "delta3": [2 / 3, 0.5, 0.0],
    "num_valid": [3, 2, 0],
}


def _silog(d):
  d = np.asarray(d)
  return 100 * math.sqrt(np.mean(d**2) - np.mean(d)**2)


EXPECTED["silog"] = [_silog([LN2, 0.0, math.log(0.75)]),
                     _silog([math.log(1.25), math.log(0.2)]), 0.0]


def _compute(gt=GT, pred=PRED):
  return {k: v.numpy() for k, v in
          metrics.depth_metrics(gt, pred, min_depth=0.1, max_depth=10.0).items()}


def test_per_image_values_match_hand_computation():
  per_image = _compute()
  assert set(per_image) == set(metrics.METRIC_NAMES) | {"num_valid"}
  for name, expected in EXPECTED.items():
    np.testing.assert_allclose(per_image[name], expected, rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_channel_axis_and_dtype_are_accepted():
  per_image = metrics.depth_metrics(GT[..., None], tf.cast(PRED[..., None], tf.bfloat16),
                                    min_depth=0.1, max_depth=10.0)
  assert per_image["rmse"].dtype == tf.float32
  np.testing.assert_allclose(per_image["abs_rel"].numpy(), EXPECTED["abs_rel"], rtol=1e-5)


def test_runs_in_graph_mode_with_dynamic_shapes():
  fn = tf.function(lambda g, p: metrics.depth_metrics(g, p, 0.1, 10.0),
                   input_signature=[tf.TensorSpec([None, None, None], tf.float32)] * 2)
  np.testing.assert_allclose(fn(GT, PRED)["rmse"].numpy(), EXPECTED["rmse"], rtol=1e-5)


def test_no_nan_for_invalid_or_zero_pixels():
  for values in _compute().values():
    assert np.all(np.isfinite(values))


def test_finalize_averages_over_images_and_skips_fully_invalid():
  per_image = _compute()
  # Two batches: images (0, 2) then (1,), as an eval loop would see them.
  first = {k: v[[0, 2]] for k, v in per_image.items()}
  second = {k: v[[1]] for k, v in per_image.items()}
  sums = metrics.accumulate({}, first)
  sums2 = metrics.accumulate(sums, second)
  assert sums["num_images"] == 1  # accumulate is pure: sums unchanged below
  result = metrics.finalize(sums2)
  assert result["num_images"] == 2
  for name in metrics.METRIC_NAMES:
    expected = (EXPECTED[name][0] + EXPECTED[name][1]) / 2  # image 2 excluded
    assert result[name] == pytest.approx(expected, rel=1e-5), name


def test_finalize_without_images_is_nan():
  result = metrics.finalize(metrics.accumulate(None, {k: v[[2]] for k, v in _compute().items()}))
  assert result["num_images"] == 0
  assert math.isnan(result["rmse"])


def test_perfect_prediction():
  gt = np.full((1, 3, 4), 2.5, np.float32)
  per_image = _compute(gt, gt)
  for name in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "mse"):
    assert per_image[name][0] == pytest.approx(0.0, abs=1e-6), name
  for name in ("delta1", "delta2", "delta3"):
    assert per_image[name][0] == 1.0


def test_edge_metrics_hand_values():
  target = np.array([[[1.0, 2.0], [3.0, 4.0]],
                     [[1.0, 2.0], [3.0, 4.0]],
                     [[1.0, 2.0], [3.0, 4.0]]], np.float32)[..., None]
  pred = np.array([[[1.0, 2.0], [3.0, 99.0]],   # only the masked pixel is wrong
                   [[2.0, 2.0], [3.0, 1.0]],    # errors 1, 0, 0, 3
                   [[0.0, 0.0], [0.0, 0.0]]], np.float32)[..., None]
  mask = np.array([[[1, 1], [1, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 0]]], np.float32)[..., None]
  per_image = {k: v.numpy() for k, v in metrics.edge_metrics(target, pred, mask).items()}
  np.testing.assert_allclose(per_image["edge_rmse"], [0.0, math.sqrt(10 / 4), 0.0], rtol=1e-6)
  np.testing.assert_array_equal(per_image["num_valid"], [3, 4, 0])
  # accumulate / finalize average whatever keys they get.
  result = metrics.finalize(metrics.accumulate({}, per_image))
  assert result == {"edge_rmse": pytest.approx(math.sqrt(10 / 4) / 2), "num_images": 2}


# ---------------------------------------------------------------------------
# The extra validity mask (e.g. confidence >= min_confidence).
# ---------------------------------------------------------------------------
def test_mask_removes_pixels_together_with_the_depth_range():
  # Confidence of GT's pixels; >= 1 keeps: image 0 loses (0,0) (g=1, p=2) and the
  # out-of-range (1,1) stays invalid; image 1 loses (1,1) (g=0.5); image 2: nothing.
  confidence = np.array([[[0, 2], [1, 2]],
                         [[2, 2], [2, 0]],
                         [[2, 2], [2, 2]]], np.uint8)
  per_image = {k: v.numpy() for k, v in metrics.depth_metrics(
      GT, PRED, 0.1, 10.0, mask=confidence >= 1).items()}
  # Left: image 0 (2,2) (4,3); image 1 (8,10).
  np.testing.assert_array_equal(per_image["num_valid"], [2, 1, 0])
  np.testing.assert_allclose(per_image["abs_rel"], [0.25 / 2, 0.25, 0.0], rtol=1e-6)
  np.testing.assert_allclose(per_image["rmse"], [math.sqrt(1 / 2), 2.0, 0.0], rtol=1e-6)
  # A numeric mask with a channel axis means the same (nonzero = valid).
  numeric = metrics.depth_metrics(GT[..., None], PRED, 0.1, 10.0,
                                  mask=(confidence >= 1).astype(np.float32)[..., None])
  np.testing.assert_allclose(numeric["abs_rel"].numpy(), per_image["abs_rel"], rtol=1e-6)


def test_all_true_mask_changes_nothing():
  with_mask = metrics.depth_metrics(GT, PRED, 0.1, 10.0, mask=np.ones(GT.shape, bool))
  for name, values in _compute().items():
    np.testing.assert_allclose(with_mask[name].numpy(), values, rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------
# Median scaling.
# ---------------------------------------------------------------------------
# Image 0: gt (1, 2 / 3, 0 invalid), pred (2, 4 / 6, 99): median 2 vs 4 -> x0.5, perfect.
# Image 1: gt (1, 2 / 4, 8), pred 1 everywhere: median 3 (even count: mean of
#          2 and 4) vs 1 -> the scaled prediction is 3 everywhere.
MS_GT = np.array([[[1.0, 2.0], [3.0, 0.0]], [[1.0, 2.0], [4.0, 8.0]]], np.float32)
MS_PRED = np.array([[[2.0, 4.0], [6.0, 99.0]], [[1.0, 1.0], [1.0, 1.0]]], np.float32)


def test_median_scale_hand_values():
  np.testing.assert_allclose(metrics.median_scale(MS_GT, MS_PRED, 0.1, 10.0).numpy(),
                             [0.5, 3.0], rtol=1e-6)
  np.testing.assert_allclose(metrics.masked_median(MS_GT, MS_GT > 0).numpy(), [2.0, 3.0])


def test_median_scaled_metrics_hand_values():
  scaled = {k: v.numpy() for k, v in metrics.median_scaled_metrics(MS_GT, MS_PRED, 0.1, 10.0).items()}
  # Image 1: (g, p) = (1,3) (2,3) (4,3) (8,3).
  np.testing.assert_allclose(scaled["abs_rel"], [0.0, (2 + 0.5 + 0.25 + 5 / 8) / 4], atol=1e-6)
  np.testing.assert_allclose(scaled["rmse"], [0.0, math.sqrt((4 + 1 + 1 + 25) / 4)], atol=1e-6)
  np.testing.assert_allclose(scaled["delta1"], [1.0, 0.0])  # ratios 3, 1.5, 1.33, 2.67
  np.testing.assert_allclose(scaled["delta2"], [1.0, 0.5])  # 1.5 and 1.33 < 1.5625
  np.testing.assert_array_equal(scaled["num_valid"], [3, 4])
  # Unscaled, image 0 is off by a factor 2 everywhere: abs_rel 1.
  assert metrics.depth_metrics(MS_GT, MS_PRED, 0.1, 10.0)["abs_rel"].numpy()[0] == pytest.approx(1.0)


def test_median_scaling_uses_only_masked_pixels():
  # Without (1,1) of image 1 (g=8): median gt of (1, 2, 4) is 2 -> p = 2 everywhere.
  mask = np.ones(MS_GT.shape, bool)
  mask[1, 1, 1] = False
  scaled = metrics.median_scaled_metrics(MS_GT, MS_PRED, 0.1, 10.0, mask=mask)
  assert scaled["abs_rel"].numpy()[1] == pytest.approx((1 + 0 + 0.5) / 3, rel=1e-6)
  assert metrics.median_scale(MS_GT, MS_PRED, 0.1, 10.0, mask=mask).numpy()[1] == pytest.approx(2.0)


def _numpy_median_scaled(gt, pred, min_depth, max_depth):
  """An independent numpy reference (Monodepth2 / BTS style) for one image."""
  valid = np.isfinite(gt) & (gt > min_depth) & (gt < max_depth)
  g, p = gt[valid].astype(np.float64), np.maximum(pred[valid], min_depth).astype(np.float64)
  p = np.clip(p * np.median(g) / np.median(p), min_depth, max_depth)
  ratio = np.maximum(g / p, p / g)
  d = np.log(p) - np.log(g)
  return {"abs_rel": np.mean(np.abs(g - p) / g), "rmse": np.sqrt(np.mean((g - p) ** 2)),
          "delta1": np.mean(ratio < 1.25), "silog": 100 * np.sqrt(np.mean(d**2) - np.mean(d)**2),
          "log10": np.mean(np.abs(np.log10(g) - np.log10(p)))}


def test_median_scaled_metrics_match_a_numpy_reference_on_random_images():
  rng = np.random.default_rng(3)
  gt = rng.uniform(0.0, 6.0, (3, 7, 5)).astype(np.float32)  # odd pixel count, some < min
  gt[0, :2] = np.nan
  pred = (gt * rng.uniform(0.3, 3.0, (3, 1, 1)) + rng.normal(0, 0.3, gt.shape)).astype(np.float32)
  pred = np.nan_to_num(pred, nan=1.0)
  scaled = metrics.median_scaled_metrics(gt, pred, 0.5, 5.0)
  for i in range(3):
    for name, expected in _numpy_median_scaled(gt[i], pred[i], 0.5, 5.0).items():
      assert scaled[name].numpy()[i] == pytest.approx(expected, rel=1e-4, abs=1e-6), (i, name)


def test_median_scaled_metrics_ignore_the_prediction_scale():
  rng = np.random.default_rng(4)
  gt = rng.uniform(1.0, 4.0, (2, 6, 6)).astype(np.float32)
  pred = gt * rng.uniform(0.8, 1.2, gt.shape).astype(np.float32)
  first = metrics.median_scaled_metrics(gt, pred, 0.1, 10.0)
  second = metrics.median_scaled_metrics(gt, 2.7 * pred, 0.1, 10.0)
  for name in metrics.METRIC_NAMES:
    np.testing.assert_allclose(second[name].numpy(), first[name].numpy(), rtol=1e-4, atol=1e-6)
  # ...whereas the metric-depth abs_rel sees the factor.
  assert metrics.depth_metrics(gt, 2.7 * pred, 0.1, 10.0)["abs_rel"].numpy().min() > 1.0


def test_median_scaled_keys_accumulate_and_nest():
  flat = {k: v.numpy() for k, v in metrics.with_median_scaled(MS_GT, MS_PRED, 0.1, 10.0).items()}
  result = metrics.nest_median_scaled(metrics.finalize(metrics.accumulate({}, flat)))
  assert set(result) == set(metrics.METRIC_NAMES) | {"num_images", "median_scaled"}
  assert set(result["median_scaled"]) == set(metrics.METRIC_NAMES) | {"num_images"}
  assert result["median_scaled"]["abs_rel"] == pytest.approx((2 + 0.5 + 0.25 + 5 / 8) / 8, rel=1e-6)
  assert result["abs_rel"] == pytest.approx((1.0 + (0 + 0.5 + 0.75 + 7 / 8) / 4) / 2, rel=1e-6)
  assert result["median_scaled"]["num_images"] == 2


def test_median_scaled_in_graph_mode_with_dynamic_shapes_and_empty_images():
  fn = tf.function(lambda g, p: metrics.median_scaled_metrics(g, p, 0.1, 10.0),
                   input_signature=[tf.TensorSpec([None, None, None], tf.float32)] * 2)
  gt = np.concatenate([MS_GT, np.zeros((1, 2, 2), np.float32)])  # image 2: nothing valid
  pred = np.concatenate([MS_PRED, np.ones((1, 2, 2), np.float32)])
  out = {k: v.numpy() for k, v in fn(gt, pred).items()}
  for values in out.values():
    assert np.all(np.isfinite(values))
  np.testing.assert_array_equal(out["num_valid"], [3, 4, 0])
  assert out["abs_rel"][0] == pytest.approx(0.0, abs=1e-6)
