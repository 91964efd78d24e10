"""trainer.input_pipeline directly: eval padding and sharding, invalid depth under
resizing, and one preprocessing for training and serving."""

import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import datasets
from trainer import export as export_lib
from trainer import input_pipeline


def _context(num_pipelines: int, pipeline_id: int) -> tf.distribute.InputContext:
  return tf.distribute.InputContext(num_input_pipelines=num_pipelines,
                                    input_pipeline_id=pipeline_id,
                                    num_replicas_in_sync=num_pipelines)


def _real_examples(ds) -> list:
  """(depth checksum) of every non-padding example of an eval dataset."""
  out = []
  for batch in ds.as_numpy_iterator():
    for depth, mask in zip(batch["depth"], batch["mask"]):
      if mask.sum() > 0:
        out.append(round(float(depth.sum()), 3))
  return out


@pytest.mark.parametrize("num_pipelines", [2, 3])
def test_eval_shards_cover_the_split_once_with_equal_batch_counts(make_config, tmp_path,
                                                                  num_pipelines):
  # global batch 6 = 2 or 3 per pipeline, over the 4 test images of the tiny dataset
  config = make_config(tmp_path, global_batch_size=6)
  builder = datasets.get_builder(config.dataset, config.data_dir)
  total = datasets.num_examples(builder, config.eval_split)
  whole = _real_examples(input_pipeline.eval_dataset(config, "rough", builder))
  assert len(whole) == total == 4
  shards, batch_counts = [], []
  for pipeline_id in range(num_pipelines):
    ds = input_pipeline.eval_dataset(config, "rough", builder,
                                     _context(num_pipelines, pipeline_id))
    batches = list(ds.as_numpy_iterator())
    batch_counts.append(len(batches))
    # Static shapes (TPU): every batch is full, padding included.
    assert all(b["image"].shape[0] == 6 // num_pipelines for b in batches)
    shards.append(_real_examples(ds))
  # Every pipeline yields as many batches (else a collective would hang), and
  # together they hold each real example exactly once.
  assert len(set(batch_counts)) == 1, batch_counts
  assert sorted(sum(shards, [])) == sorted(whole)


def test_padding_examples_are_empty(make_config, tmp_path):
  config = make_config(tmp_path, global_batch_size=3)  # 4 images -> 2 batches, 2 padded
  builder = datasets.get_builder(config.dataset, config.data_dir)
  batches = list(input_pipeline.eval_dataset(config, "rough", builder).as_numpy_iterator())
  assert len(batches) == 2
  masks = np.concatenate([b["mask"] for b in batches])
  assert [int(m.sum() > 0) for m in masks] == [1, 1, 1, 1, 0, 0]
  padded = np.concatenate([b["image"] for b in batches])[4:]
  assert not padded.any()


def test_invalid_depth_never_bleeds_into_valid_pixels_when_resized(make_config, tmp_path):
  config = make_config(tmp_path, image_size=(8, 6), min_depth=0.1, max_depth=10.0)
  depth = np.full((16, 12), 2.0, np.float32)
  depth[:, 6:] = 4.0
  depth[0:4, 0:4] = 0.0  # a hole
  depth[8:12, 0:2] = np.nan  # invalid in the source
  depth[12:, 8:] = 50.0  # beyond --max_depth: invalid too
  example = {"image": np.zeros((32, 24, 3), np.uint8), "depth": depth}
  resized = input_pipeline.resize_example(example, config)["depth"].numpy()[..., 0]
  assert resized.shape == (8, 6)
  valid = resized[resized > 0]
  # Valid output pixels are averages of valid 2 m / 4 m inputs only: never pulled
  # towards 0 by the hole nor towards 50 m by the out-of-range block.
  assert valid.min() >= 2.0 - 1e-6 and valid.max() <= 4.0 + 1e-6
  assert resized[0:2, 0:2].max() == 0.0  # the hole stays a hole
  assert resized[6:, 4:].max() == 0.0  # so does the out-of-range corner


def test_serving_and_training_see_the_same_tensor_for_the_same_image():
  """The SavedModel's serving function and the input pipeline preprocess through
  the same function: for one uint8 image the network receives identical values."""
  image_size = (24, 18)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (61, 45, 3), dtype=np.uint8)  # another size and aspect

  seen = []

  def network(x, training=False):
    del training
    seen.append(x)
    return tf.ones_like(x[..., :1])

  module = export_lib.DepthServingModule(network, image_size, max_depth=10.0)
  module.predict_depth(tf.constant(image[None]))
  served = seen[0].numpy()[0]

  config = config_lib.Config(model_dir="unused", image_size=image_size)
  trained = input_pipeline.resize_example(
      {"image": image, "depth": np.ones((8, 6), np.float32)}, config)["image"].numpy()
  assert served.shape == trained.shape == (*image_size, 3)
  np.testing.assert_array_equal(served, trained)
