r"""Stages data to Cloud Storage and brings results back.

  python -m launch.stage upload LOCAL_DIR gs://BUCKET/PREFIX
  python -m launch.stage download gs://BUCKET/PREFIX LOCAL_DIR
  python -m launch.stage verify LOCAL_DIR gs://BUCKET/PREFIX

`upload` sends a manual data folder (e.g. the Record3D exports that
`record3d/pairs` or `record3d/r3d` read) or a prepared TFDS directory
(~/tensorflow_datasets/record3d) so the trainer can use
`--data_dir=gs://...` directly. It runs in parallel, skips files whose
CRC32C already matches the object, can simply be rerun after an
interruption (only what is missing or different is sent), and checks every
object it wrote. `download` fetches exports or checkpoints the same way.
`verify` compares without changing anything (exit code 1 on a difference).

Credentials: the application-default ones (`gcloud auth application-default
login`, or the VM's service account). With STORAGE_EMULATOR_HOST set, talks
to that emulator anonymously.
"""

import sys
from typing import List

from absl import app
from absl import flags
from absl import logging

from launch import gcs_sync

FLAGS = flags.FLAGS

flags.DEFINE_integer("workers", 8, "Files transferred at once.")
flags.DEFINE_integer("resumable_threshold_mb", 8, "Files larger than this are sent in "
                     "--chunk_size_mb pieces, each retried on its own. (google-cloud-storage "
                     "sends files up to 8 MiB in one request and larger ones as resumable "
                     "uploads, whatever this says.)")
flags.DEFINE_integer("chunk_size_mb", 16, "Chunk of a resumable upload (MiB).")

USAGE = ("usage: python -m launch.stage upload LOCAL_DIR gs://BUCKET/PREFIX\n"
         "       python -m launch.stage download gs://BUCKET/PREFIX LOCAL_DIR\n"
         "       python -m launch.stage verify LOCAL_DIR gs://BUCKET/PREFIX")


def _print_sync(command: str, report: gcs_sync.SyncReport) -> int:
  print(f"{command}: {len(report.transferred)} transferred "
        f"({report.bytes_transferred / 2**20:.1f} MiB), {len(report.skipped)} already "
        f"up to date, {len(report.replaced)} replaced because they differed, "
        f"{len(report.failed)} failed")
  for relative in report.replaced:
    print(f"  differed (replaced): {relative}")
  for relative, error in report.failed:
    print(f"  FAILED: {relative}: {error}")
  if report.failed:
    print(f"{command}: rerun the same command to transfer the rest")
  return 0 if report.ok else 1


def main(argv: List[str]) -> int:
  args = argv[1:]
  if len(args) != 3 or args[0] not in ("upload", "download", "verify"):
    print(USAGE, file=sys.stderr)
    return 2
  command, first, second = args
  if FLAGS.workers < 1:
    print("launch.stage: error: --workers must be >= 1", file=sys.stderr)
    return 2
  try:
    if command == "upload":
      report = gcs_sync.upload_tree(
          first, second, workers=FLAGS.workers,
          resumable_threshold=FLAGS.resumable_threshold_mb * 2**20,
          chunk_size=FLAGS.chunk_size_mb * 2**20)
      return _print_sync(command, report)
    if command == "download":
      return _print_sync(command, gcs_sync.download_tree(first, second, workers=FLAGS.workers))
    verified = gcs_sync.verify_tree(first, second)
  except ValueError as e:
    print(f"launch.stage: error: {e}", file=sys.stderr)
    return 2
  print(f"verify: {len(verified.matching)} match, {len(verified.missing)} missing, "
        f"{len(verified.differing)} differ, {len(verified.extra)} only in Cloud Storage")
  for relative in verified.missing:
    print(f"  missing: {relative}")
  for relative in verified.differing:
    print(f"  DIFFERS: {relative}")
  return 0 if verified.ok else 1


def run():
  logging.set_verbosity(logging.INFO)
  app.run(main)


if __name__ == "__main__":
  run()
