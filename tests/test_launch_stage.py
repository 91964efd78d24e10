"""launch.stage / gcs_sync against a real local Cloud Storage server.

The server is gcp-storage-emulator (tests/gcs_server.py, conftest's
emulator_host), on 127.0.0.1 in its own process; google-cloud-storage reaches
it through STORAGE_EMULATOR_HOST with anonymous credentials. Nothing here talks to Google.
"""

import os
import subprocess
import sys
import uuid

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

import gcs_server
from launch import gcs_sync

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = gcs_server.BUCKET
KIB = 1024
MIB = 1024 * KIB
# google-cloud-storage sends files above 8 MiB as resumable uploads, in chunks.
RESUMABLE_SIZE = 9 * MIB


@pytest.fixture
def gcs(emulator_host, monkeypatch):
  """Points google-cloud-storage at the emulator; returns a client for it."""
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator_host)
  monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "depth2d-test")
  return storage.Client(project="depth2d-test", credentials=AnonymousCredentials())


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


def remote_contents(client, uri):
  location = gcs_sync.parse_gcs_path(uri)
  return {blob.name[len(location.prefix):]: blob.download_as_bytes()
          for blob in client.list_blobs(location.bucket, prefix=location.prefix)}


@pytest.mark.slow
def test_upload_then_rerun_skips_everything(tmp_path, gcs, prefix):
  files = make_tree(tmp_path / "data")
  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, workers=3, client=gcs)
  assert report.ok and sorted(report.transferred) == sorted(files) and not report.skipped
  assert remote_contents(gcs, prefix) == files

  again = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, workers=3, client=gcs)
  assert again.ok and not again.transferred and sorted(again.skipped) == sorted(files)


@pytest.mark.slow
def test_big_file_goes_through_resumable_upload_and_round_trips(tmp_path, gcs, prefix):
  files = make_tree(tmp_path / "data", count=2, big_size=RESUMABLE_SIZE)
  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client=gcs,
                                chunk_size=4 * MIB)
  assert report.ok
  out = tmp_path / "back"
  down = gcs_sync.download_tree(prefix, str(out), client=gcs)
  assert down.ok and sorted(down.transferred) == sorted(files)
  for relative, data in files.items():
    assert (out / relative).read_bytes() == data
  assert not list(out.rglob("*" + gcs_sync.PARTIAL_SUFFIX))
  # A second download finds everything in place.
  assert sorted(gcs_sync.download_tree(prefix, str(out), client=gcs).skipped) == sorted(files)


class _Http(requests.Session):
  """HTTP that notes (method, url) of every request and, with `uploads_allowed`,
  fails after that many upload requests, like a dropped network.

  It fails with RuntimeError, which the client does not retry (a
  ConnectionError would be retried until the retry deadline, minutes later).
  """

  def __init__(self, uploads_allowed=None):
    super().__init__()
    self.calls = []
    self._uploads_left = uploads_allowed

  def request(self, method, url, *args, **kwargs):  # pylint: disable=arguments-differ
    self.calls.append((method, url))
    if "/upload/" in url and self._uploads_left is not None:
      if self._uploads_left <= 0:
        raise RuntimeError("network gone (injected)")
      self._uploads_left -= 1
    return super().request(method, url, *args, **kwargs)


def client_over(http):
  return storage.Client(project="depth2d-test", credentials=AnonymousCredentials(), _http=http)


@pytest.mark.slow
def test_interrupted_upload_resumes_with_only_the_rest(tmp_path, gcs, prefix):
  files = make_tree(tmp_path / "data", count=8)
  # Small files: one multipart request each; with one worker, in order.
  first = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, workers=1,
                               client=client_over(_Http(uploads_allowed=3)))
  assert not first.ok and len(first.transferred) == 3 and len(first.failed) == 5
  assert all("injected" in error for _, error in first.failed)
  assert sorted(remote_contents(gcs, prefix)) == sorted(first.transferred)

  second = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, workers=4, client=gcs)
  assert second.ok
  assert sorted(second.skipped) == sorted(first.transferred)
  assert sorted(second.transferred) == sorted(name for name, _ in first.failed)
  assert remote_contents(gcs, prefix) == files


@pytest.mark.slow
def test_file_cut_off_mid_upload_leaves_no_object(tmp_path, gcs, prefix):
  files = make_tree(tmp_path / "data", count=0, big_size=RESUMABLE_SIZE)
  (relative,) = files
  # The resumable upload starts and its first 4 MiB chunk reaches the
  # server, then the network dies.
  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix,
                                client=client_over(_Http(uploads_allowed=2)), chunk_size=4 * MIB)
  assert [name for name, _ in report.failed] == [relative]
  assert "injected" in report.failed[0][1]
  assert remote_contents(gcs, prefix) == {}  # nothing a later run could take as complete

  assert gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client=gcs,
                              chunk_size=4 * MIB).ok
  assert remote_contents(gcs, prefix) == files


@pytest.mark.slow
@pytest.mark.parametrize("big", [False, True], ids=["multipart", "resumable"])
def test_file_changed_while_uploading_is_caught_and_removed(tmp_path, gcs, prefix,
                                                            monkeypatch, big):
  files = make_tree(tmp_path / "data", count=0 if big else 1,
                    big_size=RESUMABLE_SIZE if big else 0)
  (relative,) = files
  real_checksum = gcs_sync.crc32c_of_file

  def checksum_then_change(path):
    # The file changes right after we took its checksum: the bytes sent
    # are not the bytes that were checksummed.
    checksum = real_checksum(path)
    with open(path, "wb") as f:
      f.write(b"x" * len(files[relative]))
    return checksum

  monkeypatch.setattr(gcs_sync, "crc32c_of_file", checksum_then_change)
  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client=gcs,
                                chunk_size=4 * MIB)
  assert not report.ok and [name for name, _ in report.failed] == [relative]
  # Cloud Storage itself refuses a resumable upload whose declared CRC32C
  # does not match; the emulator does not, and then our check must catch it.
  assert "VerificationError" in report.failed[0][1] or "400" in report.failed[0][1]
  assert remote_contents(gcs, prefix) == {}


@pytest.mark.slow
def test_corrupted_remote_object_is_detected_and_replaced(tmp_path, gcs, prefix):
  files = make_tree(tmp_path / "data")
  assert gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client=gcs).ok
  victim = sorted(files)[2]
  location = gcs_sync.parse_gcs_path(prefix)
  blob = gcs.bucket(BUCKET).blob(location.object_name(victim))
  corrupted = bytearray(files[victim])
  corrupted[10] ^= 0xFF  # same size, one byte flipped
  blob.upload_from_string(bytes(corrupted))

  verified = gcs_sync.verify_tree(str(tmp_path / "data"), prefix, client=gcs)
  assert not verified.ok and verified.differing == [victim]

  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client=gcs)
  assert report.ok and report.replaced == [victim] and report.transferred == [victim]
  assert remote_contents(gcs, prefix) == files
  assert gcs_sync.verify_tree(str(tmp_path / "data"), prefix, client=gcs).ok


@pytest.mark.slow
def test_uploads_carry_generation_preconditions(tmp_path, gcs, prefix):
  # The emulator does not enforce preconditions, so check what is sent.
  files = make_tree(tmp_path / "data", count=2)
  assert gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client=gcs).ok
  victim = sorted(files)[0]
  location = gcs_sync.parse_gcs_path(prefix)
  blob = gcs.bucket(BUCKET).blob(location.object_name(victim))
  blob.upload_from_string(b"changed elsewhere")
  http = _Http()
  report = gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client=client_over(http))
  assert report.ok and report.replaced == [victim]
  writes = [(method, url) for method, url in http.calls if method in ("POST", "DELETE")]
  assert len(writes) == 2, writes
  (delete, delete_url), (post, post_url) = writes
  # The differing object goes only if it still is the generation we compared...
  assert delete == "DELETE" and f"ifGenerationMatch={blob.generation}" in delete_url
  # ... and the new one is created only if nothing took the name meanwhile.
  assert post == "POST" and "ifGenerationMatch=0" in post_url
  assert remote_contents(gcs, prefix) == files


@pytest.mark.slow
def test_download_replaces_a_damaged_local_copy(tmp_path, gcs, prefix):
  files = make_tree(tmp_path / "data", count=3)
  assert gcs_sync.upload_tree(str(tmp_path / "data"), prefix, client=gcs).ok
  out = tmp_path / "back"
  assert gcs_sync.download_tree(prefix, str(out), client=gcs).ok
  damaged = sorted(files)[0]
  (out / damaged).write_bytes(b"garbage")
  report = gcs_sync.download_tree(prefix, str(out), client=gcs)
  assert report.replaced == [damaged] and len(report.skipped) == 2
  assert (out / damaged).read_bytes() == files[damaged]


@pytest.mark.parametrize("uri", ["/tmp/x", "s3://bucket/x", "gs://", "gs:///x", "bucket/x"])
def test_non_gcs_paths_are_rejected(uri):
  with pytest.raises(ValueError, match="gs://BUCKET/PREFIX"):
    gcs_sync.parse_gcs_path(uri)


@pytest.mark.slow
def test_cli_round_trip_and_errors(tmp_path, emulator_host, prefix):
  files = make_tree(tmp_path / "data", count=3)
  env = dict(os.environ, STORAGE_EMULATOR_HOST=emulator_host, GOOGLE_CLOUD_PROJECT="t")

  def stage(*args):
    return subprocess.run([sys.executable, "-m", "launch.stage", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)

  up = stage("upload", str(tmp_path / "data"), prefix)
  assert up.returncode == 0, up.stderr
  # The progress line (trainer.progress.Progress) ends with the file count.
  assert "3 transferred" in up.stdout and "3/3 files" in up.stderr
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
