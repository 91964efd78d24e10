r"""Sends `python -m trainer.main` to Vertex AI as a CustomJob.

Everything after `--` goes to trainer.main unchanged. The launcher adds
`--strategy=` for the hardware (one_device, mirrored, multi_worker_mirrored
or tpu, plus `--tpu=local` on TPUs) unless you pass your own.

  # one GPU
  python -m launch.vertex --project=P --region=us-central1 \
      --image_uri=us-central1-docker.pkg.dev/P/depth2d/trainer:gpu \
      --machine_type=g2-standard-8 --base_output_dir=gs://B/runs/r1 \
      -- --data_dir=gs://B/tfds --dataset=record3d/pairs
  # 4 GPUs on one host
  ... --machine_type=n1-standard-32 --accelerator_type=NVIDIA_TESLA_T4 --accelerator_count=4
  # chief + 3 workers, 2 GPUs each
  ... --machine_type=n1-standard-16 --accelerator_type=NVIDIA_TESLA_V100 \
      --accelerator_count=2 --worker_count=3
  # TPU v5e (4 chips)
  ... --machine_type=ct5lp-hightpu-4t --image_uri=.../trainer:tpu
  # print the spec (JSON and gcloud YAML), send nothing, need no credentials
  ... --dry_run
"""

import json
import sys
import time
from typing import List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from launch import job_spec
from launch import machines

FLAGS = flags.FLAGS

flags.DEFINE_string("project", None, "Google Cloud project id. Default: the project of "
                    "the application-default credentials. Not needed with --dry_run.")
flags.DEFINE_string("region", "us-central1", "Vertex AI region (the machine and "
                    "accelerator must be offered there, e.g. TPU v5e in us-west1/us-west4, "
                    "europe-west4).")
flags.DEFINE_string("image_uri", None, "Training image built from launch/Dockerfile and "
                    "pushed to Artifact Registry, e.g. "
                    "us-central1-docker.pkg.dev/PROJECT/depth2d/trainer:gpu. Required.")
flags.DEFINE_string("display_name", None, "Job name shown in the console. "
                    "Default: depth2d-YYYYmmdd-HHMMSS.")
flags.DEFINE_string("machine_type", "n1-standard-8", "Machine type of every replica: "
                    "n1-*, a2-*, a3-*, g2-* (GPUs), ct5lp-hightpu-{1t,4t,8t} (TPU v5e), "
                    "ct5p-hightpu-4t (TPU v5p), ct6e-standard-4t (TPU v6e), or a CPU type. "
                    "The accepted combinations are listed in launch/machines.py.")
flags.DEFINE_string("accelerator_type", None, "GPU model, e.g. NVIDIA_TESLA_T4, "
                    "NVIDIA_L4, NVIDIA_TESLA_A100. Implied by a2/a3/g2 machine types; "
                    "leave unset for TPU machine types (they carry their chips).")
flags.DEFINE_integer("accelerator_count", None, "GPUs per replica (must be a count the "
                     "machine type accepts). Default: the machine type's only count, or 1.")
flags.DEFINE_integer("worker_count", 0, "Replicas in the worker pool besides the chief. "
                     ">0 makes a multi-worker job (chief pool + worker pool, "
                     "MultiWorkerMirroredStrategy) with the same machine in both pools.")
flags.DEFINE_boolean("restart_job_on_worker_restart", True, "Multi-worker jobs: restart "
                     "every replica when one restarts, so training resumes from the last "
                     "checkpoint instead of hanging in a collective.")
flags.DEFINE_string("base_output_dir", None, "gs://BUCKET/PATH for the job's outputs. "
                    "Vertex AI derives AIP_MODEL_DIR (<dir>/model), AIP_CHECKPOINT_DIR "
                    "(<dir>/checkpoints) and AIP_TENSORBOARD_LOG_DIR (<dir>/logs) from it, "
                    "which the trainer uses when no flag overrides them.")
flags.DEFINE_string("service_account", None, "Service account the replicas run as (needs "
                    "read on the data bucket and write on --base_output_dir). Default: "
                    "Vertex AI's per-project service agent.")
flags.DEFINE_boolean("spot", False, "Use Spot capacity (cheaper, can be preempted; the "
                     "trainer resumes from its checkpoints).")
flags.DEFINE_float("timeout_hours", None, "Stop the job after this many hours "
                   "(Vertex AI's default is 7 days).")
flags.DEFINE_integer("boot_disk_size_gb", 100, "Boot disk per replica (>= 100).")
flags.DEFINE_multi_string("env", [], "NAME=VALUE environment variable for the trainer "
                          "container; repeatable.")
flags.DEFINE_boolean("dry_run", False, "Print the CustomJob spec as JSON and as the YAML "
                     "`gcloud ai custom-jobs create --config` takes, and send nothing.")
flags.DEFINE_enum("dry_run_format", "both", ["both", "json", "yaml"], "With --dry_run: "
                  "`json` prints only the CustomJob JSON (REST body), `yaml` only the "
                  "gcloud --config file, so either can be redirected to a file.")


def parse_env(entries: Sequence[str]) -> dict:
  env = {}
  for entry in entries:
    name, sep, value = entry.partition("=")
    if not sep or not name:
      raise ValueError(f"--env={entry!r} must be NAME=VALUE")
    env[name] = value
  return env


def request_from_flags(trainer_args: Sequence[str]) -> job_spec.JobRequest:
  """Validated JobRequest from the flags; ValueError names the flag at fault."""
  machine = machines.choose_machine(FLAGS.machine_type, FLAGS.accelerator_type,
                                    FLAGS.accelerator_count)
  request = job_spec.JobRequest(
      image_uri=FLAGS.image_uri or "",
      machine=machine,
      worker_count=FLAGS.worker_count,
      trainer_args=tuple(trainer_args),
      base_output_dir=FLAGS.base_output_dir,
      service_account=FLAGS.service_account,
      restart_job_on_worker_restart=FLAGS.restart_job_on_worker_restart,
      spot=FLAGS.spot,
      timeout_hours=FLAGS.timeout_hours,
      boot_disk_size_gb=FLAGS.boot_disk_size_gb,
      env=parse_env(FLAGS.env),
  )
  job_spec.validate_request(request)
  return request


def default_display_name() -> str:
  return time.strftime("depth2d-%Y%m%d-%H%M%S")


def gcloud_yaml(spec: dict) -> str:
  """The CustomJobSpec as the YAML `gcloud ai custom-jobs create --config` reads.

  Keys stay in the spec's order, and every string value is written
  double-quoted: PyYAML reads YAML 1.1 and would leave strings such as `1e-4`
  or `0o17` plain, which a YAML 1.2 reader takes for numbers (a trainer
  argument must stay the string it was). No anchors or aliases either: both
  pools share one container dict, and gcloud users should see it twice.

  Raises:
    RuntimeError: PyYAML (the `cloud` extra) is not installed.
  """
  try:
    import yaml  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
        "the gcloud YAML needs PyYAML: pip install -e \".[cloud]\" "
        "(or use --dry_run_format=json, which needs nothing more)") from e

  class Dumper(yaml.SafeDumper):

    def ignore_aliases(self, data):
      return True

    def represent_str(self, data):
      return self.represent_scalar("tag:yaml.org,2002:str", data, style='"')

    def represent_dict(self, data):
      node = self.represent_mapping("tag:yaml.org,2002:map", data.items())
      for key, _ in node.value:
        # Keys read as themselves plain: PyYAML still quotes one that would
        # not (e.g. "true"), because it checks how a plain scalar resolves.
        key.style = None
      return node

  Dumper.add_representer(str, Dumper.represent_str)
  Dumper.add_representer(dict, Dumper.represent_dict)
  return yaml.dump(spec, Dumper=Dumper, sort_keys=False, allow_unicode=True,
                   default_flow_style=False, width=float("inf"))


def dry_run_text(custom_job: dict) -> str:
  """What --dry_run prints: the full CustomJob as JSON, then the gcloud YAML."""
  region = FLAGS.region
  return "\n".join([
      "# CustomJob (REST: POST https://REGION-aiplatform.googleapis.com/v1/"
      "projects/PROJECT/locations/REGION/customJobs)",
      json.dumps(custom_job, indent=2),
      "",
      "# The same job for gcloud: save the YAML below as job.yaml, then run",
      f"#   gcloud ai custom-jobs create --region={region} "
      f"--display-name={custom_job['displayName']} --config=job.yaml",
      "---",
      gcloud_yaml(custom_job["jobSpec"]),
  ])


def console_url(job_resource_name: str) -> str:
  """Console page of projects/P/locations/R/customJobs/ID.

  Same form google-cloud-aiplatform 2.x prints for its own jobs (the console
  moved Vertex AI pages under /agent-platform/; old /vertex-ai/ links redirect).
  """
  parts = job_resource_name.split("/")
  project, region, job_id = parts[1], parts[3], parts[5]
  return (f"https://console.cloud.google.com/agent-platform/locations/{region}/training/"
          f"{job_id}?project={project}")


def _default_project() -> str:
  import google.auth  # pylint: disable=g-import-not-at-top
  _, project = google.auth.default()
  if not project:
    raise ValueError("--project is not set and the application-default credentials "
                     "name no project (gcloud config set project P, or pass --project)")
  return project


def submit(custom_job: dict, project: str, region: str, job_service_client=None) -> str:
  """Creates the CustomJob; returns its resource name.

  google-cloud-aiplatform is the package's `cloud` extra, imported only here so
  dry runs and the trainer image do not need it.
  """
  try:
    from google.cloud import aiplatform_v1  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
        "submitting needs google-cloud-aiplatform: pip install 'depth2d[cloud]' "
        "(or use --dry_run and `gcloud ai custom-jobs create --config`)") from e
  job = aiplatform_v1.CustomJob.from_json(json.dumps(custom_job))
  client = job_service_client or aiplatform_v1.JobServiceClient(
      client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})
  created = client.create_custom_job(
      parent=f"projects/{project}/locations/{region}", custom_job=job)
  return created.name


def main(argv: List[str]) -> int:
  trainer_args = argv[1:]
  try:
    request = request_from_flags(trainer_args)
  except ValueError as e:
    # A usage error, not a crash: no traceback, exit code 2 like absl's own.
    print(f"launch.vertex: error: {e}", file=sys.stderr)
    return 2
  custom_job = job_spec.build_custom_job(FLAGS.display_name or default_display_name(),
                                         job_spec.build_custom_job_spec(request))
  if request.machine.machine_type.is_tpu:
    logging.warning(
        "TPU job: the image must carry a TPU build of TensorFlow and libtpu. "
        "launch/Dockerfile builds CPU/GPU images only (no TensorFlow 2.21 TPU "
        "wheel exists); for TPUs with this TensorFlow use launch/tpu_vm.sh.")
  if FLAGS.dry_run:
    try:
      if FLAGS.dry_run_format == "json":
        text = json.dumps(custom_job, indent=2) + "\n"
      elif FLAGS.dry_run_format == "yaml":
        text = gcloud_yaml(custom_job["jobSpec"])
      else:
        text = dry_run_text(custom_job) + "\n"
    except RuntimeError as e:
      print(f"launch.vertex: error: {e}", file=sys.stderr)
      return 2
    print(text, end="")
    return 0
  try:
    project = FLAGS.project or _default_project()
  except ValueError as e:
    print(f"launch.vertex: error: {e}", file=sys.stderr)
    return 2
  logging.info("creating CustomJob %r in %s/%s: %d pool(s), %s, trainer args %s",
               custom_job["displayName"], project, FLAGS.region,
               len(custom_job["jobSpec"]["workerPoolSpecs"]),
               request.machine.machine_spec(), job_spec.container_args(request))
  name = submit(custom_job, project, FLAGS.region)
  print(f"created {name}")
  print(f"console: {console_url(name)}")
  print(f"logs:    gcloud ai custom-jobs stream-logs {name}")
  return 0


def run():
  app.run(main)


if __name__ == "__main__":
  run()
