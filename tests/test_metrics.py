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
