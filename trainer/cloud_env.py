"""Where the trainer writes when Vertex AI (or the user) decides.

Vertex AI custom jobs with a `base_output_dir` tell the container where to
write through environment variables (the job spec's
`baseOutputDirectory` becomes):

  AIP_MODEL_DIR            <base>/model/
  AIP_CHECKPOINT_DIR       <base>/checkpoints/
  AIP_TENSORBOARD_LOG_DIR  <base>/logs/

(for hyperparameter-tuning trials `<base>/<trial id>/...`). Vertex also sets
CLOUD_ML_JOB_ID and CLOUD_ML_PROJECT_ID in every replica. An explicit flag
always wins, so the same image runs locally, on a TPU VM and on Vertex.
"""

import dataclasses
import os
from typing import Mapping, Optional

MODEL_DIR_ENV = "AIP_MODEL_DIR"
CHECKPOINT_DIR_ENV = "AIP_CHECKPOINT_DIR"
TENSORBOARD_DIR_ENV = "AIP_TENSORBOARD_LOG_DIR"


@dataclasses.dataclass(frozen=True)
class OutputDirs:
  """The trainer's output locations; checkpoint/tensorboard None = derive per stage."""
  model_dir: str
  checkpoint_dir: Optional[str]
  tensorboard_dir: Optional[str]


def _first_set(flag_value: Optional[str], environ: Mapping[str, str],
               env_name: str) -> Optional[str]:
  """The flag if given, else the environment variable; empty strings count as unset."""
  if flag_value:
    return flag_value
  value = environ.get(env_name, "").strip()
  return value or None


def _strip_trailing_slash(path: Optional[str]) -> Optional[str]:
  # Vertex hands out "gs://b/out/model/"; os.path.join and the trainer's
  # per-stage derivation (`<model_dir>/<stage>/...`) want no trailing slash.
  # "gs://" alone or "/" must survive.
  if path is None:
    return None
  stripped = path.rstrip("/")
  return stripped if stripped and not stripped.endswith(":") else path


def resolve_output_dirs(model_dir: Optional[str],
                        checkpoint_dir: Optional[str],
                        tensorboard_dir: Optional[str],
                        environ: Optional[Mapping[str, str]] = None) -> OutputDirs:
  """Flags first, then Vertex AI's AIP_* variables.

  Args:
    model_dir: value of --model_dir (None or "" when not given).
    checkpoint_dir: value of --checkpoint_dir (None or "" when not given).
    tensorboard_dir: value of --tensorboard_dir (None or "" when not given).
    environ: the environment; os.environ by default.

  Returns:
    OutputDirs. checkpoint_dir and tensorboard_dir stay None when neither a
    flag nor Vertex names them: the trainer then puts them under
    `<model_dir>/<stage>/`. The AIP_* directories are job-wide, not
    per stage: a trainer that runs several stages in one job should put
    each stage in its own subdirectory of them so checkpoints do not mix.

  Raises:
    ValueError: neither --model_dir nor AIP_MODEL_DIR is set.
  """
  environ = os.environ if environ is None else environ
  resolved_model_dir = _first_set(model_dir, environ, MODEL_DIR_ENV)
  if resolved_model_dir is None:
    raise ValueError(
        f"no model directory: pass --model_dir=PATH (local or gs://), or run "
        f"where {MODEL_DIR_ENV} is set (Vertex AI sets it from the job's "
        f"base_output_dir)")
  return OutputDirs(
      model_dir=_strip_trailing_slash(resolved_model_dir),
      checkpoint_dir=_strip_trailing_slash(
          _first_set(checkpoint_dir, environ, CHECKPOINT_DIR_ENV)),
      tensorboard_dir=_strip_trailing_slash(
          _first_set(tensorboard_dir, environ, TENSORBOARD_DIR_ENV)),
  )
