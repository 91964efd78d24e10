"""launch.vertex / job_spec / machines: specs parse as the real Vertex AI types."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from google.cloud.aiplatform_v1 import types as vertex_types

from launch import job_spec
from launch import machines
from launch import vertex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "us-central1-docker.pkg.dev/p/depth2d/trainer:gpu"


def run_launcher(*args):
  """Runs `python -m launch.vertex` as a user would; returns (rc, stdout, stderr)."""
  env = dict(os.environ)
  # Make sure nothing can reach Google even if the code tried to.
  env.update({"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent", "NO_PROXY": "*",
              "HTTPS_PROXY": "http://127.0.0.1:9"})
  proc = subprocess.run([sys.executable, "-m", "launch.vertex", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60)
  return proc.returncode, proc.stdout, proc.stderr


def dry_run_job(*flag_args, trainer_args=("--data_dir=gs://b/tfds",)):
  rc, out, err = run_launcher("--dry_run", "--dry_run_format=json", f"--image_uri={IMAGE}",
                              "--base_output_dir=gs://b/runs/r1", *flag_args, "--",
                              *trainer_args)
  assert rc == 0, err
  return json.loads(out)


def parse_spec(spec: dict) -> vertex_types.CustomJobSpec:
  # from_json rejects unknown or misspelled fields, so this checks every key.
  return vertex_types.CustomJobSpec.from_json(json.dumps(spec))


# --- each path: parses as CustomJobSpec and carries the right pools --------

@pytest.mark.slow
def test_single_gpu_job():
  job = dry_run_job("--machine_type=g2-standard-8")
  spec = parse_spec(job["jobSpec"])
  assert len(spec.worker_pool_specs) == 1
  pool = spec.worker_pool_specs[0]
  assert pool.replica_count == 1
  assert pool.machine_spec.machine_type == "g2-standard-8"
  assert pool.machine_spec.accelerator_type == vertex_types.AcceleratorType.NVIDIA_L4
  assert pool.machine_spec.accelerator_count == 1
  assert pool.container_spec.image_uri == IMAGE
  assert list(pool.container_spec.args) == ["--data_dir=gs://b/tfds", "--strategy=one_device"]
  assert spec.base_output_directory.output_uri_prefix == "gs://b/runs/r1"
  assert "scheduling" not in job["jobSpec"]  # restart-on-worker-restart is multi-worker only
  assert job["displayName"].startswith("depth2d-")


@pytest.mark.slow
def test_multi_gpu_job():
  spec = parse_spec(dry_run_job("--machine_type=n1-standard-32",
                                "--accelerator_type=NVIDIA_TESLA_T4",
                                "--accelerator_count=4")["jobSpec"])
  (pool,) = spec.worker_pool_specs
  assert pool.machine_spec.accelerator_type == vertex_types.AcceleratorType.NVIDIA_TESLA_T4
  assert pool.machine_spec.accelerator_count == 4
  assert "--strategy=mirrored" in pool.container_spec.args


@pytest.mark.slow
def test_multi_worker_job_has_chief_and_worker_pools():
  spec = parse_spec(dry_run_job("--machine_type=n1-standard-16",
                                "--accelerator_type=NVIDIA_TESLA_V100",
                                "--accelerator_count=2", "--worker_count=3",
                                "--service_account=trainer@p.iam.gserviceaccount.com",
                                "--spot", "--timeout_hours=12")["jobSpec"])
  chief, workers = spec.worker_pool_specs
  assert chief.replica_count == 1
  assert workers.replica_count == 3
  for pool in (chief, workers):
    assert pool.machine_spec.accelerator_count == 2
    assert "--strategy=multi_worker_mirrored" in pool.container_spec.args
  assert spec.scheduling.restart_job_on_worker_restart is True
  assert spec.scheduling.strategy == vertex_types.Scheduling.Strategy.SPOT
  assert spec.scheduling.timeout.total_seconds() == 12 * 3600
  assert spec.service_account == "trainer@p.iam.gserviceaccount.com"


@pytest.mark.slow
def test_multi_worker_restart_can_be_turned_off():
  spec = parse_spec(dry_run_job("--machine_type=n1-standard-8",
                                "--accelerator_type=NVIDIA_TESLA_T4", "--worker_count=1",
                                "--norestart_job_on_worker_restart")["jobSpec"])
  assert len(spec.worker_pool_specs) == 2
  assert spec.scheduling.restart_job_on_worker_restart is False


@pytest.mark.parametrize("machine_type,topology", [
    ("ct5lp-hightpu-1t", "1x1"),
    ("ct5lp-hightpu-4t", "2x2"),
    ("ct5lp-hightpu-8t", "2x4"),
    ("ct5p-hightpu-4t", "2x2x1"),
    ("ct6e-standard-4t", "2x2"),
])
def test_tpu_jobs(machine_type, topology):
  request = job_spec.JobRequest(
      image_uri=IMAGE, machine=machines.choose_machine(machine_type),
      trainer_args=("--model_dir=gs://b/m",))
  spec = parse_spec(job_spec.build_custom_job_spec(request))
  (pool,) = spec.worker_pool_specs
  assert pool.machine_spec.machine_type == machine_type
  assert pool.machine_spec.tpu_topology == topology
  assert pool.machine_spec.accelerator_count == 0  # TPU VMs carry their chips
  assert list(pool.container_spec.args) == ["--model_dir=gs://b/m", "--strategy=tpu",
                                            "--tpu=local"]


@pytest.mark.slow
def test_tpu_v6e_through_the_cli():
  spec = parse_spec(dry_run_job("--machine_type=ct6e-standard-4t")["jobSpec"])
  assert spec.worker_pool_specs[0].machine_spec.tpu_topology == "2x2"


@pytest.mark.slow
def test_user_strategy_and_trainer_args_pass_through_untouched():
  args = ("--strategy=one_device", "--epochs", "3", "--note=a b: c # d")
  job = dry_run_job("--machine_type=n1-standard-32", "--accelerator_type=NVIDIA_TESLA_T4",
                    "--accelerator_count=4", "--env=TF_CPP_MIN_LOG_LEVEL=1",
                    trainer_args=args)
  container = job["jobSpec"]["workerPoolSpecs"][0]["containerSpec"]
  assert container["args"] == list(args)
  assert container["env"] == [{"name": "TF_CPP_MIN_LOG_LEVEL", "value": "1"}]


@pytest.mark.slow
def test_dry_run_yaml_is_the_same_spec():
  rc, out, err = run_launcher("--dry_run", "--dry_run_format=yaml", f"--image_uri={IMAGE}",
                              "--base_output_dir=gs://b/r", "--machine_type=n1-standard-8",
                              "--accelerator_type=NVIDIA_TESLA_T4", "--worker_count=2",
                              "--", "--note=x: \"y\" # z", "--flag")
  assert rc == 0, err
  spec = yaml.safe_load(out)
  parse_spec(spec)
  assert spec["workerPoolSpecs"][1]["containerSpec"]["args"][:2] == ["--note=x: \"y\" # z",
                                                                    "--flag"]


@pytest.mark.slow
def test_dry_run_default_prints_json_and_gcloud_yaml():
  rc, out, err = run_launcher("--dry_run", f"--image_uri={IMAGE}", "--base_output_dir=gs://b/r",
                              "--display_name=my-run")
  assert rc == 0, err
  assert '"displayName": "my-run"' in out
  assert "gcloud ai custom-jobs create --region=us-central1 --display-name=my-run" in out
  assert "\nworkerPoolSpecs:\n" in out


def _scalar_nodes(node, is_key=False):
  """(scalar node, whether it is a mapping key) for every scalar of a YAML node tree."""
  if isinstance(node, yaml.MappingNode):
    for key, value in node.value:
      yield from _scalar_nodes(key, True)
      yield from _scalar_nodes(value)
  elif isinstance(node, yaml.SequenceNode):
    for item in node.value:
      yield from _scalar_nodes(item)
  else:
    yield node, is_key


def test_gcloud_yaml_keeps_strings_strings_and_order():
  container = {"imageUri": IMAGE, "args": ["1e-4", "0o17", "007", "true", "yes", "null", "",
                                           "x: y", "#", "ü\n\"\\", ".inf"]}
  spec = {"workerPoolSpecs": [{"replicaCount": 1, "containerSpec": container},
                              {"replicaCount": 2, "containerSpec": container}],
          "scheduling": {"restartJobOnWorkerRestart": True, "timeout": "3600s"}, "true": {}}
  text = vertex.gcloud_yaml(spec)
  assert yaml.safe_load(text) == spec
  assert list(yaml.safe_load(text)) == ["workerPoolSpecs", "scheduling", "true"]
  assert "&" not in text and "*" not in text  # the shared container is written out twice
  # Every string value double-quoted, so a YAML 1.2 reader (where 1e-4 and
  # 0o17 are numbers) reads the same strings.
  values = [node for node, is_key in _scalar_nodes(yaml.compose(text)) if not is_key]
  assert {node.style for node in values if node.tag.endswith(":str")} == {'"'}


def test_yaml_without_pyyaml_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now fails
  with pytest.raises(RuntimeError, match=r'pip install -e "\.\[cloud\]"'):
    vertex.gcloud_yaml({"workerPoolSpecs": []})


# --- bad input: a clear error naming the flag, before anything is sent ----

@pytest.mark.slow
@pytest.mark.parametrize("flag_args,expected", [
    (["--machine_type=n9-mega-1"], "--machine_type='n9-mega-1'"),
    (["--machine_type=n1-standard-8", "--accelerator_type=NVIDIA_TESLA_K9"],
     "--accelerator_type='NVIDIA_TESLA_K9'"),
    (["--machine_type=n1-standard-8", "--accelerator_type=NVIDIA_TESLA_A100"],
     "cannot be used with --machine_type=n1-standard-8"),
    (["--machine_type=n1-standard-8", "--accelerator_type=NVIDIA_TESLA_T4",
      "--accelerator_count=3"], "--accelerator_count=3"),
    (["--machine_type=a2-highgpu-4g", "--accelerator_count=8"], "--accelerator_count=8"),
    (["--machine_type=g2-standard-8", "--accelerator_type=NVIDIA_TESLA_T4"],
     "--accelerator_type=NVIDIA_TESLA_T4 cannot be used"),
    (["--machine_type=ct5lp-hightpu-4t", "--accelerator_count=8"], "--accelerator_count=8"),
    (["--machine_type=ct5lp-hightpu-4t", "--accelerator_type=NVIDIA_TESLA_T4"],
     "leave --accelerator_type unset"),
    (["--machine_type=ct6e-standard-4t", "--worker_count=2"], "--worker_count=2"),
    (["--worker_count=-1"], "--worker_count=-1"),
    (["--base_output_dir=/tmp/out"], "--base_output_dir='/tmp/out' must be a gs://"),
    (["--base_output_dir=s3://b/out"], "must be a gs://"),
    (["--env=NOVALUE"], "--env='NOVALUE'"),
    (["--boot_disk_size_gb=10"], "--boot_disk_size_gb=10"),
])
def test_bad_input_is_rejected_before_sending(flag_args, expected):
  args = [f"--image_uri={IMAGE}", "--base_output_dir=gs://b/r", *flag_args]
  rc, out, err = run_launcher(*args)  # no --dry_run: it would submit if validation passed
  assert rc == 2, (out, err)
  assert expected in err
  assert "Traceback" not in err and out == ""


@pytest.mark.slow
def test_missing_image_uri_names_the_flag():
  rc, _, err = run_launcher("--dry_run", "--base_output_dir=gs://b/r")
  assert rc == 2 and "--image_uri is required" in err


@pytest.mark.slow
def test_missing_output_location_is_an_error():
  rc, _, err = run_launcher("--dry_run", f"--image_uri={IMAGE}")
  assert rc == 2 and "--base_output_dir" in err
  # ... unless the trainer gets --model_dir itself.
  rc, _, err = run_launcher("--dry_run", f"--image_uri={IMAGE}", "--", "--model_dir=gs://b/m")
  assert rc == 0, err


def test_machine_table_is_consistent():
  for name, machine in machines.MACHINE_TYPES.items():
    assert machine.name == name
    for gpu, counts in machine.accelerators.items():
      assert gpu in machines.GPU_ACCELERATORS
      assert vertex_types.AcceleratorType[gpu]  # a real enum value of the API
      assert counts and all(c >= 1 for c in counts)
    if machine.is_tpu:
      chips = 1
      for side in machine.tpu_topology.split("x"):
        chips *= int(side)
      assert chips == machine.tpu_chips


# --- submission, with a stand-in for the Vertex AI client (no network) ----

class RecordingJobServiceClient:

  def __init__(self):
    self.calls = []

  def create_custom_job(self, parent, custom_job):
    self.calls.append((parent, custom_job))
    return vertex_types.CustomJob(name=f"{parent}/customJobs/123",
                                  display_name=custom_job.display_name)


def test_submit_sends_the_dry_run_spec():
  request = job_spec.JobRequest(image_uri=IMAGE, machine=machines.choose_machine(
      "n1-standard-8", "NVIDIA_TESLA_T4", 1), worker_count=1, base_output_dir="gs://b/r")
  custom_job = job_spec.build_custom_job("run-1", job_spec.build_custom_job_spec(request))
  client = RecordingJobServiceClient()
  name = vertex.submit(custom_job, "proj", "europe-west4", job_service_client=client)
  ((parent, sent),) = client.calls
  assert parent == "projects/proj/locations/europe-west4"
  assert sent.display_name == "run-1"
  assert len(sent.job_spec.worker_pool_specs) == 2
  assert sent.job_spec.scheduling.restart_job_on_worker_restart
  assert name == "projects/proj/locations/europe-west4/customJobs/123"
  assert vertex.console_url(name) == (
      "https://console.cloud.google.com/agent-platform/locations/europe-west4/"
      "training/123?project=proj")
