"""trainer.depth_ops: Sobel target, mask-aware resizing, colourising."""

import numpy as np
import pytest
import tensorflow as tf

from trainer import depth_ops

H, W = 10, 12


def _ramp(slope_x=0.1, slope_y=0.0):
  y, x = np.mgrid[0:H, 0:W].astype(np.float32)
  return (1.0 + slope_x * x + slope_y * y)[None, :, :, None]


def test_sobel_on_linear_ramp_is_the_slope_in_meters_per_pixel():
  depth = _ramp(0.1, -0.2)
  mag, mask = depth_ops.sobel_magnitude(depth, np.ones_like(depth))
  mag, mask = mag.numpy(), mask.numpy()
  # The border lacks a full 3x3 neighbourhood.
  assert mask[0, 1:-1, 1:-1].all() and mask[0, 0].sum() == 0 and mask[0, :, -1].sum() == 0
  np.testing.assert_allclose(mag[0, 1:-1, 1:-1], np.hypot(0.1, 0.2), rtol=1e-5)
  assert np.all(mag[mask == 0] == 0)


def test_sobel_matches_tf_image_sobel_edges_inside():
  depth = np.random.default_rng(0).uniform(1, 3, (2, H, W, 1)).astype(np.float32)
  mag, _ = depth_ops.sobel_magnitude(depth, np.ones_like(depth))
  edges = tf.image.sobel_edges(tf.constant(depth)).numpy()  # [B,H,W,1,2]
  expected = np.sqrt((edges**2).sum(-1)) / 8.0
  np.testing.assert_allclose(mag.numpy()[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], rtol=1e-5)


def test_invalid_hole_does_not_create_gradients():
  depth = _ramp(0.1)
  valid = np.ones_like(depth)
  depth[0, 4:6, 5:7] = np.nan
  valid[0, 4:6, 5:7] = 0
  mag, mask = depth_ops.sobel_magnitude(depth, valid)
  mag, mask = mag.numpy(), mask.numpy()
  assert np.all(np.isfinite(mag))
  # The hole grown by one pixel is masked out.
  assert mask[0, 3:7, 4:8].sum() == 0
  assert mask[0, 2, 4] == 1 and mask[0, 4, 3] == 1
  np.testing.assert_allclose(mag[mask == 1], 0.1, rtol=1e-5)
  assert np.all(mag[mask == 0] == 0)


def _holey_constant(value=5.0):
  depth = np.full((H * 2, W * 2), value, np.float32)
  depth[:, :5] = 0.0       # a band of invalid columns
  depth[3, 10] = np.nan    # a single NaN
  return depth


@pytest.mark.parametrize("method", depth_ops.RESIZE_METHODS)
@pytest.mark.parametrize("size", [(H, W), (7, 9), (31, 37)])
def test_resize_never_bleeds_invalid_pixels(method, size):
  out = depth_ops.resize_depth(_holey_constant(), size, method=method).numpy()
  assert out.shape == size
  # Valid outputs are the (constant) valid value, never a mix with 0
  # (area weights are float: allow rounding).
  valid = out != 0.0
  np.testing.assert_allclose(out[valid], 5.0, rtol=1e-6)
  assert valid.sum() > 0.5 * out.size and (~valid).sum() > 0


def test_valid_average_averages_valid_pixels_only():
  depth = np.array([[1.0, 3.0, 0.0, 0.0],
                    [np.nan, 2.0, 0.0, 4.0]], np.float32)[None, :, :, None]
  out = depth_ops.resize_depth(depth, (1, 2), method="valid_average").numpy()
  # Left 2x2 block: mean(1, 3, 2) = 2 (3/4 valid). Right block: 1/4 valid < 0.5.
  np.testing.assert_allclose(out[0, :, :, 0], [[2.0, 0.0]])
  out = depth_ops.resize_depth(depth, (1, 2), method="valid_average", min_weight=0.25)
  np.testing.assert_allclose(out.numpy()[0, :, :, 0], [[2.0, 4.0]])


def test_resize_in_graph_mode_with_dynamic_shapes():
  fn = tf.function(
      lambda d: depth_ops.resize_depth(d, (tf.shape(d)[0] // 2, 6), "valid_average"),
      input_signature=[tf.TensorSpec([None, None], tf.float32)])
  out = fn(_holey_constant())
  assert out.shape == (H, 6)
  ds = tf.data.Dataset.from_tensors(_holey_constant()[..., None]).map(
      lambda d: depth_ops.resize_depth(d, (4, 5)))
  assert next(iter(ds)).shape == (4, 5, 1)
  with pytest.raises(ValueError, match="nearest"):
    depth_ops.resize_depth(_holey_constant(), (4, 5), method="bilinear")


def test_colourize_scale_invalid_black_and_numpy_tf_agree():
  depth = np.array([[0.0, 1.0, 2.0], [3.0, np.nan, 5.0]], np.float32)
  rgb = depth_ops.colourize(depth, vmin=1.0, vmax=3.0)
  assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
  table = depth_ops.COLOUR_TABLES["turbo"]
  np.testing.assert_array_equal(rgb[0, 0], [0, 0, 0])
  np.testing.assert_array_equal(rgb[1, 1], [0, 0, 0])
  np.testing.assert_array_equal(rgb[0, 1], table[0])    # vmin
  np.testing.assert_array_equal(rgb[1, 0], table[255])  # vmax
  np.testing.assert_array_equal(rgb[1, 2], table[255])  # clipped above vmax
  np.testing.assert_array_equal(rgb[0, 2], table[128])  # halfway (127.5 rounds up)
  as_tf = depth_ops.colourize(tf.constant(depth[None, :, :, None]), 1.0, 3.0)
  assert as_tf.dtype == tf.uint8
  np.testing.assert_array_equal(as_tf.numpy()[0], rgb)
  # Default range: min / max of the valid pixels.
  np.testing.assert_array_equal(depth_ops.colourize(depth)[1, 2], table[255])
  np.testing.assert_array_equal(depth_ops.colourize(tf.constant(depth)).numpy()[0, 1], table[0])


def test_colour_table_is_a_smooth_dark_to_bright_to_dark_rainbow():
  table = depth_ops.COLOUR_TABLES["turbo"].astype(int)
  assert table.shape == (256, 3)
  assert np.abs(np.diff(table, axis=0)).max() <= 12  # no jumps
  assert table[0, 2] > table[0, 0] and table[-1, 0] > table[-1, 2]  # blue -> red
  assert len({tuple(c) for c in table}) > 200
