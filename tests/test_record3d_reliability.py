"""Nothing lost, nothing stale, nothing accepted silently (issue 13, dataset side).

A prepared build survives every failed rebuild (the `tfds build` CLI with
--overwrite, the Python API, the trainer's build); builds record their
provenance and a stale one is refused; inputs that decode but are wrong
(confidence, duplicate stems, no valid depth, wrong scale) are reported.
"""

import json
import logging
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import app
from PIL import Image

import tfds_record3d  # registers record3d
from tfds_record3d import pairs_format
from tfds_record3d import provenance
from tfds_record3d import writers
from trainer import datasets

# The bad-input tests' helpers: tiny frames, a 3-sequence pairs folder, a
# build, and "raises listing these fragments, wrote nothing".

FORCE = tfds.download.GenerateMode.FORCE_REDOWNLOAD


def _snapshot(data_dir):
  """Every file of the pairs build with its size and mtime: any change shows.
  (TFDS rewrites record3d/.config, the default config's name, on every build.)"""
  return sorted((str(p.relative_to(data_dir)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in (data_dir / "record3d/pairs").rglob("*") if p.is_file())


def _count(data_dir, config="pairs"):
  return len(list(tfds.load(f"record3d/{config}", data_dir=str(data_dir), split="all")))


@pytest.fixture
def prepared(tmp_path, bad_input):
  """(manual_dir, data_dir) of a good pairs build: 3 sequences x 3 frames."""
  manual, data_dir = bad_input.pairs_dir(tmp_path / "m"), tmp_path / "d"
  bad_input.build("pairs", manual, data_dir)
  return manual, data_dir


# --- 1. A prepared build survives every failed rebuild ------------------------

@pytest.mark.slow  # a subprocess: TF start-up
def test_cli_overwrite_with_bad_input_keeps_build_and_prints_no_traceback(
    prepared, tmp_path, bad_input):
  manual, data_dir = prepared
  before = _snapshot(data_dir)
  bad = bad_input.pairs_dir(tmp_path / "bad")
  (bad / "seq1/rgb/000002.jpg").write_bytes(b"")
  # The real command line: it deletes the prepared folder right after making
  # the builder, unless the builder's __init__ refuses the input first.
  result = subprocess.run(
      [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main", "build", "record3d",
       "--imports", "tfds_record3d", "--config", "pairs", "--manual_dir", str(bad),
       "--data_dir", str(data_dir), "--overwrite"],
      capture_output=True, text=True, timeout=600, check=False)
  output = result.stdout + result.stderr
  assert result.returncode == 1, output
  assert _snapshot(data_dir) == before
  assert _count(data_dir) == 9
  assert f"{bad / 'seq1/rgb/000002.jpg'}: empty image file (0 bytes)" in output
  assert "Traceback" not in output  # absl prints a UsageError without one


def test_python_api_rebuild_failing_midway_restores_build(prepared, monkeypatch, bad_input):
  manual, data_dir = prepared
  before = _snapshot(data_dir)

  def broken_read(self, positions):  # valid input, but the rebuild dies while writing
    raise OSError("disk full (simulated)")
    yield  # pylint: disable=unreachable

  monkeypatch.setattr(pairs_format.PairsSequence, "read_frames", broken_read)
  with pytest.raises(OSError, match="disk full"):
    bad_input.build("pairs", manual, data_dir, mode=FORCE)
  assert _snapshot(data_dir) == before
  monkeypatch.undo()
  assert _count(data_dir) == 9


def test_rebuild_leaving_a_split_empty_is_refused_before_deleting(prepared, tmp_path, bad_input):
  _, data_dir = prepared
  before = _snapshot(data_dir)
  tiny = tmp_path / "tiny"
  writers.write_pairs_sequence(tiny / "only", bad_input.frames(50, n=2))
  with pytest.raises(tfds_record3d.ManualInputError, match="empty; need 3"):
    bad_input.build("pairs", tiny, data_dir, mode=FORCE)
  assert _snapshot(data_dir) == before


# --- 2. Provenance, reuse and stale builds (trainer/datasets) ------------------

def test_build_records_provenance(prepared):
  manual, data_dir = prepared
  recorded = tfds.builder("record3d/pairs", data_dir=str(data_dir)).info.metadata["provenance"]
  assert recorded["manual_dir"] == str(manual.resolve())
  assert recorded["fingerprint"] == provenance.fingerprint(manual)
  assert recorded["fingerprint"]["files"] == 3 * (3 * 3 + 1)  # rgb, depth, conf + manifest
  assert recorded["built_at"].startswith("20")


def test_reuse_is_logged_and_a_stale_build_is_refused(prepared, caplog, bad_input):
  manual, data_dir = prepared
  with caplog.at_level(logging.INFO, logger="absl"):
    datasets.prepare_dataset("record3d/pairs", str(data_dir), str(manual), may_build=True)
  assert f"Using the prepared record3d/pairs in {data_dir}" in caplog.text
  assert f"from {manual.resolve()}" in caplog.text

  writers.write_pairs_sequence(manual / "seq9", bad_input.frames(99))  # a new capture
  with pytest.raises(datasets.DatasetError, match="--rebuild_dataset") as error:
    datasets.prepare_dataset("record3d/pairs", str(data_dir), str(manual), may_build=True)
  assert "no longer matches" in str(error.value) and "40 files" in str(error.value)
  # Without --manual_dir the existing build is used as it is.
  builder = datasets.prepare_dataset("record3d/pairs", str(data_dir), None, may_build=True)
  assert sum(s.num_examples for s in builder.info.splits.values()) == 9


def test_rebuild_replaces_on_good_input_and_keeps_on_bad(prepared, bad_input):
  manual, data_dir = prepared
  before = _snapshot(data_dir)
  (manual / "seq1/confidence/000000.png").write_bytes(
      writers.encode_image_gray(np.full(bad_input.DEPTH_SIZE, 255, np.uint8)))
  with pytest.raises(tfds_record3d.ManualInputError, match="found 255"):
    datasets.prepare_dataset("record3d/pairs", str(data_dir), str(manual), may_build=True,
                             rebuild=True)
  assert _snapshot(data_dir) == before

  (manual / "seq1/confidence/000000.png").unlink()
  writers.write_pairs_sequence(manual / "seq3", bad_input.frames(13))
  builder = datasets.prepare_dataset("record3d/pairs", str(data_dir), str(manual),
                                     may_build=True, rebuild=True)
  assert sum(s.num_examples for s in builder.info.splits.values()) == 12
  assert builder.info.metadata["provenance"]["fingerprint"] == provenance.fingerprint(manual)
  assert not list(data_dir.rglob(".*previous"))  # the old build is gone once replaced
  # The new build matches the folder: reused without complaint.
  datasets.prepare_dataset("record3d/pairs", str(data_dir), str(manual), may_build=True)


def test_empty_training_split_is_refused(prepared):
  _, data_dir = prepared
  info_path = tfds.builder("record3d/pairs", data_dir=str(data_dir)).data_path / "dataset_info.json"
  info = json.loads(info_path.read_text())
  for split in info["splits"]:
    if split["name"] == "train":
      split["shardLengths"] = ["0"]
  info_path.write_text(json.dumps(info))
  with pytest.raises(datasets.DatasetError, match="'train' of record3d/pairs.*no examples"):
    datasets.prepare_dataset("record3d/pairs", str(data_dir), None, may_build=True)


@pytest.mark.parametrize("name,expected", [
    ("nosuch", "--dataset=nosuch: unknown dataset name 'nosuch'"),
    ("record3d/nope", "record3d has no config 'nope'; its configs are record3d/pairs, "
                      "record3d/r3d, record3d/synthetic"),
])
def test_unknown_dataset_names(tmp_path, name, expected):
  with pytest.raises(datasets.DatasetError) as error:
    datasets.get_builder(name, str(tmp_path))
  assert expected in str(error.value)
  assert len(str(error.value)) < 400  # not TFDS's catalogue
  assert isinstance(error.value, app.UsageError)  # printed without a traceback


# --- 3. Inputs that decode but are wrong -----------------------------------------

def test_confidence_outside_0_1_2(tmp_path, bad_input):
  manual = bad_input.pairs_dir(tmp_path / "m")
  png = manual / "seq2/confidence/000001.png"
  png.write_bytes(writers.encode_image_gray(np.full(bad_input.DEPTH_SIZE, 255, np.uint8)))
  writers.write_r3d(tmp_path / "r/cap0.r3d", bad_input.frames(20))
  writers.write_r3d(tmp_path / "r/cap1.r3d", bad_input.frames(21))
  frames = bad_input.frames(22)
  frames[1]["confidence"][0, 0] = 7
  writers.write_r3d(tmp_path / "r/cap2.r3d", frames)
  bad_input.expect_error("pairs", manual, tmp_path / "d", png, "must be 0, 1 or 2", "found 255")
  bad_input.expect_error("r3d", tmp_path / "r", tmp_path / "d",
                f"{tmp_path / 'r/cap2.r3d'}:rgbd/1.conf", "found 7")


def test_two_rgb_files_with_one_stem(tmp_path, bad_input):
  manual = bad_input.pairs_dir(tmp_path / "m")
  jpg = manual / "seq0/rgb/000001.jpg"
  Image.open(jpg).save(manual / "seq0/rgb/000001.png")
  error = bad_input.expect_error("pairs", manual, tmp_path / "d", jpg, manual / "seq0/rgb/000001.png",
                        "share the stem '000001'")
  assert len(error.problems) == 2


def test_sequence_without_valid_depth(tmp_path, bad_input):
  manual = tmp_path / "m"
  for i in range(3):
    frames = bad_input.frames(10 + i)
    if i == 1:
      for frame in frames:
        frame["depth"][:] = 0.0
    writers.write_pairs_sequence(manual / f"seq{i}", frames)
  bad_input.expect_error("pairs", manual, tmp_path / "d", manual / "seq1", "no valid depth")


def test_split_without_valid_depth(tmp_path, bad_input):
  manual = tmp_path / "m"
  frames = bad_input.frames(60, n=10)  # one sequence: frames 0-7 train, 8 validation, 9 test
  for frame in frames[8:]:
    frame["depth"][:] = 0.0
  writers.write_pairs_sequence(manual / "only", frames)
  error = bad_input.expect_error("pairs", manual, tmp_path / "d", "(split validation)",
                        "(split test)", "no valid depth")
  assert len(error.problems) == 2


def test_implausible_depth_scale_warns(tmp_path, caplog, bad_input):
  manual = tmp_path / "m"
  for i in range(3):  # TUM-style 5000 units per meter, manifest forgotten
    frames = bad_input.frames(70 + i)
    for frame in frames:  # a room with a 1.5 m median reads as 7.5 m
      frame["depth"] *= 1.5 / np.median(frame["depth"][frame["depth"] > 0])
    writers.write_pairs_sequence(manual / f"tum{i}", frames, depth_scale=5000.0,
                                 write_manifest=False)
  with caplog.at_level(logging.WARNING, logger="absl"):
    bad_input.build("pairs", manual, tmp_path / "d")
  for i in range(3):
    assert f"sequence tum{i}: median depth 7.50 m" in caplog.text
  assert f'set "depth_scale" (units per meter, now 1000) in {manual / "tum0/depth2d.json"}' in (
      caplog.text)


# --- 4. Messages that say what is wrong ---------------------------------------------

def test_zero_byte_image_and_cut_short_r3d(tmp_path, bad_input):
  manual = bad_input.pairs_dir(tmp_path / "m")
  (manual / "seq0/rgb/000000.jpg").write_bytes(b"")
  (manual / "seq1/depth/000001.png").write_bytes(b"")
  error = bad_input.expect_error("pairs", manual, tmp_path / "d",
                        f"{manual / 'seq0/rgb/000000.jpg'}: empty image file (0 bytes)",
                        f"{manual / 'seq1/depth/000001.png'}: empty depth file (0 bytes)")
  assert "BytesIO" not in str(error)

  r3d = tmp_path / "r"
  for i in range(3):
    writers.write_r3d(r3d / f"cap{i}.r3d", bad_input.frames(20 + i))
  data = (r3d / "cap1.r3d").read_bytes()
  (r3d / "cap1.r3d").write_bytes(data[: len(data) // 2])
  with pytest.raises(zipfile.BadZipFile):  # what the user got before
    zipfile.ZipFile(r3d / "cap1.r3d")
  error = bad_input.expect_error("r3d", r3d, tmp_path / "d2", r3d / "cap1.r3d", "truncated or not a zip")
  assert "File is not a zip file" not in str(error)
