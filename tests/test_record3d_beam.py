"""record3d at scale: Beam builds equal in-process ones, manual folders on gs://,
builds of the previous version keep loading."""

import contextlib
import shutil
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

import tfds_record3d
from tfds_record3d import validation
from tfds_record3d.record3d import record3d_dataset_builder as builder_module

DUMMY = builder_module.Builder.code_path.parent / "dummy_data"
SPLITS = ("train", "validation", "test")
BUCKET = "gs://depth2d-test-bucket"


def _build(config, manual_dir, data_dir, beam_flags=None):
  builder = tfds.builder(f"record3d/{config}", data_dir=str(data_dir))
  options = PipelineOptions(flags=beam_flags) if beam_flags else None
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), beam_options=options))
  return builder


def _examples(builder, split) -> dict:
  """key -> the stored values, image as its raw stored bytes."""
  dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return {f"{e['sequence'].decode()}/{int(e['frame']):06d}": e for e in tfds.as_numpy(dataset)}


def _assert_same_build(plain, beam):
  for split in SPLITS:
    expected, got = _examples(plain, split), _examples(beam, split)
    assert sorted(got) == sorted(expected) and got, split  # same (sequence, frame) set
    for key, example in expected.items():
      for name, value in example.items():
        np.testing.assert_array_equal(got[key][name], value, err_msg=f"{split} {key} {name}")
  assert beam.info.metadata["stats"] == plain.info.metadata["stats"]
  assert {s: beam.info.splits[s].num_examples for s in SPLITS} == {
      s: plain.info.splits[s].num_examples for s in SPLITS}


def test_beam_build_equals_in_process_build_r3d(tmp_path):
  plain = _build("r3d", DUMMY / "r3d", tmp_path / "plain")
  beam = _build("r3d", DUMMY / "r3d", tmp_path / "beam", ["--runner=DirectRunner"])
  _assert_same_build(plain, beam)
  stats = beam.info.metadata["stats"]["train"]  # from Beam metrics, not the builder
  assert stats["frames"] == 3 and stats["depth_sizes"] == [(16, 12)]
  # The provenance features, through the Beam path.
  example = next(iter(_examples(beam, "train").values()))
  assert example["source"].decode().startswith(example["sequence"].decode() + ".r3d:rgbd/")


@pytest.mark.slow
def test_beam_two_local_workers_equal_in_process_build_pairs(tmp_path):
  """The documented local command: 2 worker processes (DirectRunner multi_processing)."""
  plain = _build("pairs", DUMMY / "pairs", tmp_path / "plain")
  beam = _build("pairs", DUMMY / "pairs", tmp_path / "beam", [
      "--runner=DirectRunner", "--direct_num_workers=2",
      "--direct_running_mode=multi_processing"])
  _assert_same_build(plain, beam)


def test_beam_build_with_bad_files_lists_them_all_and_writes_nothing(tmp_path, bad_input):
  manual = bad_input.r3d_dir(tmp_path / "m")
  bad_input.rewrite_zip(manual / "cap0.r3d", replace={"rgbd/1.depth": b"junk"})
  bad_input.rewrite_zip(manual / "cap2.r3d", drop=["rgbd/2.jpg"])
  with pytest.raises(tfds_record3d.ManualInputError) as error:
    _build("r3d", manual, tmp_path / "out", ["--runner=DirectRunner"])
  message = str(error.value)
  assert f"{manual / 'cap0.r3d'}:rgbd/1.depth: depth is not valid LZFSE data" in message
  assert f"{manual / 'cap2.r3d'}:rgbd/2.depth: missing partner rgbd/2.jpg" in message
  assert not (tmp_path / "out" / "record3d").exists()


def test_a_build_that_loses_examples_stops_and_keeps_nothing(tmp_path, monkeypatch):
  """Every build is counted against the checked folder: a runner that drops a
  frame (as the local DirectRunner did on a large build) is an error, not a
  smaller dataset."""
  from tfds_record3d import beam_build
  real = beam_build.list_frames

  def drops_one(ref):
    tasks = list(real(ref))
    return tasks[1:] if ref.name == "kitchen" else tasks  # one frame of one capture vanishes

  monkeypatch.setattr(beam_build, "list_frames", drops_one)
  with pytest.raises(builder_module.LostExamplesError,
                     match=r"(\d+) written of (?!\1)\d+.*missing before they were serialized"):
    _build("r3d", DUMMY / "r3d", tmp_path / "out", ["--runner=DirectRunner"])
  assert not list((tmp_path / "out").glob("record3d/r3d/*/dataset_info.json"))
  with pytest.raises(builder_module.LostExamplesError, match="validation: 1 written of 2"):
    builder_module.check_written_counts("r3d", {"train": 3, "validation": 2},
                                        {"train": 3, "validation": 1}, beam=False)
  # What the DirectRunner once did here: every example serialized and given a
  # shard, one whole shard never written.
  with pytest.raises(builder_module.LostExamplesError,
                     match="serialized 5 examples of 5 and wrote 2 of 3 shards: every example "
                           "was serialized and assigned a shard; they went missing between "
                           "grouping into shards and writing"):
    builder_module.check_written_counts(
        "r3d", {"train": 3, "validation": 2}, {"train": 1, "validation": 2}, beam=True,
        writer={"serialized": 5, "shards_planned": 3, "shards_written": 2})


# --- gs:// ---------------------------------------------------------------------
# TF's own GCS filesystem (what epath uses for gs://) cannot be pointed at a
# local emulator, and this machine has no bucket. These tests map gs://BUCKET
# onto a local folder underneath epath (etils' mock_epath): every path the
# builder, the readers and TFDS' DownloadManager handle is a real gs:// epath
# path (no `os` call, no local copy), but the bytes come from local disk.

def _gs_mock(root):
  """mock_epath functions mapping BUCKET/... to root/..."""
  def local(path):
    path = str(path)
    return str(root) + path[len(BUCKET):] if path.startswith(BUCKET) else path

  def remote(path):
    path = str(path)
    return BUCKET + path[len(str(root)):] if path.startswith(str(root)) else path

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def walk(fn, top, **kwargs):
    for folder, dirs, files in fn(local(top), **kwargs):
      yield remote(folder), dirs, files

  return dict(open=one, exists=one, isdir=one, listdir=one, stat=one, walk=walk,
              glob=lambda fn, pattern: [remote(p) for p in fn(local(pattern))])


@contextlib.contextmanager
def _mock_gs(**mocks):
  # etils 1.15 sends gs:// to TF's filesystem whenever TF is installed,
  # bypassing the backends mock_epath replaces: pretend it is not, so gs://
  # goes to the mock (local paths too, which the mocks pass through).
  with mock.patch.object(gpath, "_is_tf_installed", lambda: False), \
      epath_testing.mock_epath(**mocks):
    yield


def test_gs_manual_dir_builds_without_a_local_copy(tmp_path):
  root = tmp_path / "bucket"
  shutil.copytree(DUMMY / "pairs", root / "captures")
  opened = []

  def tracking_open(fn, path, mode):
    opened.append(str(path))
    return fn(str(root) + str(path)[len(BUCKET):] if str(path).startswith(BUCKET) else path,
              mode)

  mocks = dict(_gs_mock(root), open=tracking_open)
  with _mock_gs(**mocks):
    builder = _build("pairs", f"{BUCKET}/captures", tmp_path / "data")
    recorded = builder.info.metadata["provenance"]
  assert recorded["manual_dir"] == f"{BUCKET}/captures"
  # lab 3x3 + manifest, seed_style 3x2 + manifest, npy_seq 3x2, exr_seq 3x2 + metadata.json
  assert recorded["fingerprint"]["files"] == 30
  assert f"{BUCKET}/captures/lab/rgb/000001.jpg" in opened  # read through gs:// paths
  train = _examples(builder, "train")
  assert len(train) == 6
  sources = sorted(e["source"].decode() for e in train.values())
  assert all(not s.startswith("gs://") and ("/rgb/" in s or "/X/" in s) for s in sources), sources


def test_gs_manual_dir_missing_or_unreadable_is_named(tmp_path):
  (tmp_path / "bucket").mkdir()
  with _mock_gs(**_gs_mock(tmp_path / "bucket")):
    with pytest.raises(tfds_record3d.ManualInputError) as error:
      _build("r3d", f"{BUCKET}/no_such_folder", tmp_path / "data")
  assert f"{BUCKET}/no_such_folder: manual folder does not exist" in str(error.value)

  def denied(fn, path, *args, **kwargs):
    if str(path).startswith(BUCKET):
      raise PermissionError(f"403 Forbidden: {path}")  # what a bucket without access gives
    return fn(path, *args, **kwargs)

  with _mock_gs(exists=denied, isdir=denied, listdir=denied):
    problems = validation.check_manual_dir(epath.Path(f"{BUCKET}/captures"))
  assert len(problems) == 1 and problems[0].path == f"{BUCKET}/captures"
  assert "cannot read the manual folder (PermissionError: 403 Forbidden" in problems[0].reason
  assert "roles/storage.objectViewer" in problems[0].reason
  assert not (tmp_path / "data" / "record3d").exists()


# --- Versions --------------------------------------------------------------------

class _Version100(builder_module.Builder, skip_registration=True):
  """What 1.0.0 built: the same features without the provenance ones."""
  name = "record3d"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    info = super()._info()
    old = {k: v for k, v in info.features.items()
           if k not in ("source", "timestamp", "pose", "camera")}
    return self.dataset_info_from_configs(
        description=info.description, features=tfds.features.FeaturesDict(old),
        supervised_keys=("image", "depth"), metadata=tfds.core.MetadataDict())

  def _generate_examples(self, split, parts):
    for key, example in super()._generate_examples(split, parts):
      yield key, {k: v for k, v in example.items()
                  if k not in ("source", "timestamp", "pose", "camera")}


def test_build_of_previous_version_still_loads(tmp_path):
  data_dir = tmp_path / "data"
  old = _Version100(config="r3d", data_dir=str(data_dir))
  old.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(DUMMY / "r3d")))
  assert (data_dir / "record3d" / "r3d" / "1.0.0").is_dir()
  current = tfds.builder("record3d/r3d", data_dir=str(data_dir))
  assert str(current.version) == "1.1.0" and not current.is_prepared()
  for loaded in (tfds.builder("record3d/r3d", data_dir=str(data_dir), version="1.0.0"),
                 tfds.builder("record3d/r3d:1.0.0", data_dir=str(data_dir))):
    assert str(loaded.version) == "1.0.0" and "pose" not in loaded.info.features
    examples = list(tfds.as_numpy(loaded.as_dataset(split="train")))
    assert len(examples) == 3 and examples[0]["image"].shape == (40, 30, 3)


def test_the_local_multi_processing_runner_is_recognised_for_its_warning():
  from tfds_record3d import beam_build
  config = lambda flags: tfds.download.DownloadConfig(beam_options=PipelineOptions(flags=flags))
  assert beam_build.local_multi_processing(config(
      ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]))
  assert beam_build.local_multi_processing(config(["--direct_running_mode=multi_processing"]))
  assert not beam_build.local_multi_processing(config(["--runner=DirectRunner"]))
  assert not beam_build.local_multi_processing(config(
      ["--runner=DataflowRunner", "--direct_running_mode=multi_processing"]))
  assert not beam_build.local_multi_processing(tfds.download.DownloadConfig())
