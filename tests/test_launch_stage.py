"""launch.stage / gcs_sync against a real local Cloud Storage server.

The server is gcp-storage-emulator, started here on 127.0.0.1 in its own
process; google-cloud-storage reaches it through STORAGE_EMULATOR_HOST with
anonymous credentials. Nothing here talks to Google.
"""

import io
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from launch import gcs_sync

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "depth2d-test"
KIB = 1024


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator_host():
  port = _free_port()
  server = subprocess.Popen(
      [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
       f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  host = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        requests.get(f"{host}/storage/v1/b/{BUCKET}", timeout=1)
        break
      except requests.ConnectionError:
        if time.monotonic() > deadline or server.poll() is not None:
          raise RuntimeError("gcp-storage-emulator did not start")
        time.sleep(0.1)
    yield host
  finally:
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def gcs(emulator_host, monkeypatch):
  """Points google-cloud-storage at the emulator; returns a client factory."""
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator_host)
  monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "depth2d-test")
  return lambda: storage.Client(project="depth2d-test", credentials=AnonymousCredentials())


@pytest.fixture
def prefix():
  return f"gs://{BUCKET}/run-{uuid.uuid4().hex[:8]}"


def make_tree(root, count=6, big_size=0):
  """count small files in nested folders, plus one big file if big_size."""
  files = {}
  for i in range(count):
    relative = f"split{i % 2}/shard-{i:03d}.bin"
    files[relative] = os.urandom(KIB * (i + 1))
  if big_size:
    files["big/record3d-train.tfrecord-00000"] = os.urandom(big_size)
  for relative, data in files.items():
    path = os.path.join(root, *relative.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
  return files


def remote_contents(client_factory, uri):
  location = gcs_sync.parse_gcs_path(uri)
  client = client_factory()
  return {blob.name[len(location.prefix):]: blob.download_as_bytes()
          for blob in client.list_blobs(location.bucket, prefix=location.prefix)}


def test_upload_then_rerun_skips_everything(tmp_path, gcs, prefix):
  files = make_tree(tmp_path / "data")
  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, workers=3, client_factory=gcs)
  assert report.ok and sorted(report.transferred) == sorted(files) and not report.skipped
  assert remote_contents(gcs, prefix) == files

  again = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, workers=3, client_factory=gcs)
  assert again.ok and not again.transferred and sorted(again.skipped) == sorted(files)


def test_big_file_goes_through_resumable_upload_and_round_trips(tmp_path, gcs, prefix):
  files = make_tree(tmp_path / "data", count=2, big_size=700 * KIB)
  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client_factory=gcs,
                                resumable_threshold=256 * KIB, chunk_size=256 * KIB)
  assert report.ok
  out = tmp_path / "back"
  down = gcs_sync.download_tree(prefix, str(out), client_factory=gcs)
  assert down.ok and sorted(down.transferred) == sorted(files)
  for relative, data in files.items():
    assert (out / relative).read_bytes() == data
  assert not list(out.rglob("*" + gcs_sync.PARTIAL_SUFFIX))
  # A second download finds everything in place.
  assert sorted(gcs_sync.download_tree(prefix, str(out), client_factory=gcs).skipped) == sorted(files)


def test_interrupted_upload_resumes_with_only_the_rest(tmp_path, gcs, prefix, monkeypatch):
  files = make_tree(tmp_path / "data", count=8)
  real_upload = gcs_sync.upload_file
  calls = []

  def upload_then_die(*args, **kwargs):
    calls.append(args[2])
    if len(calls) > 3:
      raise ConnectionError("network gone (injected)")
    return real_upload(*args, **kwargs)

  monkeypatch.setattr(gcs_sync, "upload_file", upload_then_die)
  first = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, workers=1, client_factory=gcs)
  assert not first.ok and len(first.transferred) == 3 and len(first.failed) == 5
  assert sorted(remote_contents(gcs, prefix)) == sorted(first.transferred)

  monkeypatch.setattr(gcs_sync, "upload_file", real_upload)
  second = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, workers=4, client_factory=gcs)
  assert second.ok
  assert sorted(second.skipped) == sorted(first.transferred)
  assert sorted(second.transferred) == sorted(name for name, _ in first.failed)
  assert remote_contents(gcs, prefix) == files


class _DiesPartWay(io.RawIOBase):
  """A file that fails after `limit` bytes, like a connection dropped mid-file."""

  def __init__(self, path, limit):
    self._f = open(path, "rb")
    self._left = limit

  def readable(self):
    return True

  def readinto(self, buffer):
    if self._left <= 0:
      raise ConnectionError("connection dropped mid-file (injected)")
    n = self._f.readinto(memoryview(buffer)[:self._left])
    self._left -= n
    return n

  def tell(self):
    return self._f.tell()

  def seek(self, *args):
    return self._f.seek(*args)

  def close(self):
    self._f.close()
    super().close()


def test_file_cut_off_mid_upload_leaves_no_object(tmp_path, gcs, prefix, monkeypatch):
  files = make_tree(tmp_path / "data", count=0, big_size=900 * KIB)
  (relative,) = files
  real_open = gcs_sync._open_for_upload
  # The first 256 KiB chunk reaches the server, then the file "dies".
  monkeypatch.setattr(gcs_sync, "_open_for_upload",
                      lambda path: io.BufferedReader(_DiesPartWay(path, 300 * KIB)))
  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client_factory=gcs,
                                resumable_threshold=256 * KIB, chunk_size=256 * KIB)
  assert [name for name, _ in report.failed] == [relative]
  assert "injected" in report.failed[0][1]
  assert remote_contents(gcs, prefix) == {}  # nothing a later run could take as complete

  monkeypatch.setattr(gcs_sync, "_open_for_upload", real_open)
  assert gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client_factory=gcs,
                              resumable_threshold=256 * KIB, chunk_size=256 * KIB).ok
  assert remote_contents(gcs, prefix) == files


def test_file_changed_while_uploading_is_caught_and_removed(tmp_path, gcs, prefix, monkeypatch):
  files = make_tree(tmp_path / "data", count=1)
  (relative,) = files
  # The bytes sent are not the bytes that were checksummed beforehand.
  monkeypatch.setattr(gcs_sync, "_open_for_upload",
                      lambda path: io.BytesIO(b"x" * len(files[relative])))
  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client_factory=gcs)
  assert not report.ok
  assert "VerificationError" in report.failed[0][1]
  assert remote_contents(gcs, prefix) == {}


def test_corrupted_remote_object_is_detected_and_replaced(tmp_path, gcs, prefix):
  files = make_tree(tmp_path / "data")
  assert gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client_factory=gcs).ok
  victim = sorted(files)[2]
  location = gcs_sync.parse_gcs_path(prefix)
  blob = gcs().bucket(BUCKET).blob(location.object_name(victim))
  corrupted = bytearray(files[victim])
  corrupted[10] ^= 0xFF  # same size, one byte flipped
  blob.upload_from_string(bytes(corrupted))

  verified = gcs_sync.verify_tree(str(tmp_path / "data"), prefix, client_factory=gcs)
  assert not verified.ok and verified.differing == [victim]

  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client_factory=gcs)
  assert report.ok and report.replaced == [victim] and report.transferred == [victim]
  assert remote_contents(gcs, prefix) == files
  assert gcs_sync.verify_tree(str(tmp_path / "data"), prefix, client_factory=gcs).ok


def test_download_replaces_a_damaged_local_copy(tmp_path, gcs, prefix):
  files = make_tree(tmp_path / "data", count=3)
  assert gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client_factory=gcs).ok
  out = tmp_path / "back"
  assert gcs_sync.download_tree(prefix, str(out), client_factory=gcs).ok
  damaged = sorted(files)[0]
  (out / damaged).write_bytes(b"garbage")
  report = gcs_sync.download_tree(prefix, str(out), client_factory=gcs)
  assert report.replaced == [damaged] and len(report.skipped) == 2
  assert (out / damaged).read_bytes() == files[damaged]


@pytest.mark.parametrize("uri", ["/tmp/x", "s3://bucket/x", "gs://", "gs:///x", "bucket/x"])
def test_non_gcs_paths_are_rejected(uri):
  with pytest.raises(ValueError, match="gs://BUCKET/PREFIX"):
    gcs_sync.parse_gcs_path(uri)


def test_cli_round_trip_and_errors(tmp_path, emulator_host, prefix):
  files = make_tree(tmp_path / "data", count=3)
  env = dict(os.environ, STORAGE_EMULATOR_HOST=emulator_host, GOOGLE_CLOUD_PROJECT="t")

  def stage(*args):
    return subprocess.run([sys.executable, "-m", "launch.stage", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)

  up = stage("upload", str(tmp_path / "data"), prefix)
  assert up.returncode == 0, up.stderr
  assert "3 transferred" in up.stdout and "ETA" in up.stderr
  again = stage("upload", str(tmp_path / "data"), prefix)
  assert "0 transferred" in again.stdout and "3 already up to date" in again.stdout
  assert stage("verify", str(tmp_path / "data"), prefix).returncode == 0
  down = stage("download", prefix, str(tmp_path / "back"))
  assert down.returncode == 0, down.stderr
  assert {r: (tmp_path / "back" / r).read_bytes() for r in files} == files

  bad = stage("upload", str(tmp_path / "data"), str(tmp_path / "not-a-bucket"))
  assert bad.returncode == 2 and "is not a Cloud Storage path" in bad.stderr
  assert "Traceback" not in bad.stderr
  usage = stage("copy", "a", "b")
  assert usage.returncode == 2 and "usage:" in usage.stderr
