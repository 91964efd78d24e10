"""record3d at scale: Beam builds equal in-process ones, manual folders on gs://,
builds of the previous version keep loading."""

import contextlib
import subprocess
import sys
import uuid
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from apache_beam.options.pipeline_options import PipelineOptions
from etils.epath import gpath
from etils.epath import testing as epath_testing

import gcs_server
import tfds_record3d
from launch import gcs_sync
from tfds_record3d import beam_build
from tfds_record3d.record3d import record3d_dataset_builder as builder_module

DUMMY = builder_module.Builder.code_path.parent / "dummy_data"
SPLITS = ("train", "validation", "test")
BUCKET = "gs://depth2d-mocked-bucket"  # the mock_epath tests' bucket


def _build(config, manual_dir, data_dir, beam_flags=None, unordered_shards=None):
  """unordered_shards=N: TFDS' unordered Beam writer (`--nondeterministic_order
  --num_shards=N`); 0: asked for without a shard count."""
  builder = tfds.builder(f"record3d/{config}", data_dir=str(data_dir))
  options = PipelineOptions(flags=beam_flags) if beam_flags else None
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), beam_options=options,
      nondeterministic_order=unordered_shards is not None, num_shards=unordered_shards or None))
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
  beam = _build("r3d", DUMMY / "r3d", tmp_path / "beam", beam_build.local_runner_flags(0))
  _assert_same_build(plain, beam)
  stats = beam.info.metadata["stats"]["train"]  # from Beam metrics, not the builder
  assert stats["frames"] == 3 and stats["depth_sizes"] == [(16, 12)]
  # The provenance features, through the Beam path.
  example = next(iter(_examples(beam, "train").values()))
  assert example["source"].decode().startswith(example["sequence"].decode() + ".r3d:rgbd/")


@pytest.mark.slow
def test_beam_two_local_workers_equal_in_process_build_pairs(tmp_path):
  """The documented local command: 2 worker processes (FnApiRunner
  multi_processing) with TFDS' unordered writer (--nondeterministic_order
  --num_shards). (TFDS' default writer with 2 workers: the gs:// test below.)"""
  plain = _build("pairs", DUMMY / "pairs", tmp_path / "plain")
  beam = _build("pairs", DUMMY / "pairs", tmp_path / "beam", beam_build.local_runner_flags(2),
                unordered_shards=2)
  _assert_same_build(plain, beam)
  assert beam.info.nondeterministic_order and not plain.info.nondeterministic_order
  # Every split in at most 2 files (TFDS drops the empty ones of small splits).
  assert all(1 <= beam.info.splits[s].num_shards <= 2 for s in SPLITS)


def test_unordered_beam_writer_without_a_shard_count_is_refused_before_writing(tmp_path):
  with pytest.raises(ValueError, match=r"--nondeterministic_order.*needs --num_shards N"):
    _build("r3d", DUMMY / "r3d", tmp_path / "out", beam_build.local_runner_flags(0),
           unordered_shards=0)
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.tfrecord*"))
  # In process, TFDS ignores the flag (it only changes Beam's writer): no error.
  _build("r3d", DUMMY / "r3d", tmp_path / "plain", unordered_shards=0)


def test_beam_build_with_bad_files_lists_them_all_and_writes_nothing(tmp_path, bad_input):
  manual = bad_input.r3d_dir(tmp_path / "m")
  bad_input.rewrite_zip(manual / "cap0.r3d", replace={"rgbd/1.depth": b"junk"})
  bad_input.rewrite_zip(manual / "cap2.r3d", drop=["rgbd/2.jpg"])
  with pytest.raises(tfds_record3d.ManualInputError) as error:
    _build("r3d", manual, tmp_path / "out", beam_build.local_runner_flags(0))
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
    _build("r3d", DUMMY / "r3d", tmp_path / "out", beam_build.local_runner_flags(0))
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
  # The unordered writer counts serialized examples only.
  with pytest.raises(builder_module.LostExamplesError,
                     match=r"serialized 5 examples of 5: every example was serialized; they "
                           r"went missing between serialization and the files\..*"
                           r"--nondeterministic_order --num_shards=N"):
    builder_module.check_written_counts(
        "r3d", {"train": 3, "validation": 2}, {"train": 1, "validation": 2}, beam=True,
        writer={"serialized": 5})


# --- gs:// through TensorFlow's own GCS client ---------------------------------
# The dummy folders go to a local gcp-storage-emulator with launch.stage's
# upload (gcs_sync); the `tfds build` command line then runs in a subprocess
# whose tf.io.gfile reaches the emulator through gcs_server.TlsProxy: TF's real
# GCS filesystem (listing, stat, ranged reads over TLS, what epath and TFDS
# call), no mock. What the emulator cannot do (refuse access) is mocked below.

@pytest.fixture(scope="module")
def gs_captures(emulator_client):
  """gs://BUCKET/captures-ID, holding the dummy `pairs/` and `r3d/` folders."""
  prefix = f"gs://{gcs_server.BUCKET}/captures-{uuid.uuid4().hex[:8]}"
  for config in ("pairs", "r3d"):
    report = gcs_sync.upload_tree(str(DUMMY / config), f"{prefix}/{config}",
                                  client=emulator_client)
    assert report.ok and report.transferred, report
  return prefix


def _tfds_build(config, manual_dir, data_dir, env, beam_options=None):
  """The documented command line, in a subprocess with `env`."""
  command = [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main", "build", "record3d",
             "--imports", "tfds_record3d", "--config", config, "--manual_dir", str(manual_dir),
             "--data_dir", str(data_dir)]
  if beam_options:
    command.append(f"--beam_pipeline_options={beam_options}")
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                        check=False)


def _reloaded_local_build(config, data_dir):
  """The in-process build of the same dummy folder, read back from disk like the
  subprocess's (metadata from JSON: lists where the builder held tuples)."""
  _build(config, DUMMY / config, data_dir)
  return tfds.builder(f"record3d/{config}", data_dir=str(data_dir))


@pytest.mark.slow  # subprocesses: TF start-up
@pytest.mark.parametrize("config", ["pairs", "r3d"])
def test_tfds_build_reads_gs_manual_dir_with_tensorflows_gcs_client(
    tmp_path, config, gs_captures, tf_gcs_proxy, tf_gcs_env):
  tunnels_before = len(tf_gcs_proxy.tunnels)
  result = _tfds_build(config, f"{gs_captures}/{config}", tmp_path / "gs", tf_gcs_env)
  assert result.returncode == 0, result.stdout + result.stderr
  # The bytes came through TF's client: listings and metadata from
  # www.googleapis.com, object reads from storage.googleapis.com.
  assert set(tf_gcs_proxy.tunnels[tunnels_before:]) == set(gcs_server.GCS_HOSTS)
  from_gs = tfds.builder(f"record3d/{config}", data_dir=str(tmp_path / "gs"))
  _assert_same_build(_reloaded_local_build(config, tmp_path / "local"), from_gs)
  recorded = from_gs.info.metadata["provenance"]
  assert recorded["manual_dir"] == f"{gs_captures}/{config}"
  # pairs: lab 3x3 + manifest, seed_style 3x2 + manifest, npy_seq 3x2, exr_seq 3x2 +
  # metadata.json; r3d: three captures.
  assert recorded["fingerprint"]["files"] == {"pairs": 30, "r3d": 3}[config]
  sources = [e["source"].decode() for e in _examples(from_gs, "train").values()]
  assert sources and not any(s.startswith("gs://") for s in sources), sources


@pytest.mark.slow
def test_beam_two_workers_build_from_gs_to_gs(tmp_path, gs_captures, tf_gcs_env,
                                              emulator_client):
  """What a Dataflow build does, on 2 local worker processes (FnApiRunner
  multi_processing, TFDS' default writer): nothing local, the manual folder
  and the data_dir both on gs://, read and written by the workers through
  TF's client. The files the build left in the bucket, downloaded, load as
  the local in-process build."""
  data_dir = f"{gs_captures}/tfds"
  result = _tfds_build("pairs", f"{gs_captures}/pairs", data_dir, tf_gcs_env,
                       ",".join(f.lstrip("-") for f in beam_build.local_runner_flags(2)))
  assert result.returncode == 0, result.stdout + result.stderr
  report = gcs_sync.download_tree(data_dir, str(tmp_path / "downloaded"), client=emulator_client)
  assert report.ok and report.transferred, report
  _assert_same_build(_reloaded_local_build("pairs", tmp_path / "local"),
                     tfds.builder("record3d/pairs", data_dir=str(tmp_path / "downloaded")))


@pytest.mark.slow
def test_gs_manual_dir_that_does_not_exist_is_named(tmp_path, gs_captures, tf_gcs_env):
  missing = f"{gs_captures}/no_such_folder"
  result = _tfds_build("r3d", missing, tmp_path / "data", tf_gcs_env)
  output = result.stdout + result.stderr
  assert result.returncode == 1, output
  assert f"{missing}: manual folder does not exist" in output
  assert "Traceback" not in output
  assert not (tmp_path / "data" / "record3d").exists()


# A bucket that refuses access: the emulator lets anyone read, so here epath's
# gs:// calls are replaced (etils' mock_epath) by ones that raise what a 403
# gives.

@contextlib.contextmanager
def _mock_gs(**mocks):
  # etils 1.15 sends gs:// to TF's filesystem whenever TF is installed,
  # bypassing the backends mock_epath replaces: pretend it is not, so gs://
  # goes to the mock (local paths too, which the mocks pass through).
  with mock.patch.object(gpath, "_is_tf_installed", lambda: False), \
      epath_testing.mock_epath(**mocks):
    yield


def test_gs_manual_dir_without_read_access_is_named(tmp_path):
  def denied(fn, path, *args, **kwargs):
    if str(path).startswith(BUCKET):
      raise PermissionError(f"403 Forbidden: {path}")  # what a bucket without access gives
    return fn(path, *args, **kwargs)

  with _mock_gs(exists=denied, isdir=denied, listdir=denied):
    with pytest.raises(tfds_record3d.ManualInputError) as error:
      _build("pairs", f"{BUCKET}/captures", tmp_path / "data")
  message = str(error.value)
  assert (f"{BUCKET}/captures: cannot read the manual folder (PermissionError: 403 Forbidden"
          in message), message
  assert "roles/storage.objectViewer" in message
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
  config = lambda flags: tfds.download.DownloadConfig(beam_options=PipelineOptions(flags=flags))
  assert beam_build.local_multi_processing(config(
      ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]))
  assert beam_build.local_multi_processing(config(beam_build.local_runner_flags(2)))
  assert beam_build.local_multi_processing(config(["--direct_running_mode=multi_processing"]))
  assert not beam_build.local_multi_processing(config(beam_build.local_runner_flags(0)))
  assert not beam_build.local_multi_processing(config(
      ["--runner=DataflowRunner", "--direct_running_mode=multi_processing"]))
  assert not beam_build.local_multi_processing(tfds.download.DownloadConfig())
  # Beam's DirectRunner (named or by default) may first fetch Prism: said in the log.
  assert beam_build.may_try_prism(config(["--runner=DirectRunner"]))
  assert beam_build.may_try_prism(config(["--direct_num_workers=2"]))
  assert not beam_build.may_try_prism(config(beam_build.local_runner_flags(2)))
  assert not beam_build.may_try_prism(config(["--runner=DataflowRunner"]))
  assert not beam_build.may_try_prism(tfds.download.DownloadConfig())


def test_a_local_build_too_big_for_one_grpc_message_per_worker_is_warned_about():
  """Measured: 2.7 GB of captures, 10,240 frames, 1 worker failed in Beam's
  data plane ("exceeds GRPC limit"); the same with 2 workers, or 5,120 frames
  with 1, fit."""
  splits = {"train": 8320, "validation": 960, "test": 960}  # 81.25 / 9.375 / 9.375 %
  problem = beam_build.message_size_problem(splits, 2.7e9, workers=1)
  assert problem and "'train'" in problem and "~2.2 GB per worker" in problem
  assert "direct_num_workers=2 or more" in problem
  assert beam_build.message_size_problem(splits, 2.7e9, workers=2) is None
  assert beam_build.message_size_problem(splits, 1.35e9, workers=1) is None
  assert "direct_num_workers=5 or more" in beam_build.message_size_problem(splits, 1e10, 2)
  config = lambda flags: tfds.download.DownloadConfig(beam_options=PipelineOptions(flags=flags))
  assert beam_build.local_workers(config(beam_build.local_runner_flags(2))) == 2
  assert beam_build.local_workers(config(["--direct_running_mode=multi_processing"])) == 1
  assert beam_build.local_workers(config(beam_build.local_runner_flags(0))) is None  # in memory
  assert beam_build.local_workers(config(["--runner=DataflowRunner"])) is None
