"""TFDS builder tests for record3d: one DatasetBuilderTestCase per config."""

import tensorflow_datasets as tfds

import tfds_record3d
from tfds_record3d.record3d import record3d_dataset_builder as builder_module

DUMMY = builder_module.Builder.code_path.parent / "dummy_data"

# A tiny synthetic variant (custom configs need their own name): 3 sequences of
# 3 frames, so each split holds exactly one sequence.
TINY_SYNTHETIC = tfds_record3d.Record3dConfig(
    name="synthetic_tiny", num_frames=9, image_size=(32, 24), depth_size=(16, 12))


class SyntheticTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = builder_module.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = [TINY_SYNTHETIC]
  SPLITS = {"train": 3, "validation": 3, "test": 3}


class PairsTest(tfds.testing.DatasetBuilderTestCase):
  """dummy_data/pairs: 4 sequences x 3 frames (PNG mm, X/Y at 5000/m, .npy, .exr)."""
  DATASET_CLASS = builder_module.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["pairs"]
  EXAMPLE_DIR = DUMMY / "pairs"
  SPLITS = {"train": 6, "validation": 3, "test": 3}


class R3dTest(tfds.testing.DatasetBuilderTestCase):
  """dummy_data/r3d: 3 .r3d files x 3 frames, one without confidence."""
  DATASET_CLASS = builder_module.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ["r3d"]
  EXAMPLE_DIR = DUMMY / "r3d"
  SPLITS = {"train": 3, "validation": 3, "test": 3}


if __name__ == "__main__":
  tfds.testing.test_main()
