"""Which Vertex AI machine types take which accelerators, and how many.

Checked before a job is sent, because Vertex AI only rejects an impossible
combination after the request (or, for quota-less regions, after the job
has queued for a while).

Sources (as of 2025/2026; Google adds machine types over time, so a type
missing here is reported as unknown with the list of known ones rather
than guessed at):
  * Vertex AI "Configure compute resources for custom training"
    (GPU and TPU tables: which accelerator goes on which machine family).
  * Compute Engine "GPU machine types" (A2/A3/G2 types have a fixed GPU
    count encoded in the name; N1 takes 1, 2, 4 or 8 attached GPUs
    depending on the model).
  * Cloud TPU "TPU v5e / v5p / v6e" pages: chips per host and the
    single-host slice topology for each `ct*` machine type.
The N1 limits below are per GPU model; Compute Engine additionally caps the
vCPU count per GPU count (e.g. 1 V100 with at most 12 vCPUs), which this
table does not model: Vertex reports that case itself.
"""

import dataclasses
from typing import Dict, FrozenSet, Mapping, Optional, Tuple

GPU_ACCELERATORS = (
    "NVIDIA_TESLA_T4",
    "NVIDIA_TESLA_V100",
    "NVIDIA_TESLA_P100",
    "NVIDIA_TESLA_P4",
    "NVIDIA_TESLA_A100",
    "NVIDIA_A100_80GB",
    "NVIDIA_L4",
    "NVIDIA_H100_80GB",
    "NVIDIA_H100_MEGA_80GB",
    "NVIDIA_H200_141GB",
)


@dataclasses.dataclass(frozen=True)
class MachineType:
  """What one Vertex AI machine type can carry."""
  name: str
  # accelerator type -> the counts this machine type accepts.
  accelerators: Mapping[str, FrozenSet[int]] = dataclasses.field(default_factory=dict)
  # TPU machine types come with their chips: count per host and the
  # single-host slice topology Vertex wants in machineSpec.tpuTopology.
  tpu_generation: Optional[str] = None
  tpu_chips: int = 0
  tpu_topology: Optional[str] = None

  @property
  def is_tpu(self) -> bool:
    return self.tpu_generation is not None


def _n1_types() -> Dict[str, MachineType]:
  # N1 is the only family with attachable GPUs of several models.
  n1_gpus = {
      "NVIDIA_TESLA_T4": frozenset({1, 2, 4}),
      "NVIDIA_TESLA_P4": frozenset({1, 2, 4}),
      "NVIDIA_TESLA_P100": frozenset({1, 2, 4}),
      "NVIDIA_TESLA_V100": frozenset({1, 2, 4, 8}),
  }
  types = {}
  for kind, sizes in (("standard", (4, 8, 16, 32, 64, 96)),
                      ("highmem", (2, 4, 8, 16, 32, 64, 96)),
                      ("highcpu", (16, 32, 64, 96))):
    for vcpus in sizes:
      name = f"n1-{kind}-{vcpus}"
      types[name] = MachineType(name, n1_gpus)
  return types


def _fixed_gpu_types() -> Dict[str, MachineType]:
  # A2, A3 and G2 machine types come with a fixed number of one GPU model.
  table: Tuple[Tuple[str, str, int], ...] = (
      ("a2-highgpu-1g", "NVIDIA_TESLA_A100", 1),
      ("a2-highgpu-2g", "NVIDIA_TESLA_A100", 2),
      ("a2-highgpu-4g", "NVIDIA_TESLA_A100", 4),
      ("a2-highgpu-8g", "NVIDIA_TESLA_A100", 8),
      ("a2-megagpu-16g", "NVIDIA_TESLA_A100", 16),
      ("a2-ultragpu-1g", "NVIDIA_A100_80GB", 1),
      ("a2-ultragpu-2g", "NVIDIA_A100_80GB", 2),
      ("a2-ultragpu-4g", "NVIDIA_A100_80GB", 4),
      ("a2-ultragpu-8g", "NVIDIA_A100_80GB", 8),
      ("a3-highgpu-1g", "NVIDIA_H100_80GB", 1),
      ("a3-highgpu-2g", "NVIDIA_H100_80GB", 2),
      ("a3-highgpu-4g", "NVIDIA_H100_80GB", 4),
      ("a3-highgpu-8g", "NVIDIA_H100_80GB", 8),
      ("a3-megagpu-8g", "NVIDIA_H100_MEGA_80GB", 8),
      ("a3-ultragpu-8g", "NVIDIA_H200_141GB", 8),
      ("g2-standard-4", "NVIDIA_L4", 1),
      ("g2-standard-8", "NVIDIA_L4", 1),
      ("g2-standard-12", "NVIDIA_L4", 1),
      ("g2-standard-16", "NVIDIA_L4", 1),
      ("g2-standard-32", "NVIDIA_L4", 1),
      ("g2-standard-24", "NVIDIA_L4", 2),
      ("g2-standard-48", "NVIDIA_L4", 4),
      ("g2-standard-96", "NVIDIA_L4", 8),
  )
  return {name: MachineType(name, {gpu: frozenset({count})}) for name, gpu, count in table}


def _cpu_types() -> Dict[str, MachineType]:
  # CPU-only hosts (for smoke tests of the image and for evaluators).
  names = [f"e2-standard-{n}" for n in (4, 8, 16, 32)]
  names += [f"n2-standard-{n}" for n in (4, 8, 16, 32, 48, 64, 80)]
  names += [f"c2-standard-{n}" for n in (4, 8, 16, 30, 60)]
  return {name: MachineType(name) for name in names}


def _tpu_types() -> Dict[str, MachineType]:
  table = (
      # name, generation, chips per host, single-host topology
      ("ct5lp-hightpu-1t", "v5e", 1, "1x1"),
      ("ct5lp-hightpu-4t", "v5e", 4, "2x2"),
      ("ct5lp-hightpu-8t", "v5e", 8, "2x4"),
      ("ct5p-hightpu-4t", "v5p", 4, "2x2x1"),
      ("ct6e-standard-4t", "v6e", 4, "2x2"),
  )
  return {
      name: MachineType(name, tpu_generation=gen, tpu_chips=chips, tpu_topology=topology)
      for name, gen, chips, topology in table
  }


MACHINE_TYPES: Dict[str, MachineType] = {
    **_n1_types(), **_fixed_gpu_types(), **_cpu_types(), **_tpu_types()
}


@dataclasses.dataclass(frozen=True)
class MachineChoice:
  """A validated machine: what goes into the job's machineSpec."""
  machine_type: MachineType
  accelerator_type: Optional[str]
  accelerator_count: int  # GPUs, or TPU chips per host; 0 for CPU-only

  def machine_spec(self) -> dict:
    """The machineSpec as the Vertex AI REST API (and gcloud YAML) spells it."""
    spec = {"machineType": self.machine_type.name}
    if self.machine_type.is_tpu:
      # TPU VM machine types carry their chips; Vertex wants only the topology.
      spec["tpuTopology"] = self.machine_type.tpu_topology
    elif self.accelerator_type:
      spec["acceleratorType"] = self.accelerator_type
      spec["acceleratorCount"] = self.accelerator_count
    return spec


def _allowed_summary(machine: MachineType) -> str:
  if not machine.accelerators:
    return "no accelerators"
  return "; ".join(f"{gpu} x {sorted(counts)}" for gpu, counts in sorted(machine.accelerators.items()))


def choose_machine(machine_type: str,
                   accelerator_type: Optional[str] = None,
                   accelerator_count: Optional[int] = None) -> MachineChoice:
  """Validates a machine type with its accelerator type and count.

  accelerator_type None on a GPU machine type with exactly one GPU model
  picks that model; accelerator_count None picks the only allowed count (or
  1 for N1). TPU machine types take no --accelerator_type; a given
  --accelerator_count must equal their chips per host.

  Raises:
    ValueError naming the flag at fault and what would be accepted.
  """
  machine = MACHINE_TYPES.get(machine_type)
  if machine is None:
    families = sorted({name.rsplit("-", 1)[0] for name in MACHINE_TYPES})
    raise ValueError(
        f"--machine_type={machine_type!r} is not a machine type this launcher "
        f"knows (families: {', '.join(families)}; see launch/machines.py for the "
        f"exact list and its sources)")

  if machine.is_tpu:
    if accelerator_type:
      raise ValueError(
          f"--accelerator_type={accelerator_type!r}: TPU machine type {machine.name} "
          f"comes with {machine.tpu_chips} TPU {machine.tpu_generation} chip(s); "
          f"leave --accelerator_type unset")
    if accelerator_count not in (None, 0, machine.tpu_chips):
      raise ValueError(
          f"--accelerator_count={accelerator_count}: {machine.name} has exactly "
          f"{machine.tpu_chips} TPU {machine.tpu_generation} chip(s) per host")
    return MachineChoice(machine, None, machine.tpu_chips)

  if accelerator_type is None:
    if accelerator_count:
      if len(machine.accelerators) != 1:
        raise ValueError(
            f"--accelerator_count={accelerator_count} needs --accelerator_type on "
            f"{machine.name} (accepts: {_allowed_summary(machine)})")
      accelerator_type = next(iter(machine.accelerators))
    elif len(machine.accelerators) == 1 and machine.name.split("-")[0] in ("a2", "a3", "g2"):
      # The GPUs are part of these machine types; name them for the user.
      accelerator_type = next(iter(machine.accelerators))
    else:
      return MachineChoice(machine, None, 0)

  if accelerator_type not in GPU_ACCELERATORS:
    raise ValueError(
        f"--accelerator_type={accelerator_type!r} is not a GPU type this launcher "
        f"knows ({', '.join(GPU_ACCELERATORS)}); for TPUs choose a TPU "
        f"--machine_type ({', '.join(n for n, m in MACHINE_TYPES.items() if m.is_tpu)})")
  allowed = machine.accelerators.get(accelerator_type)
  if allowed is None:
    raise ValueError(
        f"--accelerator_type={accelerator_type} cannot be used with "
        f"--machine_type={machine.name} (accepts: {_allowed_summary(machine)})")
  if accelerator_count is None or accelerator_count == 0:
    accelerator_count = min(allowed)
  if accelerator_count not in allowed:
    raise ValueError(
        f"--accelerator_count={accelerator_count}: {machine.name} takes "
        f"{accelerator_type} in counts {sorted(allowed)}")
  return MachineChoice(machine, accelerator_type, accelerator_count)
