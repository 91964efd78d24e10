"""trainer.input_pipeline directly: eval padding and sharding, invalid depth under
resizing, one preprocessing for training and serving, JPEG decoded at reduced
scale (within a measured tolerance of full decode + resize; PNG exactly as
before), and the memory / disk caches."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import datasets
from trainer import export as export_lib
from trainer import input_pipeline
from trainer import preprocessing


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


# ---------------------------------------------------------------------------
# JPEG at reduced scale (libjpeg DCT-domain downscaling), PNG as TFDS decodes it.
# ---------------------------------------------------------------------------
def test_jpeg_ratio_is_the_largest_that_keeps_the_training_size():
  assert input_pipeline.jpeg_ratio((960, 720), (192, 144)) == 4  # 240x180
  assert input_pipeline.jpeg_ratio((960, 720), (256, 192)) == 2  # 240 < 256: 480x360
  assert input_pipeline.jpeg_ratio((960, 720), (64, 48)) == 8  # 120x90
  assert input_pipeline.jpeg_ratio((97, 75), (25, 19)) == 4  # ceil(97/4)=25, ceil(75/4)=19
  assert input_pipeline.jpeg_ratio((97, 75), (25, 20)) == 2
  assert input_pipeline.jpeg_ratio((40, 30), (64, 48)) == 1  # upscaling: full decode


def _jpeg(image: np.ndarray) -> bytes:
  from tfds_record3d import writers
  return writers.encode_image(image, ".jpg")  # quality 95, as our writers store


@pytest.mark.parametrize("source,size", [((97, 75), (25, 19)), ((97, 75), (25, 20)),
                                         ((64, 48), (8, 6)), ((40, 30), (64, 48))])
def test_reduced_decode_has_libjpeg_size(source, size):
  image = np.random.default_rng(0).integers(0, 256, (*source, 3), dtype=np.uint8)
  decoded = input_pipeline.decode_image(tf.constant(_jpeg(image)), size)
  ratio = input_pipeline.jpeg_ratio(source, size)
  assert decoded.dtype == tf.uint8
  assert decoded.shape == (-(-source[0] // ratio), -(-source[1] // ratio), 3)


def test_reduced_scale_jpeg_matches_full_decode_at_the_real_size():
  """A 960x720 rendered frame, JPEG as stored, trained at 192x144: decoding at
  1/4 scale (240x180) and resizing gives the full decode + resize's tensor within
  max 0.05 / mean 0.008 in [0,1] units (measured: max 0.028, mean 0.0040, 99th
  percentile 0.014; at 256x192 from 1/2 scale max 0.016, mean 0.0021)."""
  from tfds_record3d import synthetic
  example = next(synthetic.render_sequence(7, 1, (960, 720), (256, 192)))
  data = _jpeg(example["image"])
  for size, bounds in (((192, 144), (0.05, 0.008)), ((256, 192), (0.05, 0.008))):
    full = preprocessing.network_input(tf.io.decode_jpeg(data, channels=3), size).numpy()
    config = config_lib.Config(model_dir="unused", image_size=size, jpeg_reduced_decode=True)
    reduced = input_pipeline.resize_example(
        {"image": tf.constant(data), "depth": example["depth"]}, config)["image"].numpy()
    difference = np.abs(full - reduced)
    assert difference.max() <= bounds[0] and difference.mean() <= bounds[1], (
        size, difference.max(), difference.mean())
    # The same as network_input of the reduced decode: one resize rule.
    np.testing.assert_array_equal(reduced, preprocessing.network_input(
        input_pipeline.decode_image(tf.constant(data), size), size).numpy())
    # The default (--nojpeg_reduced_decode) decodes in full: exactly what exports see.
    default = config_lib.Config(model_dir="unused", image_size=size)
    exact = input_pipeline.resize_example(
        {"image": tf.constant(data), "depth": example["depth"]}, default)["image"].numpy()
    np.testing.assert_array_equal(exact, full)


def test_png_bytes_give_exactly_the_decoded_tensors():
  """No JPEG involved: PNG bytes through resize_example == the decoded array
  (what TFDS' own decoding handed over before), bit for bit."""
  from tfds_record3d import writers
  image = np.random.default_rng(1).integers(0, 256, (120, 90, 3), dtype=np.uint8)
  config = config_lib.Config(model_dir="unused", image_size=(32, 24))
  depth = np.ones((16, 12), np.float32)
  from_png = input_pipeline.resize_example(
      {"image": tf.constant(writers.encode_image(image, ".png")), "depth": depth}, config)
  from_array = input_pipeline.resize_example({"image": image, "depth": depth}, config)
  np.testing.assert_array_equal(from_png["image"].numpy(), from_array["image"].numpy())


@pytest.mark.parametrize("size,identical", [((64, 48), True), ((32, 24), False)])
def test_dataset_bytes_against_tfds_decoding(make_config, tmp_path, size, identical):
  """The tiny pairs dataset (64x48 JPEG): at the source size (ratio 1) the
  pipeline's tensors are TFDS' decode + resize exactly; at half size (ratio 2)
  within the reduced-decode tolerance. Depth is untouched either way."""
  config = make_config(tmp_path, image_size=size, jpeg_reduced_decode=True)
  builder = datasets.get_builder(config.dataset, config.data_dir)
  ours = input_pipeline.read_split(builder, "test", shuffle_files=False).map(
      lambda ex: input_pipeline.resize_example(ex, config))
  theirs = builder.as_dataset(split="test", shuffle_files=False).map(
      lambda ex: input_pipeline.resize_example(ex, config))
  for a, b in zip(ours.as_numpy_iterator(), theirs.as_numpy_iterator()):
    np.testing.assert_array_equal(a["depth"], b["depth"])
    if identical:
      np.testing.assert_array_equal(a["image"], b["image"])
    else:
      difference = np.abs(a["image"] - b["image"])
      assert difference.max() <= 0.1 and difference.mean() <= 0.01, difference.max()


# ---------------------------------------------------------------------------
# Caching: memory when the split fits, tf.data's file cache on disk when asked.
# ---------------------------------------------------------------------------
def _first_epoch(ds, count: int) -> list:
  """Sorted per-example (image sum, depth sum) of the first `count` batches."""
  out = []
  for batch in ds.take(count).as_numpy_iterator():
    out += [(round(float(i.sum()), 3), round(float(d.sum()), 3))
            for i, d in zip(batch["image"], batch["depth"])]
  return sorted(out)


def test_train_eval_and_disk_cache_see_the_same_tensors(make_config, tmp_path):
  # shuffle buffer 1, no augmentation: one epoch of batches = the split once.
  config = make_config(tmp_path, shuffle_buffer=1, augment=False)
  builder = datasets.get_builder(config.dataset, config.data_dir)
  batches = datasets.num_examples(builder, "train") // config.global_batch_size
  in_memory = _first_epoch(input_pipeline.train_dataset(config, "rough", builder), batches)
  # Eval decodes the same way (reduced-scale JPEG): the same tensors.
  evaluated = _first_epoch(input_pipeline.eval_dataset(config, "rough", builder, split="train"),
                           batches)
  assert evaluated == in_memory
  cache_dir = tmp_path / "cache"
  prefix = input_pipeline.disk_cache_path(str(cache_dir), builder, "train", config)
  open(prefix + "_0.lockfile", "w").close()  # as a killed run leaves it
  for run in range(2):  # run 0 writes the cache file, run 1 (a new pipeline) reads it
    ds = input_pipeline.train_dataset(config, "rough", builder, cache_dir=str(cache_dir))
    assert _first_epoch(ds, 2 * batches)[::2] == in_memory  # two epochs: each example twice
    files = sorted(f.name for f in cache_dir.iterdir())
    assert files == [prefix.split("/")[-1] + s for s in (".data-00000-of-00001", ".index")]
  # Another training size (or depth range, split...) gets its own file, never a stale one.
  other = dataclasses.replace(config, image_size=(16, 12))
  assert input_pipeline.disk_cache_path(str(cache_dir), builder, "train", other) != prefix


# ---------------------------------------------------------------------------
# First-pass cost: only the used features are read, and the cheaper forms of
# the depth resize, the flip and the per-batch target give the same tensors.
# ---------------------------------------------------------------------------
def test_read_split_parses_only_the_features_training_uses(make_config, tmp_path):
  config = make_config(tmp_path)
  builder = datasets.get_builder(config.dataset, config.data_dir)
  assert {"pose", "intrinsics", "source", "timestamp", "camera"} <= set(builder.info.features)
  spec = lambda features: input_pipeline.read_split(
      builder, "train", shuffle_files=False, features=features).element_spec
  # confidence only when something masks with it; the image as its stored bytes
  without = spec(input_pipeline.used_features(0))
  assert set(without) == {"image", "depth"}
  assert without["image"].dtype == tf.string and without["image"].shape.rank == 0
  assert set(spec(input_pipeline.used_features(1))) == {"image", "depth", "confidence"}
  assert set(spec(input_pipeline.used_features(1, image=False))) == {"depth", "confidence"}
  # a feature the dataset does not have is left out, not an error
  assert set(spec(("image", "depth", "no_such_feature"))) == {"image", "depth"}
  # what train_dataset reads (default --min_confidence=1) and the median depth
  for min_confidence, wanted in ((0, {"image", "depth"}), (1, {"image", "depth", "confidence"})):
    c = dataclasses.replace(config, min_confidence=min_confidence)
    assert set(spec(input_pipeline.used_features(c.min_confidence))) == wanted


def test_depth_resize_with_the_pipelines_mask_equals_resize_depth():
  """resize_depth_example builds its validity mask once (range, confidence) and
  hands it to resize_valid_depth: bit for bit the earlier zero-then-resize_depth."""
  rng = np.random.default_rng(3)
  depth = rng.uniform(-1.0, 12.0, (64, 48)).astype(np.float32)
  depth[rng.random(depth.shape) < 0.05] = np.nan
  depth[rng.random(depth.shape) < 0.05] = np.inf
  depth[rng.random(depth.shape) < 0.1] = 0.0
  confidence = rng.integers(0, 3, depth.shape).astype(np.uint8)
  for method in ("valid_average", "nearest"):
    for size in ((16, 12), (24, 20), (96, 72)):  # down by 4, non-integer, up
      config = config_lib.Config(model_dir="unused", image_size=size, min_depth=0.1,
                                 max_depth=10.0, depth_resize=method)
      for min_confidence in (0, 2):
        ours = input_pipeline.resize_depth_example(
            {"depth": depth, "confidence": confidence}, config, min_confidence).numpy()
        d = tf.constant(depth)[..., None]
        valid = (d > 0.1) & (d < 10.0)
        if min_confidence:
          valid &= tf.constant(confidence, tf.int32)[..., None] >= min_confidence
        expected = depth_ops_resize_reference(tf.where(valid, d, 0.0), size, method)
        np.testing.assert_array_equal(ours, expected)


def depth_ops_resize_reference(depth, size, method):
  """The earlier depth_ops.resize_depth, verbatim (mask recomputed, two resizes)."""
  depth = depth[None]
  mask = tf.cast(tf.math.is_finite(depth) & (depth > 0.0), tf.float32)
  depth = tf.where(mask > 0.0, depth, tf.zeros_like(depth))
  if method == "nearest":
    return tf.image.resize(depth, size, method="nearest")[0].numpy()
  weighted = tf.image.resize(depth, size, method="area")
  weight = tf.image.resize(mask, size, method="area")
  return tf.where(weight >= 0.5, tf.math.divide_no_nan(weighted, weight),
                  tf.zeros_like(weighted))[0].numpy()


def test_flip_moves_image_and_depth_as_a_mirror():
  rng = np.random.default_rng(4)
  image = tf.constant(rng.random((6, 5, 3)).astype(np.float32))
  depth = tf.constant(rng.random((6, 5, 1)).astype(np.float32) + 1.0)
  flipped = kept = 0
  for s in range(20):
    _, out_depth = input_pipeline.augment(image, depth, tf.constant([s, 7], tf.int64))
    if np.array_equal(out_depth, depth.numpy()[:, ::-1]):
      flipped += 1
    elif np.array_equal(out_depth, depth.numpy()):
      kept += 1
  assert flipped + kept == 20 and flipped and kept


@pytest.mark.parametrize("stage", ["gradient", "rough"])
def test_train_batches_equal_per_example_finish(make_config, tmp_path, stage):
  """train_dataset takes the target once per batch: the same batches as
  finish_example per example (augmentation on, same seeds), value for value."""
  config = make_config(tmp_path, shuffle_buffer=4, augment=True)
  builder = datasets.get_builder(config.dataset, config.data_dir)
  ours = list(input_pipeline.train_dataset(config, stage, builder).take(4).as_numpy_iterator())
  # train_dataset as it was: finish_example per example, then batch.
  read_config = input_pipeline.tfds.ReadConfig(shuffle_seed=config.seed, try_autocache=False)
  ds = input_pipeline.read_split(builder, "train", shuffle_files=True, read_config=read_config)
  ds = ds.map(lambda ex: input_pipeline.resize_example(ex, config, config.min_confidence))
  ds = ds.cache().repeat().shuffle(config.shuffle_buffer, seed=config.seed)
  ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=config.seed).batch(2))  # pipeline 0
  ds = ds.map(lambda r, seed: input_pipeline.finish_example(r, stage, True, seed))
  reference = list(ds.batch(config.global_batch_size, drop_remainder=True).take(4)
                   .as_numpy_iterator())
  assert len(ours) == len(reference) == 4
  for a, b in zip(ours, reference):
    assert list(a) == list(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
