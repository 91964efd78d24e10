"""Shared fixtures: a tiny prepared `record3d/pairs` dataset made from synthetic frames."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep test logs readable

import pytest

# Tiny on purpose: the whole suite must run in minutes on 2 CPU cores.
TINY_IMAGE_SIZE = (64, 48)  # RGB H, W written to the pairs folder
TINY_DEPTH_SIZE = (32, 24)  # depth at its own (smaller) size, like the LiDAR's
TINY_SEQUENCES = 6
TINY_FRAMES = 4


def build_tiny_pairs_dataset(root) -> tuple:
  """Writes synthetic frames as a `pairs` manual folder and builds it with TFDS.

  Returns (data_dir, manual_dir). 6 sequences of 4 frames: every split non-empty.
  """
  import tensorflow_datasets as tfds
  import tfds_record3d  # pylint: disable=unused-import  # registers record3d
  from tfds_record3d import synthetic
  from tfds_record3d import writers

  manual_dir = os.path.join(root, "manual")
  for index in range(TINY_SEQUENCES):
    examples = synthetic.render_sequence(seed=100 + index, num_frames=TINY_FRAMES,
                                         image_size=TINY_IMAGE_SIZE,
                                         depth_size=TINY_DEPTH_SIZE)
    writers.write_pairs_sequence(os.path.join(manual_dir, f"seq_{index}"), examples)
  data_dir = os.path.join(root, "tfds")
  builder = tfds.builder("record3d/pairs", data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return data_dir, manual_dir


@pytest.fixture(scope="session")
def tiny_record3d(tmp_path_factory):
  """(data_dir, manual_dir) of a prepared tiny record3d/pairs dataset."""
  return build_tiny_pairs_dataset(str(tmp_path_factory.mktemp("tiny_record3d")))
