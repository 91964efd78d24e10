"""trainer.cloud_env: flags win over Vertex AI's AIP_* directories."""

import pytest

from trainer import cloud_env

VERTEX_ENV = {
    "AIP_MODEL_DIR": "gs://bucket/run1/model/",
    "AIP_CHECKPOINT_DIR": "gs://bucket/run1/checkpoints/",
    "AIP_TENSORBOARD_LOG_DIR": "gs://bucket/run1/logs/",
    "CLOUD_ML_JOB_ID": "1234567890",
}


def test_flags_win_over_vertex_environment():
  dirs = cloud_env.resolve_output_dirs("/tmp/m", "/tmp/c", "/tmp/t", environ=VERTEX_ENV)
  assert dirs == cloud_env.OutputDirs("/tmp/m", "/tmp/c", "/tmp/t")


def test_vertex_environment_fills_unset_flags_without_trailing_slash():
  dirs = cloud_env.resolve_output_dirs(None, "", None, environ=VERTEX_ENV)
  assert dirs.model_dir == "gs://bucket/run1/model"
  assert dirs.checkpoint_dir == "gs://bucket/run1/checkpoints"
  assert dirs.tensorboard_dir == "gs://bucket/run1/logs"


def test_model_dir_flag_with_partial_environment():
  dirs = cloud_env.resolve_output_dirs(
      "gs://b/mine", None, None, environ={"AIP_TENSORBOARD_LOG_DIR": "gs://b/tb"})
  assert dirs == cloud_env.OutputDirs("gs://b/mine", None, "gs://b/tb")


def test_local_run_leaves_stage_dirs_to_trainer():
  dirs = cloud_env.resolve_output_dirs("runs/demo", None, None, environ={})
  assert dirs == cloud_env.OutputDirs("runs/demo", None, None)


def test_no_model_dir_anywhere_names_flag_and_variable():
  with pytest.raises(ValueError) as e:
    cloud_env.resolve_output_dirs(None, "gs://b/c", None, environ={"AIP_MODEL_DIR": "  "})
  assert "--model_dir" in str(e.value) and "AIP_MODEL_DIR" in str(e.value)


def test_root_paths_keep_their_slash():
  assert cloud_env.resolve_output_dirs("/", None, None, environ={}).model_dir == "/"

