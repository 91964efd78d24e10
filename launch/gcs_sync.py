"""Copies directory trees to and from Cloud Storage, safely and incrementally.

Used by `python -m launch.stage` to put a manual data folder or a prepared
TFDS directory on gs:// and to bring exports back.

How each promise is kept:
  * Parallel: one thread per transfer (I/O bound), each with its own client.
  * Skips what is already there: a file is skipped when the object's CRC32C
    (or MD5 when an object has no CRC32C) equals the local file's.
  * Resumes after interruption: at file granularity, because the next run
    skips the files that arrived intact. Big files use resumable uploads, so
    one dropped connection retries a chunk, not the whole file.
  * No half-written objects: a Cloud Storage object only comes into
    existence when its upload is finalised; an interrupted upload leaves
    nothing (or the old object) under the name. We also declare the
    whole-file CRC32C when starting a resumable upload so the service
    refuses to finalise bytes that do not match, and we upload with a
    generation precondition (`if_generation_match`: 0 for a new object, the
    listed generation for a replacement) so two runs cannot silently
    overwrite each other. Writing to a temporary name and then copying
    would double the traffic for no extra safety.
  * Verifies what it wrote: after each upload the CRC32C the service
    reports for the stored object is compared with the local file's; on a
    mismatch (e.g. the file changed while it was read) the object is
    deleted again and the file reported as failed, so no later run can take
    it as complete.
  * Downloads go to a temporary file beside the target, are checked
    against the object's CRC32C, then renamed into place (atomic on POSIX).
"""

import base64
import concurrent.futures
import dataclasses
import hashlib
import os
import threading
from typing import Callable, Dict, List, Optional, Tuple

from absl import logging
import google_crc32c

from launch import progress as progress_lib

_READ_BLOCK = 4 * 2**20
# Suffix of the temporary files downloads write; never uploaded.
PARTIAL_SUFFIX = ".depth2d-partial"


class VerificationError(Exception):
  """The bytes stored (or fetched) are not the bytes of the local file."""


@dataclasses.dataclass(frozen=True)
class GcsPath:
  bucket: str
  prefix: str  # "" or ends with "/"

  def object_name(self, relative_path: str) -> str:
    return self.prefix + relative_path

  def __str__(self) -> str:
    return f"gs://{self.bucket}/{self.prefix}"


def parse_gcs_path(uri: str, what: str = "path") -> GcsPath:
  """gs://BUCKET[/PREFIX] -> GcsPath; anything else is a ValueError."""
  if not uri.startswith("gs://"):
    raise ValueError(f"{what} {uri!r} is not a Cloud Storage path: use gs://BUCKET/PREFIX")
  bucket, _, prefix = uri[len("gs://"):].partition("/")
  if not bucket:
    raise ValueError(f"{what} {uri!r} names no bucket: use gs://BUCKET/PREFIX")
  prefix = prefix.strip("/")
  return GcsPath(bucket, prefix + "/" if prefix else "")


@dataclasses.dataclass(frozen=True)
class RemoteObject:
  name: str
  size: int
  crc32c: Optional[str]  # base64, as GCS reports it
  md5_hash: Optional[str]  # base64; absent on composite objects
  generation: int


@dataclasses.dataclass(frozen=True)
class LocalFile:
  path: str
  size: int


@dataclasses.dataclass
class SyncReport:
  """What a run did; `ok` is False when anything is left to do."""
  transferred: List[str] = dataclasses.field(default_factory=list)
  skipped: List[str] = dataclasses.field(default_factory=list)
  # Remote and local both existed but differed (changed or corrupted copy).
  replaced: List[str] = dataclasses.field(default_factory=list)
  failed: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
  bytes_transferred: int = 0

  @property
  def ok(self) -> bool:
    return not self.failed


def crc32c_of_file(path: str) -> str:
  checksum = google_crc32c.Checksum()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_READ_BLOCK), b""):
      checksum.update(block)
  return base64.b64encode(checksum.digest()).decode("ascii")


def md5_of_file(path: str) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_READ_BLOCK), b""):
      digest.update(block)
  return base64.b64encode(digest.digest()).decode("ascii")


def same_content(local_path: str, local_size: int, remote: RemoteObject,
                 local_crc32c: Optional[str] = None) -> bool:
  """Whether the object holds the local file's bytes (size, then checksum)."""
  if remote.size != local_size:
    return False
  if remote.crc32c:
    return (local_crc32c or crc32c_of_file(local_path)) == remote.crc32c
  if remote.md5_hash:
    return md5_of_file(local_path) == remote.md5_hash
  return False  # nothing to compare: transfer again rather than trust it


def list_local(root: str) -> Dict[str, LocalFile]:
  """relative posix path -> LocalFile for every regular file under root."""
  if not os.path.isdir(root):
    raise ValueError(f"local directory {root!r} does not exist")
  files = {}
  for directory, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      if name.endswith(PARTIAL_SUFFIX):
        continue
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        continue  # sockets, broken links
      relative = os.path.relpath(path, root).replace(os.sep, "/")
      files[relative] = LocalFile(path, os.path.getsize(path))
  return files


def list_remote(client, location: GcsPath) -> Dict[str, RemoteObject]:
  """relative path -> RemoteObject for every object under the prefix."""
  objects = {}
  for blob in client.list_blobs(location.bucket, prefix=location.prefix):
    if blob.name.endswith("/"):
      continue  # "folder" placeholder objects made by the console
    objects[blob.name[len(location.prefix):]] = RemoteObject(
        blob.name, int(blob.size or 0), blob.crc32c, blob.md5_hash, int(blob.generation))
  return objects


def default_client_factory():
  # Imported here so the module loads without google-cloud-storage's import
  # cost when only parsing paths. The client honours STORAGE_EMULATOR_HOST
  # (anonymous credentials then).
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  return storage.Client()


class _PerThreadClient:
  """One storage client per worker thread (HTTP sessions are not shared)."""

  def __init__(self, factory: Callable[[], object]):
    self._factory = factory
    self._local = threading.local()

  def get(self):
    if not hasattr(self._local, "client"):
      self._local.client = self._factory()
    return self._local.client


def _open_for_upload(path: str):
  # A seam for tests that interrupt an upload part-way through a file.
  return open(path, "rb")


def upload_file(client, location: GcsPath, relative: str, local: LocalFile,
                local_crc32c: str, existing: Optional[RemoteObject],
                resumable_threshold: int, chunk_size: int) -> None:
  """Uploads one file under the rules in the module docstring; raises on failure."""
  bucket = client.bucket(location.bucket)
  # A chunk size makes the client use a resumable upload for this object.
  blob = bucket.blob(location.object_name(relative),
                     chunk_size=chunk_size if local.size > resumable_threshold else None)
  with _open_for_upload(local.path) as stream:
    blob.upload_from_file(
        stream, size=local.size, rewind=False,
        if_generation_match=existing.generation if existing else 0,
        checksum="crc32c",
        crc32c_checksum_value=local_crc32c)
  # The upload response carries the stored object's metadata as computed by
  # the service over the bytes it kept.
  stored = blob.crc32c
  if stored is None:
    blob.reload()
    stored = blob.crc32c
  if stored != local_crc32c or int(blob.size or 0) != local.size:
    blob.delete(if_generation_match=blob.generation)
    raise VerificationError(
        f"gs://{location.bucket}/{blob.name}: stored crc32c {stored} / {blob.size} bytes "
        f"!= local {local_crc32c} / {local.size} bytes (file changed while uploading?); "
        "deleted the object")


def download_file(client, location: GcsPath, remote: RemoteObject, target: str) -> None:
  """Downloads one object to a temporary file, checks it, renames it into place."""
  os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
  partial = target + PARTIAL_SUFFIX
  blob = client.bucket(location.bucket).blob(remote.name, generation=remote.generation)
  try:
    blob.download_to_filename(partial, checksum=None)  # we check below, for any size
    local_size = os.path.getsize(partial)
    if not same_content(partial, local_size, remote):
      raise VerificationError(
          f"gs://{location.bucket}/{remote.name}: downloaded bytes do not match the "
          f"object's checksum")
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _run_parallel(direction: str, jobs, workers: int, report: SyncReport) -> None:
  """jobs: list of (relative, size, callable), run `workers` at a time with a
  progress line; failures are recorded in `report`, not raised."""
  total_bytes = sum(size for _, size, _ in jobs)
  logging.info("%s: %d files to transfer (%.1f MiB), %d already identical", direction,
               len(jobs), total_bytes / 2**20, len(report.skipped))
  if not jobs:
    return
  progress = progress_lib.TransferProgress(direction, len(jobs), total_bytes)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {pool.submit(fn): (relative, size) for relative, size, fn in jobs}
    for future in concurrent.futures.as_completed(futures):
      relative, size = futures[future]
      try:
        future.result()
      except Exception as e:  # pylint: disable=broad-except
        # Keep going: every other file that arrives is one less for the rerun.
        logging.error("%s: %s: %s", relative, type(e).__name__, e)
        report.failed.append((relative, f"{type(e).__name__}: {e}"))
        progress.add(0)
        continue
      report.transferred.append(relative)
      report.bytes_transferred += size
      progress.add(size)


def upload_tree(local_root: str, destination: str, workers: int = 8,
                client_factory: Callable[[], object] = default_client_factory,
                resumable_threshold: int = 8 * 2**20, chunk_size: int = 16 * 2**20
                ) -> SyncReport:
  """Uploads every file under local_root to destination (gs://BUCKET/PREFIX)."""
  location = parse_gcs_path(destination, "destination")
  if chunk_size % (256 * 1024):
    raise ValueError("chunk_size must be a multiple of 256 KiB (a Cloud Storage rule)")
  local_files = list_local(local_root)
  clients = _PerThreadClient(client_factory)
  remote = list_remote(clients.get(), location)
  report = SyncReport()

  logging.info("upload: %d local files under %s, %d objects under %s; comparing checksums",
               len(local_files), local_root, len(remote), location)
  jobs = []
  for relative, local in local_files.items():
    local_crc = crc32c_of_file(local.path)
    existing = remote.get(relative)
    if existing is not None:
      if same_content(local.path, local.size, existing, local_crc):
        report.skipped.append(relative)
        continue
      report.replaced.append(relative)
      logging.warning("%s differs from %s (size %d vs %d, crc32c %s vs %s); re-uploading",
                      relative, existing.name, local.size, existing.size, local_crc,
                      existing.crc32c)

    def job(relative=relative, local=local, local_crc=local_crc, existing=existing):
      upload_file(clients.get(), location, relative, local, local_crc, existing,
                  resumable_threshold, chunk_size)

    jobs.append((relative, local.size, job))

  _run_parallel("upload", jobs, workers, report)
  return report


def download_tree(source: str, local_root: str, workers: int = 8,
                  client_factory: Callable[[], object] = default_client_factory
                  ) -> SyncReport:
  """Downloads every object under source (gs://BUCKET/PREFIX) into local_root."""
  location = parse_gcs_path(source, "source")
  clients = _PerThreadClient(client_factory)
  remote = list_remote(clients.get(), location)
  if not remote:
    raise ValueError(f"nothing under {location}")
  report = SyncReport()
  jobs = []
  for relative, obj in sorted(remote.items()):
    target = os.path.join(local_root, *relative.split("/"))
    if os.path.isfile(target):
      if same_content(target, os.path.getsize(target), obj):
        report.skipped.append(relative)
        continue
      report.replaced.append(relative)

    def job(obj=obj, target=target):
      download_file(clients.get(), location, obj, target)

    jobs.append((relative, obj.size, job))
  _run_parallel("download", jobs, workers, report)
  return report


@dataclasses.dataclass
class VerifyReport:
  matching: List[str] = dataclasses.field(default_factory=list)
  missing: List[str] = dataclasses.field(default_factory=list)  # local only
  differing: List[str] = dataclasses.field(default_factory=list)
  extra: List[str] = dataclasses.field(default_factory=list)  # remote only

  @property
  def ok(self) -> bool:
    return not self.missing and not self.differing


def verify_tree(local_root: str, destination: str,
                client_factory: Callable[[], object] = default_client_factory) -> VerifyReport:
  """Compares a local tree with gs:// by checksum, changing nothing."""
  location = parse_gcs_path(destination, "destination")
  local_files = list_local(local_root)
  remote = list_remote(client_factory(), location)
  report = VerifyReport()
  for relative, local in local_files.items():
    obj = remote.get(relative)
    if obj is None:
      report.missing.append(relative)
    elif same_content(local.path, local.size, obj):
      report.matching.append(relative)
    else:
      report.differing.append(relative)
  report.extra = sorted(set(remote) - set(local_files))
  return report
