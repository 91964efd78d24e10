"""Is this builder being made by `tfds build --overwrite`, and with which manual input?

The `tfds build` command line (tensorflow_datasets/scripts/cli/build.py,
`_make_builder`) constructs the builder, and with `--overwrite` deletes its
prepared folder right away (`builder.data_path.rmtree()`): before
`download_and_prepare`, so before any check there. The only builder code that
runs earlier is `__init__`, which is not told about the command line. This
module finds the CLI's own frames on the call stack and asks the CLI's own
`_make_download_config` for the manual folder, so the builder can validate it
in `__init__` and fail before the deletion.

Tied to the CLI's private names on purpose: should TFDS rename them, this
returns None (no early check) and tests/test_record3d_reliability.py, which
runs the real CLI, fails and says so.
"""

from __future__ import annotations

import sys
from typing import Optional

from tensorflow_datasets.core import download

_CLI_MODULE = "tensorflow_datasets.scripts.cli.build"


def overwrite_download_config(dataset_name: str) -> Optional[tuple]:
  """(download_dir, DownloadConfig) the CLI will use, if the caller is the CLI's
  `_make_builder` with overwrite=True; None otherwise."""
  frame = sys._getframe(1)  # pylint: disable=protected-access
  try:
    while frame is not None and not _is_cli_make_builder(frame):
      frame = frame.f_back
    if frame is None or not frame.f_locals.get("overwrite"):
      return None
    cli = sys.modules[_CLI_MODULE]
    while frame is not None and not isinstance(frame.f_locals.get("args"), cli.Args):
      frame = frame.f_back  # up to `_make_builders(args, ...)`
    if frame is None:
      return None
    args = frame.f_locals["args"]
    # pylint: disable-next=protected-access
    config: download.DownloadConfig = cli._make_download_config(args, dataset_name=dataset_name)
    return args.paths.download_dir, config
  finally:
    del frame  # frames reference their locals: do not keep them alive


def _is_cli_make_builder(frame) -> bool:
  return frame.f_code.co_name == "_make_builder" and frame.f_globals.get("__name__") == _CLI_MODULE
