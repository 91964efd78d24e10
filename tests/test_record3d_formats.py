"""Input formats: writers -> readers round trips, pairing modes, defaults."""

import json
import zipfile

import numpy as np
import pytest
from etils import epath

from tfds_record3d import decoding
from tfds_record3d import intrinsics as intrinsics_lib
from tfds_record3d import pairs_format
from tfds_record3d import poses as poses_lib
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
    rgb_file = tmp_path / "m" / "seq" / "X" / f"{original['frame']:06d}.jpg"
    assert example["image"] == rgb_file.read_bytes()  # the source's JPEG, unchanged
    image = decoding.decode_rgb(example["image"])
    assert np.abs(image.astype(int) - original["image"]).mean() < 8  # JPEG
    assert example["source"] == f"seq/X/{original['frame']:06d}.jpg"
    assert example["timestamp"] == -1 and example["camera"] == "unknown"
    np.testing.assert_array_equal(example["pose"], np.eye(4))
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


# Poses of a short walk: turning about y while moving along x (qx,qy,qz,qw,tx,ty,tz).
def _walk_poses(n):
  rows = []
  for i in range(n):
    angle = 0.3 * i
    rows.append([0.0, np.sin(angle / 2), 0.0, np.cos(angle / 2), 0.5 * i, 1.4, -0.2 * i])
  return rows


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_r3d_round_trip(tmp_path, compression):
  frames = list(synthetic.render_sequence(12, 3, IMAGE_SIZE, DEPTH_SIZE))
  frames[1]["depth"][2, 2] = np.nan  # NaN is invalid in .r3d exports
  poses, stamps = _walk_poses(3), [1042.25, 1042.2833, 1042.3167]
  path = writers.write_r3d(tmp_path / "walk.r3d", frames, poses=poses, timestamps=stamps,
                           compression=compression)
  (sequence,), problems = r3d_format.scan(epath.Path(tmp_path))
  assert not problems and sequence.name == "walk"
  assert sequence.metadata["dh"] == DEPTH_SIZE[0] and sequence.metadata["w"] == IMAGE_SIZE[1]
  with zipfile.ZipFile(path) as archive:
    jpegs = [archive.read(f"rgbd/{i}.jpg") for i in range(3)]
  for i, (original, example) in enumerate(zip(frames, sequence.read_frames(range(3)))):
    expected = np.nan_to_num(original["depth"], nan=0.0)
    np.testing.assert_array_equal(example["depth"], expected)
    np.testing.assert_array_equal(example["confidence"], original["confidence"])
    np.testing.assert_allclose(example["intrinsics"], original["intrinsics"], rtol=1e-6)
    assert example["frame"] == original["frame"] == i
    assert example["image"] == jpegs[i]  # the member's JPEG bytes, unchanged
    assert example["source"] == f"walk.r3d:rgbd/{i}.jpg"
    assert example["timestamp"] == stamps[i] and example["camera"] == "lidar"
    np.testing.assert_allclose(example["pose"], poses_lib.pose_matrix(*poses[i]))
    assert example["pose"][0, 3] == 0.5 * i and example["pose"][2, 3] == np.float32(-0.2 * i)
  # One frame alone (a Beam element) reads the same as the sequential pass.
  alone = sequence.frame_task(2).read()
  np.testing.assert_array_equal(alone["depth"], np.nan_to_num(frames[2]["depth"], nan=0.0))
  assert alone["image"] == jpegs[2]


def test_r3d_camera_and_missing_poses(tmp_path):
  frames = list(synthetic.render_sequence(15, 2, IMAGE_SIZE, DEPTH_SIZE))
  writers.write_r3d(tmp_path / "front.r3d", frames, camera_type=0, poses=[], timestamps=[])
  writers.write_r3d(tmp_path / "odd.r3d", frames, camera_type=7)
  (front, odd), problems = r3d_format.scan(epath.Path(tmp_path))
  assert not problems
  example = next(front.read_frames([1]))
  assert example["camera"] == "truedepth" and example["timestamp"] == -1
  np.testing.assert_array_equal(example["pose"], np.eye(4))  # poses: [] -> identity
  assert next(odd.read_frames([0]))["camera"] == "unknown"


def test_r3d_poses_count_must_match_frames(tmp_path):
  frames = list(synthetic.render_sequence(16, 3, IMAGE_SIZE, DEPTH_SIZE))
  writers.write_r3d(tmp_path / "short.r3d", frames, poses=_walk_poses(2))
  writers.write_r3d(tmp_path / "stamps.r3d", frames, timestamps=[0.0] * 4)
  writers.write_r3d(tmp_path / "bad_q.r3d", frames, poses=[[0, 0, 0, 2.0, 0, 0, 0]] * 3)
  sequences, problems = r3d_format.scan(epath.Path(tmp_path))
  assert not sequences
  messages = sorted(str(p) for p in problems)
  assert len(messages) == 3, messages
  assert "bad_q.r3d:metadata: invalid poses (poses[0]" in messages[0]
  assert "short.r3d:metadata: poses has 2 rows for 3 frames rgbd/0..2" in messages[1]
  assert "stamps.r3d:metadata: frameTimestamps has 4 rows for 3 frames" in messages[2]


def test_stored_rgb_keeps_jpeg_and_8bit_png_and_reduces_16bit_png():
  image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  jpeg, png = writers.encode_image(image, ".jpg"), writers.encode_image(image, ".png")
  assert decoding.stored_rgb(jpeg) is jpeg and decoding.stored_rgb(png) is png
  assert decoding.header_size(jpeg) == (4, 6)
  # A 48-bit RGB PNG (PIL cannot write one; TF can).
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  wide = tf.io.encode_png(tf.constant(image.astype(np.uint16) * 257)).numpy()
  assert wide[24] == 16  # the IHDR bit depth the check reads
  stored = decoding.stored_rgb(wide)
  assert stored != wide and stored[24] == 8
  np.testing.assert_array_equal(decoding.decode_rgb(stored), decoding.decode_rgb(wide))


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
  rgb_names = sorted(p.name for p in (folder / "rgb").iterdir())
  for original, example, name in zip(frames, sequence.read_frames(range(3)), rgb_names):
    np.testing.assert_allclose(example["depth"], original["depth"], atol=1e-4)
    # TUM names are the timestamps: float64 keeps their microseconds.
    assert example["timestamp"] == float(name[:-len(".jpg")]) >= 1305031102.0
    assert example["source"] == f"rgb/{name}" and example["frame"] == original["frame"]
  assert read_stamps(sequence)[1] == 1305031102.033333  # 1/30 s later, to the microsecond


def test_pairs_decimal_stems_are_timestamps_digit_stems_are_frames(tmp_path):
  frames = list(synthetic.render_sequence(17, 2, IMAGE_SIZE, DEPTH_SIZE))
  writers.write_pairs_sequence(tmp_path / "m" / "digits", frames, stem_format="{frame:04d}")
  writers.write_pairs_sequence(tmp_path / "m" / "tum", frames,
                               stem_format="1305031102.{frame:06d}")
  digits, tum = pairs_format.scan(epath.Path(tmp_path / "m"))[0]
  first = next(digits.read_frames([1]))
  assert (first["frame"], first["timestamp"], first["source"]) == (1, -1, "digits/rgb/0001.jpg")
  second = next(tum.read_frames([1]))
  assert second["frame"] == 1 and second["timestamp"] == 1305031102.000001


def read_stamps(sequence):
  return [example["timestamp"] for example in sequence.read_frames(range(len(sequence.frames)))]


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
