"""Bad manual input: one error listing every offending file, nothing written."""

import lzfse
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tfds_record3d  # registers record3d
from tfds_record3d import writers

def test_pairs_missing_partner(tmp_path, bad_input):
  manual = bad_input.pairs_dir(tmp_path / "m")
  (manual / "seq1/depth/000001.png").unlink()
  bad_input.expect_error("pairs", manual, tmp_path / "d", manual / "seq1/rgb/000001.jpg", "missing partner")


def test_pairs_truncated_image(tmp_path, bad_input):
  manual = bad_input.pairs_dir(tmp_path / "m")
  jpg = manual / "seq0/rgb/000002.jpg"
  jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 3])
  bad_input.expect_error("pairs", manual, tmp_path / "d", jpg, "truncated")


def test_pairs_8bit_png_depth_is_wrong_dtype(tmp_path, bad_input):
  manual = bad_input.pairs_dir(tmp_path / "m")
  png = manual / "seq2/depth/000000.png"
  Image.fromarray(np.zeros(bad_input.DEPTH_SIZE, np.uint8)).save(png)
  bad_input.expect_error("pairs", manual, tmp_path / "d", png, "16-bit")


def test_pairs_float64_npy_depth_is_wrong_dtype(tmp_path, bad_input):
  manual = tmp_path / "m"
  for i in range(3):
    writers.write_pairs_sequence(manual / f"s{i}", bad_input.frames(30 + i), depth_suffix=".npy")
  npy = manual / "s1/depth/000001.npy"
  np.save(npy, np.ones(bad_input.DEPTH_SIZE, np.float64))
  bad_input.expect_error("pairs", manual, tmp_path / "d", npy, "float64")


def test_pairs_aspect_ratio_mismatch(tmp_path, bad_input):
  manual = bad_input.pairs_dir(tmp_path / "m")
  Image.fromarray(np.full((16, 16), 1000, np.uint16)).save(manual / "seq0/depth/000001.png")
  bad_input.expect_error("pairs", manual, tmp_path / "d", manual / "seq0/rgb/000001.jpg", "aspect ratio")


@pytest.mark.parametrize("config", ["pairs", "r3d"])
def test_empty_and_absent_manual_dir(tmp_path, config, bad_input):
  empty = tmp_path / "empty"
  empty.mkdir()
  bad_input.expect_error(config, empty, tmp_path / "d", empty, "empty")
  absent = tmp_path / "absent"
  bad_input.expect_error(config, absent, tmp_path / "d", absent, "does not exist")


def test_r3d_without_metadata(tmp_path, bad_input):
  manual = bad_input.r3d_dir(tmp_path / "m", sequences=2)
  writers.write_r3d(manual / "broken.r3d", bad_input.frames(40), write_metadata=False)
  bad_input.expect_error("r3d", manual, tmp_path / "d", manual / "broken.r3d", "metadata")


def test_r3d_depth_with_wrong_byte_length_and_missing_partner(tmp_path, bad_input):
  manual = bad_input.r3d_dir(tmp_path / "m")
  short = np.zeros(bad_input.DEPTH_SIZE[0] * bad_input.DEPTH_SIZE[1] - 5, "<f4").tobytes()
  bad_input.rewrite_zip(manual / "cap0.r3d", replace={"rgbd/1.depth": lzfse.compress(short)})
  bad_input.rewrite_zip(manual / "cap2.r3d", drop=("rgbd/2.jpg",))
  error = bad_input.expect_error(
      "r3d", manual, tmp_path / "d",
      f"{manual / 'cap0.r3d'}:rgbd/1.depth", "expected 768",
      f"{manual / 'cap2.r3d'}:rgbd/2.depth", "missing partner")
  assert len(error.problems) == 2


def test_all_problems_are_reported_at_once(tmp_path, bad_input):
  manual = bad_input.pairs_dir(tmp_path / "m")
  (manual / "seq0/depth/000000.png").unlink()
  (manual / "seq2/rgb/000001.jpg").write_bytes(b"not a jpeg")
  error = bad_input.expect_error("pairs", manual, tmp_path / "d",
                        manual / "seq0/rgb/000000.jpg", manual / "seq2/rgb/000001.jpg")
  assert len(error.problems) == 2


def test_failed_rebuild_keeps_prepared_dataset(tmp_path, bad_input):
  manual, data_dir = bad_input.pairs_dir(tmp_path / "m"), tmp_path / "d"
  bad_input.build("pairs", manual, data_dir)
  before = sorted((data_dir / "record3d").rglob("*"))
  (manual / "seq1/depth/000002.png").write_bytes(b"garbage")
  with pytest.raises(tfds_record3d.ManualInputError, match="000002.png"):
    # Overwriting would make TFDS delete the prepared copy before generating.
    bad_input.build("pairs", manual, data_dir, mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD)
  assert sorted((data_dir / "record3d").rglob("*")) == before
  examples = tfds.load("record3d/pairs", data_dir=str(data_dir), split="all")
  assert len(list(examples)) == 9


def test_captures_are_checked_in_parallel_and_problems_keep_their_order():
  """validation.check_each: threads finish in any order (the first item here
  finishes last), results and problems come back in the items' order, and a
  check that crashes is raised, not swallowed."""
  import threading
  import time
  from tfds_record3d import validation
  running = threading.Semaphore(0)

  def check(item, found):
    if item != 0:
      running.release()
    else:  # waits until every other check has run: finishes last
      for _ in range(3):
        assert running.acquire(timeout=10)
      time.sleep(0.05)
    found.append(validation.Problem(f"file{item}", "bad"))
    return item * 10

  problems = [validation.Problem("earlier", "kept first")]
  assert validation.check_each([0, 1, 2, 3], check, "captures", problems, workers=4) == [
      0, 10, 20, 30]
  assert [p.path for p in problems] == ["earlier", "file0", "file1", "file2", "file3"]

  def crash(item, found):
    raise OSError(f"cannot read {item}")
  with pytest.raises(OSError, match="cannot read 0"):  # the first item's, as in a loop
    validation.check_each([0, 1], crash, "captures", [], workers=2)
