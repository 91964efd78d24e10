"""The TFDS source of the input pipeline: which builder, built when missing.

The trainer reads any TFDS dataset with the features of `record3d` (`image`
uint8 [H,W,3], `depth` float32 meters [Hd,Wd], 0 invalid). This module finds
its builder, builds it once when it is not prepared (only the chief may), and
answers split sizes; `input_pipeline` turns its examples into tensors.

A prepared build is reused, and the log says which (path, built when, from
which manual folder). If `--manual_dir` is given and its files no longer
match the ones the build was made from, the run stops: training on stale
data without a word costs more than a rebuild (`--rebuild_dataset`).
"""

from typing import Optional

from absl import app
from absl import logging
import tensorflow_datasets as tfds

from trainer import errors

REBUILD_FLAG = "--rebuild_dataset"


class DatasetError(errors.UserInputError, app.UsageError):
  """The dataset setup is wrong; the message names the flag and what to do.

  A UserInputError for the trainer's entry points, and an absl UsageError
  like tfds_record3d.ManualInputError (which cannot depend on the trainer),
  so that any program run by `absl.app.run` prints it without a traceback.
  """

  def __init__(self, message: str):
    super().__init__(message)
    self.exitcode = 1  # UsageError's; ValueError.__init__ does not set it.


def _register_builders(dataset: str) -> None:
  if dataset.split("/")[0] == "record3d":
    import tfds_record3d  # pylint: disable=g-import-not-at-top,unused-import  # registers `record3d`


def get_builder(dataset: str, data_dir) -> tfds.core.DatasetBuilder:
  """The builder of `--dataset`; DatasetError for an unknown name or config.

  TFDS's own errors dump its whole catalogue for an unknown name, and a
  "closely matching" list that is often empty for an unknown config.
  """
  _register_builders(dataset)
  try:
    name, kwargs = tfds.core.naming.parse_builder_name_kwargs(dataset)
    builder_cls = tfds.builder_cls(str(name))
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetError(
        f"--dataset={dataset}: unknown dataset name {str(name)!r}. This project's dataset is "
        "record3d (record3d/synthetic, record3d/pairs, record3d/r3d); any other TFDS name "
        "with the same features works once installed") from None
  except ValueError as e:  # a malformed name
    raise DatasetError(f"--dataset={dataset}: {e}") from None
  configs = sorted(builder_cls.builder_configs)
  config = kwargs.get("config")
  if config is not None and configs and config not in configs:
    raise DatasetError(
        f"--dataset={dataset}: {name} has no config {config!r}; its configs are "
        + ", ".join(f"{name}/{c}" for c in configs))
  return tfds.builder(dataset, data_dir=data_dir)


def prepare_dataset(dataset: str, data_dir, manual_dir, may_build: bool,
                    rebuild: bool = False) -> tfds.core.DatasetBuilder:
  """Returns the builder, building the dataset first when it is missing.

  Only one process may build (`may_build`, the chief): several workers
  writing the same TFDS folder would corrupt it. `rebuild` replaces a
  prepared build; record3d keeps the old one until the new one is complete
  (bad input or a failed rebuild leave it as it was).

  Raises:
    DatasetError: unknown dataset, stale build, empty training split.
    tfds_record3d.ManualInputError: the manual input cannot be built.
  """
  builder = get_builder(dataset, data_dir)
  if builder.is_prepared() and not rebuild:
    _check_reused_build(builder, dataset, manual_dir)
    require_examples(builder, "train")
    return builder
  if not may_build:
    if rebuild:
      raise DatasetError(
          f"{REBUILD_FLAG} must run in one process: rebuild {dataset} with the chief alone "
          "(or `tfds build ... --overwrite`), then start the workers without it")
    raise FileNotFoundError(
        f"{dataset} is not prepared in {builder.data_dir} and only the chief may "
        "build it; prepare it first (`tfds build`, see README) or let the chief run alone")
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if rebuild and builder.is_prepared():
    # Overwrites the build, not the downloads (manual input is read in place).
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    logging.info("%s: rebuilding %s (%s) from %s", REBUILD_FLAG, builder.data_path,
                 _describe_origin(builder), manual_dir or "the default manual folder")
  else:
    logging.info("%s is not prepared in %s: building it now (this runs once).",
                 dataset, builder.data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
  builder.download_and_prepare(download_config=download_config)
  # A fresh builder reads the new build's info (splits, metadata) from disk.
  builder = get_builder(dataset, data_dir)
  logging.info("Built %s in %s, %s", dataset, builder.data_path, _describe_origin(builder))
  require_examples(builder, "train")
  return builder


def _provenance(builder) -> Optional[dict]:
  metadata = builder.info.metadata or {}
  return metadata.get("provenance")


def _describe_origin(builder) -> str:
  from tfds_record3d import provenance  # pylint: disable=g-import-not-at-top
  return provenance.describe(_provenance(builder))


def _check_reused_build(builder, dataset: str, manual_dir) -> None:
  """Logs which build is reused; DatasetError if `manual_dir` no longer matches it."""
  logging.info("Using the prepared %s in %s, %s", dataset, builder.data_path,
               _describe_origin(builder))
  if not manual_dir:
    return
  recorded = _provenance(builder)
  if not recorded or not recorded.get("fingerprint"):
    logging.warning(
        "--manual_dir=%s is ignored: the prepared %s in %s has no record of its input, so "
        "it cannot be compared; pass %s to rebuild it from --manual_dir.",
        manual_dir, dataset, builder.data_path, REBUILD_FLAG)
    return
  from tfds_record3d import provenance  # pylint: disable=g-import-not-at-top
  if not tfds.core.Path(manual_dir).expanduser().is_dir():
    raise DatasetError(f"--manual_dir={manual_dir} is not a folder (the prepared {dataset} "
                       f"in {builder.data_path} {provenance.describe(recorded)})")
  now = provenance.fingerprint(tfds.core.Path(manual_dir).expanduser())
  if now["digest"] == recorded["fingerprint"]["digest"]:
    if str(tfds.core.Path(manual_dir).expanduser().resolve()) != recorded["manual_dir"]:
      logging.info("--manual_dir=%s holds the same files the build was made from.", manual_dir)
    return
  was = recorded["fingerprint"]
  raise DatasetError(
      f"--manual_dir={manual_dir} no longer matches the prepared {dataset} in "
      f"{builder.data_path}, {provenance.describe(recorded)}; the folder now "
      f"holds {now['files']} files, {now['bytes'] / 1e6:.1f} MB (was {was['files']}, "
      f"{was['bytes'] / 1e6:.1f} MB; names, sizes or modification times changed). Pass "
      f"{REBUILD_FLAG} to rebuild it from --manual_dir (the current build is kept until the "
      "new one is complete), or drop --manual_dir to train on the existing build.")


def require_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """num_examples(split), refusing an empty split before any training starts."""
  count = num_examples(builder, split)
  if not count:
    raise DatasetError(
        f"split {split!r} of {builder.info.full_name} in {builder.data_path} has no examples: "
        f"nothing to train on. Add captures to the manual folder and pass {REBUILD_FLAG}.")
  return count


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} is not in {builder.info.full_name}: "
                     f"available {sorted(builder.info.splits)}")
  return builder.info.splits[split].num_examples
