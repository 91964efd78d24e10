"""`python -m trainer.main --model_dir=gs://... --cache_dir=gs://...`: the whole
chain writing its workdir and its tf.data cache to Cloud Storage through
TensorFlow's real GCS client (a local gcp-storage-emulator behind
tests/gcs_server.py's TLS proxy), then a rerun that finds the finished work
there."""

import json
import subprocess
import sys
import uuid

import pytest

import gcs_server


def _train(model_dir, data_dir, env, *extra):
  command = [sys.executable, "-m", "trainer.main", f"--model_dir={model_dir}", *extra,
             f"--cache_dir={model_dir}/cache",
             "--dataset=record3d/pairs", f"--data_dir={data_dir}", "--image_size=32,24",
             "--global_batch_size=4", "--train_steps=2", "--steps_per_loop=2",
             "--log_every_steps=2", "--checkpoint_every_steps=2", "--warmup_steps=1",
             "--num_image_summaries=1", "--num_predict_images=1", "--strategy=one_device",
             "--mixed_precision=float32"]
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 0, result.stdout + result.stderr[-6000:]


@pytest.mark.slow  # subprocesses: TF start-up, the whole chain twice
def test_main_chain_writes_its_workdir_to_gs_and_resumes_from_it(
    tiny_record3d, emulator_client, tf_gcs_proxy, tf_gcs_env):
  data_dir, _ = tiny_record3d
  run = f"run-{uuid.uuid4().hex[:8]}"
  model_dir = f"gs://{gcs_server.BUCKET}/{run}"
  tunnels_before = len(tf_gcs_proxy.tunnels)
  _train(model_dir, data_dir, tf_gcs_env)
  assert set(tf_gcs_proxy.tunnels[tunnels_before:]) == set(gcs_server.GCS_HOSTS)

  bucket = emulator_client.bucket(gcs_server.BUCKET)
  names = {blob.name[len(run) + 1:] for blob in bucket.list_blobs(prefix=run + "/")}
  # The chain's export is a copy of the finetune export, file by file (a gs://
  # walk names sub-folders "variables/": no "variables//" object may appear).
  for export in ("export", "finetune/export", "rough/export"):
    assert f"{export}/saved_model.pb" in names, sorted(names)
    assert f"{export}/variables/variables.index" in names, sorted(names)
  assert not any("//" in name for name in names), sorted(names)
  assert json.loads(bucket.blob(f"{run}/export/depth2d.json").download_as_bytes())[
      "stage"] == "finetune"

  # The tf.data file cache of the decoded train split (--cache_dir on gs://),
  # finished (index + data, no lock left).
  cache = sorted(n for n in names if n.startswith("cache/") and n != "cache/")
  assert [n.rsplit(".", 1)[-1].split("-")[0] for n in cache] == ["data", "index"], cache

  # trainer.predict writes locally: its folder is copied up afterwards.
  for folder in ("predict/inputs", "predict/outputs"):
    assert any(n.startswith(folder + "/") for n in names), sorted(names)

  # A rerun reads the finished stages back from the bucket instead of training again
  # (--mode=train: the eval, export and predictions a full rerun redoes are the first
  # run's code paths, checked above; 134 -> 110 s for this test alone).
  def checkpoint_generations():
    return {blob.name: blob.generation for blob in bucket.list_blobs(prefix=run + "/")
            if "/checkpoints/" in blob.name}

  before = checkpoint_generations()
  _train(model_dir, data_dir, tf_gcs_env, "--mode=train")
  assert before and checkpoint_generations() == before  # no checkpoint written again
