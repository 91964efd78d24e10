"""SavedModel export: uint8 images of any size in, depth in meters at that size out.

`serving_default(images: uint8 [B,H,W,3]) -> {"depth": float32 [B,H,W]}`. The
network runs at the training size (the input is resized to it and the depth
resized back), so callers never have to know it. A finetune export contains
the gradient network: one call runs the whole chain.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from absl import logging
import keras
import tensorflow as tf

from trainer import preprocessing
from trainer import tflite_export
from trainer import train
from trainer import workdir

if TYPE_CHECKING:
  from trainer.config import Config


class DepthServingModule(tf.Module):
  """What the SavedModel holds: the float32 network and its training size."""

  def __init__(self, network: keras.Model, image_size, max_depth: float):
    super().__init__()
    self.network = network
    self.image_size = tuple(int(v) for v in image_size)
    self.max_depth = max_depth

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  def serve(self, images):
    return {"depth": self.predict_depth(images)}

  def predict_depth(self, images):
    """uint8 [B,H,W,3] -> float32 [B,H,W] meters."""
    size = tf.shape(images)[1:3]
    x = preprocessing.network_input(images, self.image_size)  # as in training
    depth = tf.cast(self.network(x, training=False), tf.float32)
    depth = tf.image.resize(depth, size, method="bilinear")  # [B,H,W,1]
    # The training targets never exceed max_depth; say so rather than extrapolate.
    return tf.clip_by_value(depth[..., 0], 0.0, self.max_depth)


def float32_copy(config: Config, stage: str, trained: keras.Model) -> keras.Model:
  """The trained network rebuilt under a float32 policy with the same weights.

  Serving (mostly on CPUs) gains nothing from a float16 graph, and a float32
  SavedModel runs everywhere.
  """
  previous = keras.mixed_precision.global_policy().name
  keras.mixed_precision.set_global_policy("float32")
  try:
    network = train.stage_network(config, stage)  # no weights loaded: they are copied
  finally:
    keras.mixed_precision.set_global_policy(previous)
  network.set_weights(trained.get_weights())
  return network


def export_saved_model(config: Config, stage: str, trained: keras.Model, export_dir: str) -> str:
  """Writes the SavedModel (+ depth2d.json describing it) and returns its path."""
  if stage == "gradient":
    raise ValueError("the gradient stage predicts edges, not depth: export rough or finetune")
  module = DepthServingModule(float32_copy(config, stage, trained), config.image_size,
                              config.max_depth)
  if tf.io.gfile.exists(export_dir):
    tf.io.gfile.rmtree(export_dir)  # a stale export must not mix with the new one
  tf.saved_model.save(module, export_dir, signatures={"serving_default": module.serve})
  with tf.io.gfile.GFile(f"{export_dir}/depth2d.json", "w") as f:
    json.dump({"stage": stage, "architecture": config.architecture,
               "image_size": list(config.image_size), "dataset": config.dataset,
               "max_depth": config.max_depth}, f, indent=2)
  logging.info("exported %s (%s) to %s", stage, config.architecture, export_dir)
  return export_dir


def copy_export(source_dir: str, export_dir: str) -> str:
  """The SavedModel in `source_dir` (+ its depth2d.json), copied file by file to
  `export_dir` (local or gs://): the chain's export IS its stage's export,
  and the network is not traced a second time."""
  if tf.io.gfile.exists(export_dir):
    tf.io.gfile.rmtree(export_dir)  # a stale export must not mix with the copy
  workdir.copy_tree(source_dir, export_dir)
  logging.info("copied the export %s to %s", source_dir, export_dir)
  return export_dir


def calibration_images(builder, count: int):
  """The first `count` training images, uint8 [H, W, 3] as stored: what the phone
  gives the TFLite file, which preprocesses them itself (in file order: the
  same images on every run)."""
  ds = builder.as_dataset(split="train", shuffle_files=False).take(count)
  for example in ds.as_numpy_iterator():
    yield example["image"]


def export_tflite(config: Config, stage: str, trained: keras.Model, builder,
                  export_dir: str) -> dict:
  """--tflite: export_dir/depth_<precision>.tflite of the float32 network."""
  return tflite_export.export_tflite(
      float32_copy(config, stage, trained), config.image_size, config.max_depth, export_dir,
      config.tflite, config.tflite_input_size,
      calibration_images(builder, config.tflite_calibration_examples)
      if "int8" in config.tflite else None)
