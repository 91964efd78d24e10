"""Copies directory trees to and from Cloud Storage, safely and incrementally.

Used by `python -m launch.stage` to put a manual data folder or a prepared
TFDS directory on gs:// and to bring exports back.

Who does what: we decide what to send (listing, CRC32C comparison) and check
what arrived; google-cloud-storage's `transfer_manager` moves the bytes,
`--workers` files at a time. How each promise is kept:
  * Parallel: `transfer_manager.upload_many` / `download_many` with thread
    workers (I/O bound; threads also hand back the updated Blob objects the
    checks below read, which process workers would not). The threads share
    one client; above 10 workers urllib3 warns that its connection pool is
    full and opens the extra connections anyway.
  * Skips what is already there: a file is skipped when the object's CRC32C
    (or MD5 when an object has no CRC32C) equals the local file's. Ours:
    transfer_manager's `skip_if_exists` only looks at names, so a damaged or
    stale object would be kept.
  * Resumes after interruption: at file granularity, because the next run
    skips the files that arrived intact. Big files use resumable uploads, so
    one dropped connection retries a chunk, not the whole file (the client
    library uploads files above 8 MiB that way).
  * No half-written objects: a Cloud Storage object only comes into
    existence when its upload is finalised; an interrupted upload leaves
    nothing under the name. Each Blob carries the file's CRC32C as metadata,
    so for resumable uploads the service refuses to finalise bytes that do
    not match (multipart uploads send the checksum of the bytes they sent).
    Every upload is a creation with a generation precondition
    (`if_generation_match=0`), so two runs cannot silently overwrite each
    other. transfer_manager takes one set of upload arguments for all files,
    so it cannot carry a per-file precondition for a replacement; an object
    that differs is therefore first deleted with `if_generation_match` set to
    the generation we listed (which fails if another run changed it in
    between), then created like a new one. Writing to a temporary name and
    then copying would double the traffic for no extra safety.
  * Verifies what it wrote (ours; transfer_manager does not): after each
    upload the CRC32C the service reports for the stored object is compared
    with the checksum taken before the upload; on a mismatch (e.g. the file
    changed while it was read) the object is deleted again and the file
    reported as failed, so no later run can take it as complete.
  * Downloads go to a temporary file beside the target (pinned to the listed
    generation), are checked against the object's checksum by us (the
    library skips its own check when the service sends no hash), then
    renamed into place (atomic on POSIX).
"""

import base64
import concurrent.futures
import dataclasses
import hashlib
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
import google_crc32c

from trainer import progress as progress_lib

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


def default_client():
  # Imported here so the module loads without google-cloud-storage's import
  # cost when only parsing paths. The client honours STORAGE_EMULATOR_HOST
  # (anonymous credentials then).
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  return storage.Client()


def _transfer_manager():
  from google.cloud.storage import transfer_manager  # pylint: disable=g-import-not-at-top
  return transfer_manager


# How often the progress line may be logged while transfer_manager works.
_PROGRESS_SECONDS = 2.0


def _run_with_progress(direction: str, transfer: Callable[[], list], total_files: int,
                       total_bytes: int, done: Callable[[], Tuple[int, int]]) -> list:
  """Runs a blocking transfer_manager call, logging progress while it works.

  transfer_manager reports nothing until every file is done, so this thread
  polls `done` -> (bytes, files) while the call runs in another one.
  """
  progress = progress_lib.Progress(direction, total_bytes, unit="",
                                   format_amount=progress_lib.format_mib,
                                   every_seconds=_PROGRESS_SECONDS)

  def update(force=False):
    nbytes, files = done()
    progress.update(done=nbytes, suffix=f"{files}/{total_files} files", force=force)

  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as runner:
    future = runner.submit(transfer)
    while True:
      try:
        results = future.result(timeout=_PROGRESS_SECONDS / 2)
        break
      except concurrent.futures.TimeoutError:
        update()
  update(force=True)
  return results


def _record(report: SyncReport, relative: str, size: int, error: Optional[Exception]) -> None:
  if error is None:
    report.transferred.append(relative)
    report.bytes_transferred += size
    return
  # Keep going: every other file that arrives is one less for the rerun.
  logging.error("%s: %s: %s", relative, type(error).__name__, error)
  report.failed.append((relative, f"{type(error).__name__}: {error}"))


def _log_plan(direction: str, count: int, nbytes: int, report: SyncReport) -> None:
  logging.info("%s: %d files to transfer (%.1f MiB), %d already identical", direction,
               count, nbytes / 2**20, len(report.skipped))


@dataclasses.dataclass
class _Upload:
  relative: str
  local: LocalFile
  crc32c: str  # of the file, taken before the upload
  blob: object  # google.cloud.storage.Blob; holds the stored object's metadata afterwards


def _check_stored(location: GcsPath, upload: _Upload) -> None:
  """Raises VerificationError (after deleting the object) unless it holds the file."""
  blob = upload.blob
  # The upload response carries the stored object's metadata as computed by
  # the service over the bytes it kept.
  if blob.crc32c is None:
    blob.reload()
  if blob.crc32c != upload.crc32c or int(blob.size or 0) != upload.local.size:
    stored = (blob.crc32c, blob.size)
    blob.delete(if_generation_match=blob.generation)
    raise VerificationError(
        f"gs://{location.bucket}/{blob.name}: stored crc32c {stored[0]} / {stored[1]} bytes "
        f"!= local {upload.crc32c} / {upload.local.size} bytes (file changed while "
        "uploading?); deleted the object")


def _upload_all(location: GcsPath, uploads: Sequence[_Upload], workers: int,
                report: SyncReport) -> None:
  transfer_manager = _transfer_manager()

  def transfer():
    return transfer_manager.upload_many(
        [(upload.local.path, upload.blob) for upload in uploads],
        upload_kwargs={"if_generation_match": 0, "checksum": "crc32c"},
        worker_type=transfer_manager.THREAD, max_workers=workers, raise_exception=False)

  def done():
    # A Blob gets its generation from the upload response, i.e. once stored.
    stored = [u.local.size for u in uploads if u.blob.generation is not None]
    return sum(stored), len(stored)

  results = _run_with_progress("upload", transfer, len(uploads),
                               sum(u.local.size for u in uploads), done)
  for upload, result in zip(uploads, results):
    error = result if isinstance(result, Exception) else None
    if error is None:
      try:
        _check_stored(location, upload)
      except Exception as e:  # pylint: disable=broad-except
        error = e
    _record(report, upload.relative, upload.local.size, error)


def upload_tree(local_root: str, destination: str, workers: int = 8, client=None,
                resumable_threshold: int = 8 * 2**20, chunk_size: int = 16 * 2**20
                ) -> SyncReport:
  """Uploads every file under local_root to destination (gs://BUCKET/PREFIX).

  `client`: a google.cloud.storage.Client (default: application-default
  credentials, or the emulator named by STORAGE_EMULATOR_HOST).
  """
  location = parse_gcs_path(destination, "destination")
  if chunk_size % (256 * 1024):
    raise ValueError("chunk_size must be a multiple of 256 KiB (a Cloud Storage rule)")
  local_files = list_local(local_root)
  client = client or default_client()
  bucket = client.bucket(location.bucket)
  remote = list_remote(client, location)
  report = SyncReport()

  logging.info("upload: %d local files under %s, %d objects under %s; comparing checksums",
               len(local_files), local_root, len(remote), location)
  uploads = []
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
      try:
        # Only the generation we compared: a newer one is another run's.
        bucket.blob(existing.name).delete(if_generation_match=existing.generation)
      except Exception as e:  # pylint: disable=broad-except
        _record(report, relative, local.size, e)
        continue
    # The client library itself sends a file of up to 8 MiB in one multipart
    # request and a larger one as a resumable upload, whatever the threshold;
    # the chunk size decides how much a retry of a resumable upload re-sends.
    blob = bucket.blob(location.object_name(relative),
                       chunk_size=chunk_size if local.size > resumable_threshold else None)
    blob.crc32c = local_crc  # sent as the object's metadata: see the module docstring
    uploads.append(_Upload(relative, local, local_crc, blob))

  _log_plan("upload", len(uploads), sum(u.local.size for u in uploads), report)
  if uploads:
    _upload_all(location, uploads, workers, report)
  return report


def _partial_bytes(path: str, size: int) -> int:
  try:
    return min(os.path.getsize(path), size)
  except OSError:  # not started yet
    return 0


def download_tree(source: str, local_root: str, workers: int = 8, client=None) -> SyncReport:
  """Downloads every object under source (gs://BUCKET/PREFIX) into local_root."""
  location = parse_gcs_path(source, "source")
  client = client or default_client()
  bucket = client.bucket(location.bucket)
  remote = list_remote(client, location)
  if not remote:
    raise ValueError(f"nothing under {location}")
  report = SyncReport()
  downloads = []  # (relative, object, target)
  for relative, obj in sorted(remote.items()):
    target = os.path.join(local_root, *relative.split("/"))
    if os.path.isfile(target):
      if same_content(target, os.path.getsize(target), obj):
        report.skipped.append(relative)
        continue
      report.replaced.append(relative)
    downloads.append((relative, obj, target))

  _log_plan("download", len(downloads), sum(obj.size for _, obj, _ in downloads), report)
  if not downloads:
    return report
  for _, _, target in downloads:
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
  transfer_manager = _transfer_manager()

  def transfer():
    return transfer_manager.download_many(
        [(bucket.blob(obj.name, generation=obj.generation), target + PARTIAL_SUFFIX)
         for _, obj, target in downloads],
        # We check every file ourselves below, whatever the service sends.
        download_kwargs={"checksum": None},
        worker_type=transfer_manager.THREAD, max_workers=workers, raise_exception=False)

  def done():
    # The temporary files grow as the bytes arrive; a full-size one is done.
    arrived = [(_partial_bytes(target + PARTIAL_SUFFIX, obj.size), obj.size)
               for _, obj, target in downloads]
    return sum(n for n, _ in arrived), sum(1 for n, size in arrived if n == size)

  try:
    results = _run_with_progress("download", transfer, len(downloads),
                                 sum(obj.size for _, obj, _ in downloads), done)
    for (relative, obj, target), result in zip(downloads, results):
      error = result if isinstance(result, Exception) else None
      partial = target + PARTIAL_SUFFIX
      if error is None and not same_content(partial, os.path.getsize(partial), obj):
        error = VerificationError(f"gs://{location.bucket}/{obj.name}: downloaded bytes "
                                  "do not match the object's checksum")
      if error is None:
        os.replace(partial, target)
      _record(report, relative, obj.size, error)
  finally:
    for _, _, target in downloads:
      if os.path.exists(target + PARTIAL_SUFFIX):
        os.remove(target + PARTIAL_SUFFIX)
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


def verify_tree(local_root: str, destination: str, client=None) -> VerifyReport:
  """Compares a local tree with gs:// by checksum, changing nothing."""
  location = parse_gcs_path(destination, "destination")
  local_files = list_local(local_root)
  remote = list_remote(client or default_client(), location)
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
