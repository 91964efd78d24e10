"""trainer.losses: per-example, masked, NaN-free, float32."""

import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import losses

B, H, W = 2, 8, 12
ALL_LOSSES = [losses.masked_mse, losses.masked_l1, losses.scale_invariant_log,
              losses.gradient_matching, losses.get_loss("mse", 0.5)]


def _data(seed=0):
  rng = np.random.default_rng(seed)
  target = rng.uniform(0.5, 5.0, (B, H, W, 1)).astype(np.float32)
  pred = rng.uniform(0.5, 5.0, (B, H, W, 1)).astype(np.float32)
  mask = (rng.uniform(size=(B, H, W, 1)) > 0.3).astype(np.float32)
  return target, pred, mask


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_zero_when_prediction_equals_target(fn):
  target, _, mask = _data()
  np.testing.assert_allclose(fn(target, target, mask).numpy(), np.zeros(B), atol=1e-6)


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_shape_dtype_and_positive(fn):
  target, pred, mask = _data()
  loss = fn(target, tf.constant(pred, tf.bfloat16), mask)
  assert loss.shape == (B,) and loss.dtype == tf.float32
  assert np.all(loss.numpy() > 0)


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_masked_pixels_do_not_matter(fn):
  target, pred, mask = _data()
  invalid = mask == 0
  target2, pred2 = target.copy(), pred.copy()
  target2[invalid] = np.nan  # as Record3D writes
  pred2[invalid] = 1e6
  np.testing.assert_allclose(fn(target, pred, mask).numpy(),
                             fn(target2, pred2, mask.astype(bool)).numpy(), rtol=1e-6)
  # ...while valid pixels do.
  pred3 = pred.copy()
  pred3[~invalid] += 1.0
  assert not np.allclose(fn(target, pred, mask).numpy(), fn(target, pred3, mask).numpy())


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_empty_mask_gives_zero_without_nan_in_loss_or_gradient(fn):
  target, pred, mask = _data()
  mask[1] = 0.0
  target[1] = np.nan
  pred_var = tf.Variable(pred)
  with tf.GradientTape() as tape:
    loss = fn(target, pred_var, mask)
    total = tf.reduce_sum(loss)
  grad = tape.gradient(total, pred_var).numpy()
  assert loss.numpy()[1] == 0.0 and loss.numpy()[0] > 0
  assert np.all(np.isfinite(grad))
  assert np.all(grad[1] == 0.0)


def test_mse_and_l1_hand_values():
  target = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 2, 2, 1)
  pred = np.array([2.0, 2.0, 1.0, 100.0], np.float32).reshape(1, 2, 2, 1)
  mask = np.array([1, 1, 1, 0], np.float32).reshape(1, 2, 2, 1)
  assert losses.masked_mse(target, pred, mask).numpy()[0] == pytest.approx((1 + 0 + 4) / 3)
  assert losses.masked_l1(target, pred, mask).numpy()[0] == pytest.approx((1 + 0 + 2) / 3)


def test_silog_scale_behaviour():
  target, _, mask = _data()
  scaled = 2.0 * target
  # lambda = 1: fully scale invariant.
  np.testing.assert_allclose(
      losses.scale_invariant_log(target, scaled, mask, variance_focus=1.0).numpy(), 0.0,
      atol=1e-6)
  # lambda = 0.85: only (1 - 0.85) * ln(2)^2 remains for a global scale error.
  np.testing.assert_allclose(losses.scale_invariant_log(target, scaled, mask).numpy(),
                             0.15 * math.log(2.0)**2, rtol=1e-4)
  # Zero / negative predictions are clamped: finite loss.
  assert np.all(np.isfinite(
      losses.scale_invariant_log(target, np.zeros_like(target) - 1.0, mask).numpy()))


def test_gradient_matching_ignores_global_scale_in_log_space_only():
  target, _, mask = _data()
  np.testing.assert_allclose(losses.gradient_matching(target, 3.0 * target, mask).numpy(),
                             0.0, atol=1e-5)
  assert np.all(losses.gradient_matching(target, 3.0 * target, mask,
                                         log_space=False).numpy() > 0.1)


def test_gradient_matching_hand_value_single_scale():
  # One row of 3 valid pixels, log residual r = (0, ln 2, 0): |dr/dx| = ln2, ln2.
  target = np.ones((1, 1, 3, 1), np.float32)
  pred = np.array([1.0, 2.0, 1.0], np.float32).reshape(1, 1, 3, 1)
  mask = np.ones_like(target)
  assert losses.gradient_matching(target, pred, mask, scales=1).numpy()[0] == pytest.approx(
      math.log(2.0))


def test_get_loss():
  assert losses.LOSSES == ("mse", "l1", "silog")
  assert losses.get_loss("l1") is losses.masked_l1
  target, pred, mask = _data()
  combined = losses.get_loss("silog", gradient_matching_weight=0.5)(target, pred, mask)
  expected = (losses.scale_invariant_log(target, pred, mask)
              + 0.5 * losses.gradient_matching(target, pred, mask))
  np.testing.assert_allclose(combined.numpy(), expected.numpy(), rtol=1e-6)
  with pytest.raises(ValueError, match="mse"):
    losses.get_loss("huber")
