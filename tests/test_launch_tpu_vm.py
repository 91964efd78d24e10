"""launch/tpu_vm.sh: syntax, usage errors (no gcloud call), and the gcloud calls it makes.

A stand-in `gcloud` on PATH records its arguments instead of touching Google.
"""

import os
import re
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu_vm.sh")


@pytest.fixture
def fake_gcloud(tmp_path):
  """PATH with a recording gcloud; returns (env, path of the call log)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "gcloud.log"
  gcloud = bin_dir / "gcloud"
  gcloud.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$FAKE_GCLOUD_LOG"\n'
                    'if [[ "$*" == *"describe"* ]]; then echo ACTIVE; fi\n')
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log))
  return env, log


def run(env, *args):
  return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True,
                        timeout=30)


@pytest.mark.slow
def test_script_parses():
  subprocess.run(["bash", "-n", SCRIPT], check=True)
  with open(SCRIPT) as f:
    text = f.read()
  assert "set -euo pipefail" in text
  # No hyperparameters in the script: the trainer's own flags come only after `--`.
  for flag in ("--learning_rate", "--batch_size", "--global_batch_size", "--epochs",
               "--steps", "--image_size"):
    assert flag not in text


@pytest.mark.slow
def test_help_and_no_arguments(fake_gcloud):
  env, log = fake_gcloud
  shown = run(env, "--help")
  assert shown.returncode == 0 and "usage: tpu_vm.sh COMMAND NAME --zone=ZONE" in shown.stdout
  bare = run(env)
  assert bare.returncode == 2 and "usage:" in bare.stderr
  assert not log.exists()


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["launch", "x", "--zone=z"], "unknown command 'launch'"),
    (["create", "--zone=z"], "missing NAME"),
    (["create", "x"], "--zone is required"),
    (["create", "x", "--zone=z", "--version=v"], "needs --accelerator-type"),
    (["create", "x", "--zone=z", "--accelerator-type=v5litepod-8"], "needs --version"),
    (["delete", "My_TPU", "--zone=z"], "NAME 'My_TPU' must be lowercase"),
    (["delete", "x", "--zone=z", "--bogus"], "unknown option --bogus"),
    (["delete", "x", "--zone"], "--zone needs a value"),
    (["delete", "x", "--zone=z", "--", "--epochs=3"], "only go with train or run"),
    (["train", "x", "--zone=z", "extra"], "unexpected argument 'extra'"),
    (["train", "x", "--zone=z", "--", "--strategy=mirrored"], "--strategy=tpu --tpu=local"),
    (["delete", "x", "--zone=z", "--delete-after"], "--delete-after only goes with run"),
])
def test_argument_errors_do_not_call_gcloud(fake_gcloud, args, message):
  env, log = fake_gcloud
  result = run(env, *args)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert not log.exists(), log.read_text()


@pytest.mark.slow
def test_train_passes_trainer_args_through_quoted(fake_gcloud):
  env, log = fake_gcloud
  result = run(env, "train", "my-tpu", "--zone=us-west4-a", "--project=p", "--",
               "--model_dir=gs://b/runs/1", "--note=a b's")
  assert result.returncode == 0, result.stderr
  (call,) = log.read_text().strip().split("\n", 1)[:1]
  assert call.startswith("compute tpus tpu-vm ssh my-tpu --worker=all --command=")
  assert "python3 -m trainer.main --strategy=tpu --tpu=local --model_dir=gs://b/runs/1 " \
         "--note=a\\ b\\'s" in log.read_text()
  assert "--zone=us-west4-a --project=p" in log.read_text()


@pytest.mark.slow
def test_queued_create_waits_for_active_then_delete(fake_gcloud):
  env, log = fake_gcloud
  created = run(env, "create", "my-tpu", "--zone=us-west4-a", "--accelerator-type=v5litepod-8",
                "--version=v2-alpha-tpuv5-lite", "--queued", "--spot")
  assert created.returncode == 0, created.stderr
  calls = log.read_text().splitlines()
  assert calls[0] == ("compute tpus queued-resources create my-tpu-qr --node-id=my-tpu "
                      "--accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite "
                      "--spot --zone=us-west4-a")
  assert calls[1].startswith("compute tpus queued-resources describe my-tpu-qr")
  log.unlink()
  deleted = run(env, "delete", "my-tpu", "--zone=us-west4-a", "--queued")
  assert deleted.returncode == 0, deleted.stderr
  assert log.read_text().splitlines() == [
      "compute tpus queued-resources delete my-tpu-qr --force --quiet --zone=us-west4-a"]


@pytest.mark.slow
def test_plain_create_and_delete(fake_gcloud):
  env, log = fake_gcloud
  assert run(env, "create", "t1", "--zone", "europe-west4-a", "--accelerator-type", "v6e-4",
             "--version", "v2-alpha-tpuv6e").returncode == 0
  assert run(env, "delete", "t1", "--zone=europe-west4-a").returncode == 0
  assert log.read_text().splitlines() == [
      "compute tpus tpu-vm create t1 --accelerator-type=v6e-4 --version=v2-alpha-tpuv6e "
      "--zone=europe-west4-a",
      "compute tpus tpu-vm delete t1 --quiet --zone=europe-west4-a"]


def test_dockerfile_copies_what_exists_and_runs_the_trainer():
  with open(os.path.join(REPO, "launch", "Dockerfile")) as f:
    dockerfile = f.read()
  assert 'ENTRYPOINT ["python", "-m", "trainer.main"]' in dockerfile
  for line in dockerfile.splitlines():
    if line.startswith("COPY "):
      for source in line.split()[1:-1]:
        assert os.path.exists(os.path.join(REPO, source)), source
  with open(os.path.join(REPO, ".dockerignore")) as f:
    ignored = [l.strip() for l in f if l.strip() and not l.startswith("#")]
  # The packages and their data must stay in the build context.
  for needed in ("trainer", "tfds_record3d", "launch", "setup.py", "README.md"):
    assert needed not in ignored
  assert not any(re.search(r"\.(r3d|png|jpg|exr|json)", pattern) for pattern in ignored)
