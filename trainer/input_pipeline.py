"""tf.data input pipeline from the TFDS `record3d` dataset (or any TFDS name with
the same features: `image` uint8 [H,W,3], `depth` float32 meters [Hd,Wd], 0 invalid).

Each element after `preprocess` is a dict of float32 tensors at the training size:
  image [H,W,3] in [0,1]; depth [H,W,1] meters (0 invalid); mask [H,W,1] in {0,1};
  target [H,W,1] / target_mask [H,W,1]: depth itself, or its Sobel magnitude for the
  gradient stage (computed here, on the fly).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, TYPE_CHECKING

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

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

  Depth outside (--min_depth, --max_depth), or whose `confidence` is below
  `min_confidence`, is invalid BEFORE resizing, so it never mixes into valid
  pixels at any size (depth_ops.resize_depth).
  """
  image = preprocessing.network_input(example["image"], config.image_size)  # [H,W,3] in [0,1]

  depth = tf.cast(example["depth"], tf.float32)[..., None]  # [Hd,Wd,1]
  valid = (depth > config.min_depth) & (depth < config.max_depth)
  if min_confidence > 0 and "confidence" in example:
    valid &= tf.cast(example["confidence"], tf.int32)[..., None] >= min_confidence
  depth = tf.where(valid, depth, tf.zeros_like(depth))  # 0 = invalid from here on
  depth = depth_ops.resize_depth(depth, config.image_size, method=config.depth_resize)
  depth = tf.ensure_shape(depth, (*config.image_size, 1))
  return {"image": image, "depth": depth}


def finish_example(resized: dict, stage: str, augment_it: bool,
                   seed: Optional[tf.Tensor] = None) -> dict:
  """The per-epoch part: augmentation, mask and the stage's target."""
  image, depth = resized["image"], resized["depth"]
  if augment_it:
    image, depth = augment(image, depth, seed)
  mask = tf.cast(depth > 0, tf.float32)
  features = {"image": image, "depth": depth, "mask": mask}
  features.update(make_target(depth, mask, stage))
  return features


def augment(image: tf.Tensor, depth: tf.Tensor, seed: tf.Tensor):
  """Geometry-preserving augmentation: the flip moves depth with the image; the
  colour jitter touches only RGB (brightness is kept mild because shading is a
  depth cue)."""
  seeds = tf.random.experimental.stateless_split(seed, num=4)
  flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
  image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
  depth = tf.cond(flip, lambda: depth[:, ::-1], lambda: depth)
  image = tf.image.stateless_random_brightness(image, 0.05, seeds[1])
  image = tf.image.stateless_random_contrast(image, 0.85, 1.15, seeds[2])
  image = tf.image.stateless_random_saturation(image, 0.85, 1.15, seeds[3])
  return tf.clip_by_value(image, 0.0, 1.0), depth


def make_target(depth: tf.Tensor, mask: tf.Tensor, stage: str) -> dict:
  """The regression target: depth, or for the gradient stage its Sobel magnitude."""
  if stage == "gradient":
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


def train_dataset(config: Config, stage: str, builder: tfds.core.DatasetBuilder,
                  input_context: Optional[tf.distribute.InputContext] = None,
                  split: str = "train") -> tf.data.Dataset:
  """Infinite, shuffled, augmented, batched (drop_remainder: static shapes for TPU)."""
  read_config = tfds.ReadConfig(shuffle_seed=config.seed, try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config)
  ds = _shard(ds, input_context)
  ds = ds.map(lambda ex: resize_example(ex, config, config.min_confidence),
              num_parallel_calls=AUTOTUNE)
  # Decoding and resizing are the same every epoch: cache their output when the
  # split fits in memory at the training size, and redo only augmentation and
  # targets per epoch.
  if _cached_bytes(builder, split, config) < CACHE_LIMIT_BYTES:
    ds = ds.cache()
  ds = ds.repeat().shuffle(config.shuffle_buffer, seed=config.seed)
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  # One stateless seed per example, different on every worker and every epoch.
  seeds = tf.data.Dataset.random(seed=config.seed + 1000 * pipeline_id).batch(2)
  ds = tf.data.Dataset.zip(ds, seeds)
  ds = ds.map(lambda resized, seed: finish_example(resized, stage, config.augment, seed),
              num_parallel_calls=AUTOTUNE)
  ds = ds.batch(_per_replica_batch(config, input_context), drop_remainder=True)
  return ds.prefetch(AUTOTUNE)


CACHE_LIMIT_BYTES = 2 * 1024**3


def _cached_bytes(builder, split: str, config: Config) -> int:
  """Memory the resized split takes: float32 RGB + depth at the training size."""
  height, width = config.image_size
  return datasets.num_examples(builder, split) * height * width * 4 * 4


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
  ds = builder.as_dataset(split=split, shuffle_files=False).take(total)
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
  ds = builder.as_dataset(split="train", shuffle_files=False).take(max_examples)
  ds = ds.map(lambda ex: finish_example(resize_example(ex, config, config.min_confidence),
                                        "rough", False))
  values = [ex["depth"][ex["mask"] > 0] for ex in ds.as_numpy_iterator()]
  values = np.concatenate(values) if values else np.zeros(0)
  if not values.size:
    raise ValueError(f"{config.dataset}: the train split has no valid depth pixel")
  return float(np.median(values))
