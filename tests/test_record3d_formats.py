"""Input formats: writers -> readers round trips, pairing modes, defaults."""

import json

import numpy as np
import pytest
from etils import epath

from tfds_record3d import intrinsics as intrinsics_lib
from tfds_record3d import pairs_format
from tfds_record3d import r3d_format
from tfds_record3d import synthetic
from tfds_record3d import writers

IMAGE_SIZE, DEPTH_SIZE = (80, 60), (32, 24)


@pytest.mark.parametrize("suffix,scale,tolerance", [
    (".png", 1000.0, 5e-4), (".png", 5000.0, 1e-4), (".npy", 1.0, 0), (".exr", 1.0, 0)])
def test_pairs_round_trip(tmp_path, suffix, scale, tolerance):
  frames = list(synthetic.render_sequence(8, 2, IMAGE_SIZE, DEPTH_SIZE))
  frames[0]["depth"][0, :3] = 0.0  # invalid pixels must stay invalid
  writers.write_pairs_sequence(tmp_path / "m" / "seq", frames, depth_suffix=suffix,
                               depth_scale=scale, rgb_dir="X", depth_dir="Y")
  (sequence,), problems = pairs_format.scan(epath.Path(tmp_path / "m"))
  assert not problems
  read = list(sequence.read_frames(range(2)))
  for original, example in zip(frames, read):
    np.testing.assert_allclose(example["depth"], original["depth"], atol=tolerance)
    np.testing.assert_array_equal(example["confidence"], original["confidence"])
    np.testing.assert_allclose(example["intrinsics"], original["intrinsics"])
    assert np.abs(example["image"].astype(int) - original["image"]).mean() < 8  # JPEG
  assert (read[0]["depth"][0, :3] == 0).all()


def test_pairs_default_intrinsics_and_saturated_depth(tmp_path):
  frames = list(synthetic.render_sequence(9, 1, IMAGE_SIZE, DEPTH_SIZE))
  frames[0]["depth"][1, 1] = 70.0  # 70 m at 1000/m saturates uint16: invalid
  writers.write_pairs_sequence(tmp_path / "rgbd", frames, write_manifest=False)
  (sequence,), problems = pairs_format.scan(epath.Path(tmp_path / "rgbd"))  # rgb/ in M
  example = next(sequence.read_frames([0]))
  assert not problems and sequence.name == "rgbd"
  assert example["depth"][1, 1] == 0
  np.testing.assert_allclose(example["intrinsics"], intrinsics_lib.default_intrinsics(*IMAGE_SIZE))


def test_r3d_round_trip(tmp_path):
  frames = list(synthetic.render_sequence(12, 3, IMAGE_SIZE, DEPTH_SIZE))
  frames[1]["depth"][2, 2] = np.nan  # NaN is invalid in .r3d exports
  path = writers.write_r3d(tmp_path / "walk.r3d", frames)
  (sequence,), problems = r3d_format.scan(epath.Path(tmp_path))
  assert not problems and sequence.name == "walk"
  assert sequence.metadata["dh"] == DEPTH_SIZE[0] and sequence.metadata["w"] == IMAGE_SIZE[1]
  for original, example in zip(frames, sequence.read_frames(range(3))):
    expected = np.nan_to_num(original["depth"], nan=0.0)
    np.testing.assert_array_equal(example["depth"], expected)
    np.testing.assert_array_equal(example["confidence"], original["confidence"])
    np.testing.assert_allclose(example["intrinsics"], original["intrinsics"], rtol=1e-6)
    assert example["frame"] == original["frame"]
  assert path.exists()


def _timestamped_sequence(folder, frames, depth_offset_s):
  """TUM-like: RGB and depth stems are timestamps that differ slightly."""
  writers.write_pairs_sequence(folder, frames, stem_format="{frame}", write_confidence=False,
                               depth_scale=5000.0)
  for sub, offset in (("rgb", 0.0), ("depth", depth_offset_s)):
    for path in sorted((folder / sub).iterdir()):
      stamp = 1305031102.0 + int(path.stem) / 30 + offset
      path.rename(path.with_name(f"{stamp:.6f}{path.suffix}"))


def test_pairs_by_timestamp_matches_within_20_ms(tmp_path):
  frames = list(synthetic.render_sequence(13, 3, IMAGE_SIZE, DEPTH_SIZE))
  folder = epath.Path(tmp_path / "tum")
  _timestamped_sequence(folder, frames, depth_offset_s=0.011)
  manifest = json.loads((folder / "depth2d.json").read_text())
  assert manifest["depth_scale"] == 5000.0
  # Stems differ: the default (stem) pairing reports every file.
  _, problems = pairs_format.scan(folder)
  assert len(problems) == 6 and all("missing partner" in p.reason for p in problems)
  manifest["pair_by"] = "timestamp"
  (folder / "depth2d.json").write_text(json.dumps(manifest))
  (sequence,), problems = pairs_format.scan(folder)
  assert not problems and len(sequence.frames) == 3
  for original, example in zip(frames, sequence.read_frames(range(3))):
    np.testing.assert_allclose(example["depth"], original["depth"], atol=1e-4)


def test_pairs_by_order_needs_equal_counts(tmp_path):
  frames = list(synthetic.render_sequence(14, 3, IMAGE_SIZE, DEPTH_SIZE))
  folder = epath.Path(tmp_path / "seed")
  writers.write_pairs_sequence(folder, frames, rgb_dir="X", depth_dir="Y")
  for path in (folder / "Y").iterdir():  # the seed's names differ between X and Y
    path.rename(path.with_name("depth_" + path.name))
  (folder / "depth2d.json").write_text(json.dumps({"pair_by": "order"}))
  (sequence,), problems = pairs_format.scan(folder)
  assert not problems
  assert [f.depth.name for f in sequence.frames] == [f"depth_00000{i}.png" for i in range(3)]
  (folder / "Y" / "depth_000002.png").unlink()
  _, problems = pairs_format.scan(folder)
  assert len(problems) == 1 and "as many depth files (2)" in problems[0].reason
