"""Builds a Vertex AI CustomJobSpec as a plain dict (the REST / gcloud shape).

Pure: no flags, no network, no credentials. `launch.vertex` fills it from
flags, prints it for --dry_run and submits it otherwise; the tests parse it
with the real `google.cloud.aiplatform_v1.types.CustomJobSpec`.

Worker pools follow Vertex AI's convention (its "Distributed training" guide,
https://cloud.google.com/vertex-ai/docs/training/distributed-training, and
the README's "Running on Google Cloud"): pool 0 is the chief (exactly one
replica), pool 1 the other workers. Vertex then writes a TF_CONFIG with task
types "chief" and "worker" into every replica, which
`trainer.distribute.parse_tf_config` reads.
"""

import dataclasses
from typing import Dict, Optional, Sequence

from launch import machines

# Strategy the trainer should use for each kind of job. Passed explicitly
# so a job never depends on what `--strategy=auto` finds on the host.
STRATEGY_SINGLE_DEVICE = "one_device"
STRATEGY_MIRRORED = "mirrored"
STRATEGY_MULTI_WORKER = "multi_worker_mirrored"
STRATEGY_TPU = "tpu"


@dataclasses.dataclass(frozen=True)
class JobRequest:
  """Everything a job needs, already split out of flags."""
  image_uri: str
  machine: machines.MachineChoice
  worker_count: int = 0  # replicas in pool 1, besides the chief
  trainer_args: Sequence[str] = ()
  base_output_dir: Optional[str] = None
  service_account: Optional[str] = None
  restart_job_on_worker_restart: bool = True
  spot: bool = False
  timeout_hours: Optional[float] = None
  boot_disk_size_gb: int = 100
  env: Dict[str, str] = dataclasses.field(default_factory=dict)


def trainer_strategy(machine: machines.MachineChoice, worker_count: int) -> str:
  """The --strategy the trainer needs for this hardware."""
  if machine.machine_type.is_tpu:
    return STRATEGY_TPU
  if worker_count > 0:
    return STRATEGY_MULTI_WORKER
  if machine.accelerator_count > 1:
    return STRATEGY_MIRRORED
  return STRATEGY_SINGLE_DEVICE


def _has_flag(args: Sequence[str], name: str) -> bool:
  return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def container_args(request: JobRequest) -> list:
  """trainer.main arguments: the user's, plus the strategy unless they chose one."""
  args = list(request.trainer_args)
  if not _has_flag(args, "strategy"):
    args.append(f"--strategy={trainer_strategy(request.machine, request.worker_count)}")
  if request.machine.machine_type.is_tpu and not _has_flag(args, "tpu"):
    # On a Vertex TPU VM the chips are local to the container.
    args.append("--tpu=local")
  return args


def validate_request(request: JobRequest) -> None:
  """Replica and pool checks the machine table cannot make; errors name the flag."""
  if not request.image_uri:
    raise ValueError(
        "--image_uri is required: the training image built from launch/Dockerfile "
        "and pushed to Artifact Registry (REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG)")
  if request.worker_count < 0:
    raise ValueError(f"--worker_count={request.worker_count} must be >= 0 "
                     "(workers besides the chief)")
  if request.worker_count > 0 and request.machine.machine_type.is_tpu:
    raise ValueError(
        f"--worker_count={request.worker_count}: TPU jobs here are one TPU VM host "
        f"({request.machine.machine_type.name}); multi-host TPU slices are not "
        "supported by this launcher (use launch/tpu_vm.sh for pods)")
  if request.base_output_dir and not request.base_output_dir.startswith("gs://"):
    raise ValueError(
        f"--base_output_dir={request.base_output_dir!r} must be a gs://BUCKET/PATH "
        "Cloud Storage path: Vertex AI replicas cannot see local paths")
  if request.base_output_dir is None and not _has_flag(request.trainer_args, "model_dir"):
    raise ValueError(
        "no output location: pass --base_output_dir=gs://BUCKET/PATH (Vertex AI then "
        "sets AIP_MODEL_DIR for the trainer) or --model_dir=gs://... after `--`")
  if request.boot_disk_size_gb < 100:
    # Vertex AI's documented minimum boot disk for custom training.
    raise ValueError(f"--boot_disk_size_gb={request.boot_disk_size_gb} must be >= 100")
  if request.timeout_hours is not None and request.timeout_hours <= 0:
    raise ValueError(f"--timeout_hours={request.timeout_hours} must be positive")
  for name in request.env:
    if not name or "=" in name:
      raise ValueError(f"--env entry {name!r} must be NAME=VALUE")


def build_custom_job_spec(request: JobRequest) -> dict:
  """The CustomJobSpec (camelCase keys, as REST and `gcloud --config` take it).

  Raises:
    ValueError: see validate_request.
  """
  validate_request(request)
  container = {"imageUri": request.image_uri, "args": container_args(request)}
  if request.env:
    container["env"] = [{"name": k, "value": v} for k, v in sorted(request.env.items())]

  def pool(replicas: int) -> dict:
    return {
        "machineSpec": request.machine.machine_spec(),
        "replicaCount": replicas,
        "diskSpec": {"bootDiskType": "pd-ssd", "bootDiskSizeGb": request.boot_disk_size_gb},
        "containerSpec": container,
    }

  spec: dict = {"workerPoolSpecs": [pool(1)]}
  if request.worker_count > 0:
    spec["workerPoolSpecs"].append(pool(request.worker_count))
  if request.base_output_dir:
    spec["baseOutputDirectory"] = {"outputUriPrefix": request.base_output_dir}
  if request.service_account:
    spec["serviceAccount"] = request.service_account

  scheduling = {}
  if request.worker_count > 0:
    # MultiWorkerMirroredStrategy cannot take a worker back mid-run: the
    # collectives hang. Restarting the whole job resumes from the last
    # checkpoint instead.
    scheduling["restartJobOnWorkerRestart"] = request.restart_job_on_worker_restart
  if request.spot:
    scheduling["strategy"] = "SPOT"
  if request.timeout_hours:
    scheduling["timeout"] = f"{int(request.timeout_hours * 3600)}s"
  if scheduling:
    spec["scheduling"] = scheduling
  return spec


def build_custom_job(display_name: str, spec: dict) -> dict:
  """The CustomJob resource around a spec (what the create call sends)."""
  return {"displayName": display_name, "jobSpec": spec}
