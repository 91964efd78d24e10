"""Shared fixtures: a tiny prepared `record3d/pairs` dataset made from synthetic frames."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep test logs readable

import zipfile

import pytest
import tensorflow_datasets as tfds

import gcs_server

import tfds_record3d  # pylint: disable=unused-import  # registers record3d
from tfds_record3d import synthetic
from tfds_record3d import writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny on purpose: the whole suite must run in minutes on 2 CPU cores.
TINY_IMAGE_SIZE = (64, 48)  # RGB H, W written to the pairs folder
TINY_DEPTH_SIZE = (32, 24)  # depth at its own (smaller) size, like the LiDAR's
TINY_SEQUENCES = 6
TINY_FRAMES = 4


def build_tiny_pairs_dataset(root) -> tuple:
  """Writes synthetic frames as a `pairs` manual folder and builds it with TFDS.

  Returns (data_dir, manual_dir). 6 sequences of 4 frames: every split non-empty.
  """
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


@pytest.fixture(scope="session")
def make_config(tiny_record3d):
  """make_config(model_dir, **overrides) -> a validated trainer Config on the tiny
  dataset: 32x24, batch 4, 4 steps, one device, float32."""
  from trainer import config as config_lib

  def make(model_dir, **overrides):
    data_dir, _ = tiny_record3d
    values = dict(model_dir=str(model_dir), dataset="record3d/pairs", data_dir=data_dir,
                  image_size=(32, 24), global_batch_size=4, train_steps=4, steps_per_loop=2,
                  log_every_steps=2, checkpoint_every_steps=2, warmup_steps=1,
                  num_image_summaries=2, num_predict_images=2, strategy="one_device",
                  mixed_precision="float32")
    values.update(overrides)
    config = config_lib.Config(**values)
    config_lib.validate(config)
    return config
  return make


@pytest.fixture
def subprocess_env():
  """subprocess_env(**extra) -> the environment for running the project's commands."""
  def env(**extra):
    values = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    values.update(extra)
    return values
  return env


# ---------------------------------------------------------------------------
# Manual input folders for the dataset's bad-input tests (fixture `bad_input`).
# ---------------------------------------------------------------------------
IMAGE_SIZE, DEPTH_SIZE = (40, 30), (16, 12)  # tiny frames of the bad-input tests


def _frames(seed, n=3):
  return list(synthetic.render_sequence(seed, n, IMAGE_SIZE, DEPTH_SIZE))


def _pairs_dir(root, sequences=3):
  for i in range(sequences):
    writers.write_pairs_sequence(root / f"seq{i}", _frames(10 + i))
  return root


def _r3d_dir(root, sequences=3):
  root.mkdir(parents=True, exist_ok=True)
  for i in range(sequences):
    writers.write_r3d(root / f"cap{i}.r3d", _frames(20 + i))
  return root


def _build(config, manual_dir, data_dir, mode=None):
  builder = tfds.builder(f"record3d/{config}", data_dir=str(data_dir))
  kwargs = {"download_mode": mode} if mode else {}
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), **kwargs))
  return builder


def _expect_error(config, manual_dir, data_dir, *fragments):
  with pytest.raises(tfds_record3d.ManualInputError) as error:
    _build(config, manual_dir, data_dir)
  message = str(error.value)
  for fragment in fragments:
    assert str(fragment) in message, message
  assert not (data_dir / "record3d").exists(), "nothing may be written on bad input"
  return error.value


def _rewrite_zip(path, replace=None, drop=()):
  """Rewrites a ZIP with some entries replaced (name -> bytes) or dropped."""
  replace = replace or {}
  with zipfile.ZipFile(path) as archive:
    entries = {n: archive.read(n) for n in archive.namelist() if n not in drop}
  entries.update(replace)
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in entries.items():
      archive.writestr(name, data)




@pytest.fixture
def bad_input():
  """Helpers that write tiny manual folders and build them (record3d bad-input tests)."""
  import types
  return types.SimpleNamespace(
      IMAGE_SIZE=IMAGE_SIZE, DEPTH_SIZE=DEPTH_SIZE, frames=_frames, pairs_dir=_pairs_dir,
      r3d_dir=_r3d_dir, build=_build, expect_error=_expect_error, rewrite_zip=_rewrite_zip)


@pytest.fixture
def event_scalars():
  """event_scalars(logdir, tag) -> {step: value} of one scalar from TensorBoard event files."""
  import tensorflow as tf

  def event_scalars(logdir: str, tag: str) -> dict:
    """{step: value} of one scalar from TensorBoard event files."""
    values = {}
    for path in tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*")):
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          if value.tag == tag:
            values[event.step] = float(tf.make_ndarray(value.tensor))
    return values
  return event_scalars


# ---------------------------------------------------------------------------
# A local Cloud Storage (tests/gcs_server.py).
# ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def emulator_host():
  """http://127.0.0.1:PORT of a gcp-storage-emulator with bucket gcs_server.BUCKET
  (google-cloud-storage reaches it through STORAGE_EMULATOR_HOST)."""
  with gcs_server.emulator(gcs_server.BUCKET) as host:
    yield host


@pytest.fixture(scope="session")
def emulator_client(emulator_host):
  """A google-cloud-storage client of the emulator (anonymous)."""
  from google.auth.credentials import AnonymousCredentials  # pylint: disable=g-import-not-at-top
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  return storage.Client(project="depth2d-test", credentials=AnonymousCredentials(),
                        client_options={"api_endpoint": emulator_host})


@pytest.fixture(scope="session")
def tf_gcs_proxy(emulator_host, tmp_path_factory):
  """A gcs_server.TlsProxy to the emulator: its tf_environment() lets a
  subprocess's TensorFlow (tf.io.gfile, epath, TFDS) read gs://gcs_server.BUCKET."""
  proxy = gcs_server.TlsProxy(emulator_host, str(tmp_path_factory.mktemp("gcs_tls")))
  yield proxy
  proxy.shutdown()
  proxy.server_close()


@pytest.fixture
def tf_gcs_env(tf_gcs_proxy, subprocess_env):
  """The environment of a subprocess whose TensorFlow reads and writes
  gs://gcs_server.BUCKET (the emulator) through tf_gcs_proxy."""
  env = subprocess_env(**tf_gcs_proxy.tf_environment())
  env.pop("STORAGE_EMULATOR_HOST", None)  # TF's client goes through the proxy
  return env
