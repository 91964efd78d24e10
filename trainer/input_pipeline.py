"""tf.data input pipeline from the TFDS `record3d` dataset (or any TFDS name with
the same features: `image` uint8 [H,W,3], `depth` float32 meters [Hd,Wd], 0 invalid).

Every split is read with `read_split`: the `image` feature arrives as its
stored bytes (TFDS' decoding skipped) and `image_input` decodes and resizes it
here: in full by default, as serving does; with --jpeg_reduced_decode a JPEG
at reduced scale (libjpeg's DCT-domain downscaling, `ratio` 1/2/4/8) when the
training size allows, anything else (PNG) fully, as TFDS would; then
preprocessing.network_input resizes. Training,
eval and the median depth all read this way, so they see the same tensors.

Each element after `preprocess` is a dict of float32 tensors at the training size:
  image [H,W,3] in [0,1]; depth [H,W,1] meters (0 invalid); mask [H,W,1] in {0,1};
  target [H,W,1] / target_mask [H,W,1]: depth itself, or its Sobel magnitude for the
  gradient stage (computed here, on the fly).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from typing import Optional, TYPE_CHECKING

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from trainer import augmentation
from trainer import datasets
from trainer import depth_ops
from trainer import preprocessing

if TYPE_CHECKING:
  from trainer.config import Config

AUTOTUNE = tf.data.AUTOTUNE


# ----------------------------------------------------------------------------
# Per-example preprocessing (pure tensor functions).
# ----------------------------------------------------------------------------
def preprocess(example: dict, config: Config, stage: str, training: bool,
               seed: Optional[tf.Tensor] = None) -> dict:
  """Decoded TFDS example -> training tensors (see module docstring). Ground
  truth is masked with --min_confidence for training, the metrics' threshold
  (--eval_min_confidence) otherwise."""
  min_confidence = config.min_confidence if training else config.eval_confidence
  return finish_example(resize_example(example, config, min_confidence), stage,
                        training and config.augment, seed)


def resize_example(example: dict, config: Config, min_confidence: int = 0) -> dict:
  """The deterministic part: {image [H,W,3] in [0,1], depth [H,W,1] meters, 0 invalid}.

  `image` may be decoded uint8 [Hs,Ws,3] (resized by network_input) or the
  stored JPEG/PNG bytes (a scalar string from `read_split`: `image_input`). Depth
  outside (--min_depth, --max_depth), or whose `confidence` is below
  `min_confidence`, is invalid BEFORE resizing, so it never mixes into valid
  pixels at any size (depth_ops.resize_depth).
  """
  image = tf.convert_to_tensor(example["image"])
  if image.dtype == tf.string:
    image = image_input(image, config.image_size, reduced=config.jpeg_reduced_decode)
  else:
    image = preprocessing.network_input(image, config.image_size)  # [H,W,3] in [0,1]
  return {"image": image, "depth": resize_depth_example(example, config, min_confidence)}


def resize_depth_example(example: dict, config: Config, min_confidence: int = 0) -> tf.Tensor:
  """Depth [Hd,Wd] -> [H,W,1] meters at the training size, 0 invalid (see resize_example)."""
  depth = tf.cast(example["depth"], tf.float32)[None, ..., None]  # [1,Hd,Wd,1]
  # NaN and +-inf fail these comparisons, so `valid` is also depth_ops'
  # valid_depth_mask (finite, > 0) once min_depth >= 0: the mask is built once
  # and handed to the resize (resize_valid_depth), not recomputed there.
  valid = (depth > config.min_depth) & (depth < config.max_depth)
  if config.min_depth < 0:
    valid &= depth > 0.0
  if min_confidence > 0 and "confidence" in example:
    valid &= tf.cast(example["confidence"], tf.int32)[None, ..., None] >= min_confidence
  depth = depth_ops.resize_valid_depth(depth, valid, config.image_size,
                                       method=config.depth_resize)[0]
  return tf.ensure_shape(depth, (*config.image_size, 1))


# ----------------------------------------------------------------------------
# Image decoding: JPEG at reduced scale, PNG (anything else) as TFDS does.
# ----------------------------------------------------------------------------
JPEG_RATIOS = (8, 4, 2, 1)  # the scales libjpeg decodes to in the DCT domain
_JPEG_MAGIC = b"\xff\xd8\xff"


def jpeg_ratio(source_size, size) -> int:
  """The largest libjpeg ratio whose output, ceil(Hs/r) x ceil(Ws/r), is still at
  least the training size (H, W) on both sides; 1 if the source is smaller."""
  for ratio in JPEG_RATIOS:
    if all(-(-s // ratio) >= t for s, t in zip(source_size, size)):
      return ratio
  return 1


def decode_image(encoded: tf.Tensor, size, reduced: bool = True) -> tf.Tensor:
  """Stored bytes (scalar string) -> uint8 [h,w,3] ready for network_input(., size).

  `reduced=False` (the trainer's default, --nojpeg_reduced_decode): JPEG decoded
  at full size like every other image, so training sees exactly what the
  exports see. Measured on the demo (64x48 from 320x240 JPEG): a finetune net
  trained on reduced-scale decodes scored abs_rel 0.095 on its own (reduced)
  eval but 0.106 served (full decode, trainer.evaluate): the network learns the
  DCT-downscaled look. `reduced=True`:
  JPEG (magic bytes FF D8 FF): decoded at 1/ratio scale with `jpeg_ratio` (so a
  960x720 frame for 192x144 training is decoded at 240x180: ~1/16 of the IDCT
  and colour conversion work, and a 16x smaller resize), then network_input's
  antialiased resize takes it to `size`; the tolerance against full decode +
  resize is measured in tests/test_input_pipeline.py. (Area averaging instead
  of that resize, session 7: as close to the full decode on average and 1.2 ms
  of CPU per example cheaper, but its nets served worse on the validation
  split, 2 seeds: README, "Decoding at the training size".) Anything else
  (PNG): `tf.io.decode_image(channels=3)`, the op TFDS' Image feature decodes
  with, so those tensors are unchanged.
  """
  if not reduced:
    return tf.ensure_shape(tf.io.decode_image(encoded, channels=3, expand_animations=False),
                           (None, None, 3))
  is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), _JPEG_MAGIC)
  image = tf.cond(is_jpeg, lambda: _decode_jpeg_reduced(encoded, size),
                  lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
  return tf.ensure_shape(image, (None, None, 3))


def image_input(encoded: tf.Tensor, size, reduced: bool = True) -> tf.Tensor:
  """Stored bytes (scalar string) -> float32 [H,W,3] in [0,1] at `size`:
  decode_image, then preprocessing.network_input (the resize serving uses)."""
  return preprocessing.network_input(decode_image(encoded, size, reduced), size)


def _decode_jpeg_reduced(encoded: tf.Tensor, size) -> tf.Tensor:
  # `ratio` is an attribute of the op (a Python int), while the source size is
  # only known per example (a pairs folder may mix sizes): read it from the
  # JPEG header ([Hs, Ws, channels], no decode), pick the ratio in the graph as
  # jpeg_ratio does, and switch between one decode op per ratio.
  source = tf.io.extract_jpeg_shape(encoded)[:2]  # int32 [2]
  fits = [tf.reduce_all((source + (ratio - 1)) // ratio >= tf.constant(size, tf.int32))
          for ratio in JPEG_RATIOS[:-1]]  # ratio 1 always "fits"
  index = tf.argmax(tf.cast(tf.stack(fits + [tf.constant(True)]), tf.int32),
                    output_type=tf.int32)  # first True: the largest ratio that fits
  branches = [functools.partial(tf.io.decode_jpeg, encoded, channels=3, ratio=ratio)
              for ratio in JPEG_RATIOS]
  return tf.switch_case(index, branches)


def finish_example(resized: dict, stage: str, augment_it: bool,
                   seed: Optional[tf.Tensor] = None) -> dict:
  """The per-epoch part: augmentation, mask and the stage's target."""
  return with_target(augmented_example(resized, augment_it, seed), stage)


def augmented_example(resized: dict, augment_it: bool, seed: Optional[tf.Tensor] = None) -> dict:
  """{image, depth, mask}: augmentation (per example: its own seed) and the mask."""
  image, depth = resized["image"], resized["depth"]
  if augment_it:
    image, depth = augment(image, depth, seed)
  return with_mask({"image": image, "depth": depth})


def with_mask(features: dict) -> dict:
  """features + mask (1 where depth is valid, > 0), per example or per batch."""
  return {**features, "mask": tf.cast(features["depth"] > 0, tf.float32)}


def finish_batch(batch: dict, stage: str) -> dict:
  """--augment_on=device, in the train step: a batch {image, depth [B,H,W,1]}
  with its draws batch[augmentation.PARAMS] [B,4] -> the training batch the
  host path makes (finish_example per example, the target per batch):
  augmentation, mask and the stage's target, all per batch here. `image` is
  either resized float32 [B,H,W,3] or, where train_dataset left the resize
  to the step (device_decode_shape), the decoded uint8 [B,h,w,3]: then
  network_input, the resize serving uses, takes it to the depth's H,W first.
  Either way the host's CPU only decodes (and resizes the depth)."""
  if batch["image"].dtype == tf.uint8:
    batch = {**batch, "image": preprocessing.network_input(batch["image"],
                                                           batch["depth"].shape[1:3])}
  return with_target(with_mask(augmentation.apply_to_batch(batch)), stage)


def with_target(features: dict, stage: str) -> dict:
  """features + the stage's target, for one example [H,W,C] or a batch [B,H,W,C]
  (train_dataset takes the Sobel once per batch: the same values, fewer ops)."""
  return {**features, **make_target(features["depth"], features["mask"], stage)}


def augment(image: tf.Tensor, depth: tf.Tensor, seed: tf.Tensor):
  """Geometry-preserving augmentation on the host, per example: the flip moves
  depth with the image; the colour jitter touches only RGB (augmentation.py)."""
  return augmentation.apply_to_example(image, depth, augmentation.draw(seed))


def make_target(depth: tf.Tensor, mask: tf.Tensor, stage: str) -> dict:
  """The regression target: depth, or for the gradient stage its Sobel magnitude."""
  if stage == "gradient":
    if depth.shape.rank == 4:  # a batch
      magnitude, magnitude_mask = depth_ops.sobel_magnitude(depth, mask)
      return {"target": magnitude, "target_mask": magnitude_mask}
    magnitude, magnitude_mask = depth_ops.sobel_magnitude(depth[None], mask[None])
    return {"target": magnitude[0], "target_mask": magnitude_mask[0]}
  return {"target": depth, "target_mask": mask}


# ----------------------------------------------------------------------------
# Datasets per replica (called by strategy.distribute_datasets_from_function).
# ----------------------------------------------------------------------------
def _shard(ds: tf.data.Dataset, input_context: Optional[tf.distribute.InputContext]):
  # Shard by example: the small Record3D splits have fewer files than workers.
  if input_context and input_context.num_input_pipelines > 1:
    ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  return ds


def _per_replica_batch(config: Config, input_context) -> int:
  if input_context is None:
    return config.global_batch_size
  return input_context.get_per_replica_batch_size(config.global_batch_size)


def used_features(min_confidence: int, image: bool = True) -> tuple:
  """The features resize_example reads: image, depth, and confidence only when
  it masks (min_confidence > 0)."""
  return (("image",) if image else ()) + ("depth",) + (
      ("confidence",) if min_confidence > 0 else ())


def device_decode_shape(config: Config, builder: tfds.core.DatasetBuilder,
                        split: str) -> Optional[tuple]:
  """With --augment_on=device: the (h, w) every image of `split` decodes to,
  when the train step can take over the image resize (finish_batch), else
  None and the host resizes as before. Measured at 960x720 JPEG -> 192x144
  (README, "Session 14"): the resize is ~1 ms of the host's ~5 ms per example.

  The step gets whole batches, so every image must decode to one shape: the
  split's statistics (info.metadata["stats"], written by the record3d
  builder) must list one image size, and the first example, decoded as
  decoded_example decodes them all (decode_image: a JPEG at reduced scale
  with --jpeg_reduced_decode), gives the shape. The memory cache then holds
  uint8 decodes instead of float32 images at the training size: when that
  would no longer fit CACHE_LIMIT_BYTES where the resized split does, the
  host resizes.
  """
  if tf.config.list_logical_devices("TPU"):
    # Never run on a TPU here; TPU infeed has refused uint8 tensors, so the
    # host keeps the resize there until that is tried.
    logging.info("image resize on the host: this process sees a TPU")
    return None
  metadata = builder.info.metadata or {}
  stats = (metadata.get("stats") or {}).get(split) or {}
  sizes = stats.get("image_sizes") or []
  if len(sizes) != 1:
    logging.info("image resize on the host: the %s split's statistics list %s image sizes "
                 "(the train step needs one)", split, len(sizes) or "no")
    return None
  first = next(iter(read_split(builder, split, shuffle_files=False, features=("image",))))
  shape = tuple(decode_image(first["image"], config.image_size,
                             reduced=config.jpeg_reduced_decode).shape[:2])
  decoded = _cached_bytes(builder, split, config, image_shape=shape)
  resized = _cached_bytes(builder, split, config)
  if decoded >= CACHE_LIMIT_BYTES > resized:
    logging.info("image resize on the host: the %s split's %dx%d decodes take %.2f GB, over "
                 "the %.2f GB memory cache that holds it resized (%.2f GB)", split, *shape,
                 decoded / 1e9, CACHE_LIMIT_BYTES / 1e9, resized / 1e9)
    return None
  logging.info("image resize in the train step: the host decodes the %s split's %dx%d images "
               "to %dx%d uint8; the step resizes them to %dx%d", split, *sizes[0], *shape,
               *config.image_size)
  return shape


def decoded_example(example: dict, config: Config, min_confidence: int, shape: tuple) -> dict:
  """--augment_on=device with device_decode_shape: {image uint8 [h,w,3] decoded
  only, depth [H,W,1] resized as resize_example does}; finish_batch resizes
  the image in the train step."""
  image = decode_image(example["image"], config.image_size, reduced=config.jpeg_reduced_decode)
  check = tf.debugging.assert_equal(
      tf.shape(image)[:2], tf.constant(shape, tf.int32),
      message=(f"an image decoded to another size than the split's first ({shape[0]}x{shape[1]}; "
               "JPEG and PNG mixed?): train with --augment_on=host"))
  with tf.control_dependencies([check]):
    image = tf.ensure_shape(tf.identity(image), (*shape, 3))
  return {"image": image, "depth": resize_depth_example(example, config, min_confidence)}


def read_split(builder: tfds.core.DatasetBuilder, split: str, shuffle_files: bool,
               read_config: Optional[tfds.ReadConfig] = None,
               features=("image", "depth", "confidence")) -> tf.data.Dataset:
  """The split's examples, only `features` (those the dataset has), with `image`
  as its stored bytes (scalar tf.string): resize_example decodes and resizes
  it (image_input; a JPEG at reduced scale with --jpeg_reduced_decode).

  Only the named features are parsed from the tf.Example and decoded
  (tfds.decode.PartialDecoding): pose, intrinsics, camera, source, timestamps
  are not, nor the zlib `confidence` map when nothing masks with it
  (used_features).
  """
  available = builder.info.features
  wanted = {name: True for name in features if name in available}
  decoders = {"image": tfds.decode.SkipDecoding()} if "image" in wanted else None
  return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                            decoders=tfds.decode.PartialDecoding(wanted, decoders=decoders))


def train_dataset(config: Config, stage: str, builder: tfds.core.DatasetBuilder,
                  input_context: Optional[tf.distribute.InputContext] = None,
                  split: str = "train", cache_dir: Optional[str] = None) -> tf.data.Dataset:
  """Infinite, shuffled, augmented, batched (drop_remainder: static shapes for TPU).

  With --augment_on resolving to device, the batches are {image, depth} and the
  draws batch[augmentation.PARAMS] [B,4]: the train step augments them and
  adds the mask and the target (finish_batch, called by
  train.make_train_loop). `image` is then the uint8 decode, resized by the
  step too, where device_decode_shape allows (one image size in the split, no
  TPU, the cache still fits), else resized here as float32.

  cache_dir: a folder (local or gs://) for a `tf.data` file cache of the
    decoded, resized split: for splits too big for memory, or to skip decoding
    in later runs (disk_cache_path); None: --cache_dir (config.cache_dir),
    else no disk cache.
  """
  if cache_dir is None:
    cache_dir = config.cache_dir
  read_config = tfds.ReadConfig(shuffle_seed=config.seed, try_autocache=False)
  ds = read_split(builder, split, shuffle_files=True, read_config=read_config,
                  features=used_features(config.min_confidence))
  ds = _shard(ds, input_context)
  on_device = config.augment and augmentation.resolve_place(config.augment_on) == "device"
  # With the augmentation in the step, the image resize can go there too.
  shape = device_decode_shape(config, builder, split) if on_device else None
  if shape:
    ds = ds.map(lambda ex: decoded_example(ex, config, config.min_confidence, shape),
                num_parallel_calls=AUTOTUNE)
  else:
    ds = ds.map(lambda ex: resize_example(ex, config, config.min_confidence),
                num_parallel_calls=AUTOTUNE)
  # Decoding and resizing are the same every epoch: keep their output (float32
  # image [H,W,3], or its uint8 decode [h,w,3], + depth [H,W,1] per example)
  # and redo only augmentation and targets per epoch. On disk when asked
  # (tf.data's file cache: written during the first epoch, read by later epochs
  # and by later runs; a first epoch cut short is discarded, not read), and in
  # memory when the split fits (after the file cache, so later epochs do not
  # read the disk).
  if cache_dir:
    ds = ds.cache(disk_cache_path(cache_dir, builder, split, config, input_context,
                                  image_shape=shape))
  if _cached_bytes(builder, split, config, image_shape=shape) < CACHE_LIMIT_BYTES:
    ds = ds.cache()
  ds = ds.repeat().shuffle(config.shuffle_buffer, seed=config.seed)
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  # One stateless seed per example, different on every worker and every epoch.
  seeds = tf.data.Dataset.random(seed=config.seed + 1000 * pipeline_id).batch(2)
  ds = tf.data.Dataset.zip(ds, seeds)

  def augmented_or_drawn(resized, seed):
    if on_device:  # only the draws [4] join the resized example: finish_batch in the step
      return {**resized, augmentation.PARAMS: augmentation.draw(seed)}
    return augmented_example(resized, config.augment, seed)

  ds = ds.map(augmented_or_drawn, num_parallel_calls=AUTOTUNE)
  ds = ds.batch(_per_replica_batch(config, input_context), drop_remainder=True)
  if not on_device:
    # The target (Sobel for the gradient stage) once per batch: finish_example's
    # values exactly (elementwise ops over 8x the pixels), ~1/8 of the op calls.
    ds = ds.map(lambda batch: with_target(batch, stage), num_parallel_calls=AUTOTUNE)
  return ds.prefetch(AUTOTUNE)


CACHE_LIMIT_BYTES = 2 * 1024**3


# Bump when decoding or resizing changes: older files on disk no longer match.
DISK_CACHE_FORMAT = 1


def disk_cache_path(cache_dir: str, builder, split: str, config: Config,
                    input_context: Optional[tf.distribute.InputContext] = None,
                    image_shape: Optional[tuple] = None) -> str:
  """The file prefix of one input pipeline's disk cache under `cache_dir`
  (image_shape: the uint8 decodes it holds, device_decode_shape; None: images
  resized on the host).

  tf.data's file cache reads whatever a finished file holds, so the name keys
  everything resize_example depends on (dataset build, split, size, depth
  range, confidence threshold, depth resize, shard, this code's format): a
  change of any of them writes a new cache instead of reading a stale one.
  A lock file left by a killed process (tf.data writes `<prefix>_0.lockfile`
  while it fills the cache and would refuse to start) is removed: each
  prefix belongs to one pipeline of one run, so a lock found before this run
  starts is stale. Two runs must not share a --cache_dir at the same time.
  """
  pipelines = input_context.num_input_pipelines if input_context else 1
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  key = {"dataset": builder.info.full_name, "data_dir": str(builder.data_dir), "split": split,
         "image_size": list(config.image_size), "min_depth": config.min_depth,
         "max_depth": config.max_depth, "min_confidence": config.min_confidence,
         "depth_resize": config.depth_resize, "shard": [pipeline_id, pipelines],
         "format": DISK_CACHE_FORMAT}
  if image_shape:  # a different layout: decoded uint8 images (older keys unchanged)
    key["decoded_image"] = list(image_shape)
  digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  height, width = config.image_size
  name = builder.info.full_name.split("/")
  prefix = os.path.join(cache_dir, f"{'_'.join(name[:2])}_{split}_{height}x{width}_{digest}")
  tf.io.gfile.makedirs(cache_dir)
  for lock in tf.io.gfile.glob(prefix + "_*.lockfile"):
    tf.io.gfile.remove(lock)
  return prefix


def _cached_bytes(builder, split: str, config: Config,
                  image_shape: Optional[tuple] = None) -> int:
  """Memory the cached split takes: float32 depth at the training size, with
  float32 RGB at that size or (image_shape (h, w)) uint8 RGB decodes."""
  height, width = config.image_size
  image = 3 * (image_shape[0] * image_shape[1] if image_shape else height * width * 4)
  return datasets.num_examples(builder, split) * (image + height * width * 4)


def eval_dataset(config: Config, stage: str, builder: tfds.core.DatasetBuilder,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 split: Optional[str] = None) -> tf.data.Dataset:
  """The whole eval split once, in order, padded to full batches.

  Padding examples have an all-zero mask, so the metrics (which average over
  images with valid pixels) ignore them: every real example counts exactly
  once and every batch has the same static shape (TPU).
  """
  split = split or config.eval_split
  total = datasets.num_examples(builder, split)
  if config.num_eval_examples:
    total = min(total, config.num_eval_examples)
  ds = read_split(builder, split, shuffle_files=False,
                  features=used_features(config.eval_confidence)).take(total)
  num_pipelines = input_context.num_input_pipelines if input_context else 1
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  ds = _shard(ds, input_context)
  ds = ds.map(lambda ex: preprocess(ex, config, stage, False), num_parallel_calls=AUTOTUNE)
  batch = _per_replica_batch(config, input_context)
  # Examples pipeline `i` gets from shard(): ceil((total - i) / n). Every pipeline
  # must yield the same number of batches, or a collective would wait forever.
  mine = max(0, math.ceil((total - pipeline_id) / num_pipelines))
  batches = max(1, math.ceil(math.ceil(total / num_pipelines) / batch))
  padding = batches * batch - mine
  if padding:
    ds = ds.concatenate(tf.data.Dataset.from_tensors(_padding_example(config)).repeat(padding))
  ds = ds.batch(batch, drop_remainder=True)
  return ds.prefetch(AUTOTUNE)


def _padding_example(config: Config) -> dict:
  height, width = config.image_size
  zeros = lambda c: tf.zeros((height, width, c), tf.float32)
  return {"image": zeros(3), "depth": zeros(1), "mask": zeros(1),
          "target": zeros(1), "target_mask": zeros(1)}


@functools.lru_cache(maxsize=8)
def training_median_depth(config: Config, builder, max_examples: int = 300) -> float:
  """Median of valid training depth (m) at the training size, over the split's
  first `max_examples` (in file order, so every worker gets the same value).
  The constant baseline predicts it; fresh depth networks start their output at
  it. Cached: `--stage=all` needs it for both (config is a frozen dataclass)."""
  # Depth only: the image bytes are never decoded here.
  ds = read_split(builder, "train", shuffle_files=False,
                  features=used_features(config.min_confidence, image=False)).take(max_examples)
  ds = ds.map(lambda ex: resize_depth_example(ex, config, config.min_confidence))
  values = [depth[depth > 0] for depth in ds.as_numpy_iterator()]
  values = np.concatenate(values) if values else np.zeros(0)
  if not values.size:
    raise ValueError(f"{config.dataset}: the train split has no valid depth pixel")
  return float(np.median(values))
