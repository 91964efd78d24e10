"""TFDS builder tests for record3d: one DatasetBuilderTestCase per config."""

import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_record3d
from tfds_record3d.frame_example import CAMERAS
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


def test_stored_rgb_is_the_source_files_bytes_and_provenance_is_filled(tmp_path):
  """JPEG (and PNG) RGB is stored bit-identical to the source file; provenance."""
  data_dir = str(tmp_path / "data")
  for config, manual in (("pairs", DUMMY / "pairs"), ("r3d", DUMMY / "r3d")):
    builder = tfds.builder(f"record3d/{config}", data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual)))
    assert builder.info.features["image"].encoding_format is None  # JPEG or PNG, as given
    seen = 0
    for split in ("train", "validation", "test"):
      dataset = builder.as_dataset(split=split,
                                   decoders={"image": tfds.decode.SkipDecoding()})
      for example in tfds.as_numpy(dataset):
        source = example["source"].decode()
        if config == "pairs":
          original = (manual / source).read_bytes()
          assert example["timestamp"] == -1 and example["camera"] == 2  # "unknown"
        else:
          name, member = source.split(":")
          with zipfile.ZipFile(manual / name) as archive:
            original = archive.read(member)
          assert member == f"rgbd/{example['frame']}.jpg"
          assert example["timestamp"] == pytest.approx(example["frame"] / 30)  # writer's i/fps
          assert CAMERAS[example["camera"]] == (
              "truedepth" if name == "truedepth.r3d" else "lidar")
        assert example["image"] == original, source  # no decode + re-encode
        np.testing.assert_array_equal(example["pose"], np.eye(4, dtype=np.float32))
        seen += 1
    assert seen == (12 if config == "pairs" else 9)


if __name__ == "__main__":
  tfds.testing.test_main()
