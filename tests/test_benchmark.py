"""`python -m trainer.benchmark` end to end at tiny sizes: every figure is
reported, positive and finite, and the JSON has every key. No timing
thresholds: the numbers themselves depend on the machine and its load."""

import json
import math
import os
import statistics
import subprocess
import sys

from absl import app
import pytest

from trainer import benchmark
from trainer import config as config_lib


def _run(args, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-m", "trainer.benchmark", *args], env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _positive(value, name):
  assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, value)


@pytest.mark.slow
def test_benchmark_reports_every_figure(tiny_record3d, tmp_path):
  data_dir, manual_dir = tiny_record3d
  out = tmp_path / "bench.json"
  proc = _run([
      "--dataset=record3d/pairs", f"--data_dir={data_dir}", f"--manual_dir={manual_dir}",
      "--image_sizes=32,24", "--image_sizes=48,36", "--scaling_sizes=16,16",
      "--pipeline_image_size=32,24",
      # The Keras backbones go through the same measure_train_step (a mobilenet_v3
      # row cost ~90 s of tracing here); their FLOP counts are tested in
      # test_backbones.py against the published figures.
      "--architectures=seed,unet", "--steps=1", "--warmup_steps=0", "--batch_size=2",
      "--pipeline_batches=3", "--seed_loader_examples=8", "--matmul_size=128",
      "--matmul_repeats=2", "--accuracy_budget_seconds=1", "--accuracy_image_size=16,16",
      "--accuracy_architectures=seed,unet",  # the backbones' runs are the same code, slower
      # The real-size part at tiny sizes: 20 frames, 64x48 JPEG, 32x24 PNG.
      "--real_size_frames=20", "--real_image_size=64,48", "--real_depth_size=32,24",
      "--real_train_sizes=16,12", "--real_train_sizes=32,24", "--png_image_size=32,24",
      "--png_train_size=16,12", "--real_steady_batches=2", "--breakdown_repeats=1",
      "--first_pass_rounds=2",
      f"--workdir={tmp_path / 'work'}", f"--json={out}"])
  result = json.loads(out.read_text())

  assert set(result) >= {"machine", "config", "matmul", "input_pipeline", "train_step",
                         "flops_ratio_seed_over_unet", "pipeline_over_training",
                         "accuracy", "targets", "total_seconds"}
  machine = result["machine"]
  assert machine["nproc"] >= 1 and machine["tensorflow"] and machine["cpu_model"]
  assert len(machine["loadavg_start"]) == 3 and len(machine["loadavg_end"]) == 3
  _positive(result["matmul"]["flops_per_s"], "matmul")
  assert len(result["matmul"]["measurements"]) == 2

  pipeline = result["input_pipeline"]
  for key in ("tfdata_first_pass_examples_per_s", "tfdata_steady_examples_per_s",
              "seed_loader_examples_per_s", "ratio_first_pass", "ratio_steady"):
    _positive(pipeline[key], key)
  assert pipeline["seed_loader_examples"] == 8 and pipeline["tfdata_steady_examples"] == 6
  # Two alternating rounds; the figures are their medians.
  assert pipeline["rounds"] == 2
  for key in ("tfdata_first_pass_examples_per_s", "seed_loader_examples_per_s",
              "tfdata_first_pass_augment_on_device_examples_per_s"):
    rounds = pipeline[key + "_rounds"]
    assert len(rounds) == 2 and pipeline[key] == pytest.approx(statistics.median(rounds))

  steps = result["train_step"]
  points = {(r["architecture"], tuple(r["image_size"])) for r in steps}
  # 3 sizes for each architecture; the default configuration (unet, 32x24) among them.
  architectures = ("seed", "unet")
  assert points == {(a, s) for a in architectures for s in ((16, 16), (32, 24), (48, 36))}
  for r in steps:
    for key in ("step_seconds_median", "examples_per_s", "forward_flops_per_example",
                "train_flops_per_example", "achieved_flops_per_s", "fraction_of_matmul",
                "step_time_vs_smallest", "pixels_vs_smallest", "trace_seconds"):
      _positive(r[key], key)
    assert len(r["step_seconds"]) == 1
    assert r["train_flops_per_example"] == 3 * r["forward_flops_per_example"]
  assert set(result["flops_ratio_seed_over_unet"]) == {"16x16", "32x24", "48x36"}
  for size, ratio in result["flops_ratio_seed_over_unet"].items():
    _positive(ratio, size)

  default = result["pipeline_over_training"]
  assert default["architecture"] == "unet" and default["image_size"] == [32, 24]
  for key in ("pipeline_examples_per_s", "train_examples_per_s", "ratio"):
    _positive(default[key], key)

  runs = {r["architecture"]: r for r in result["accuracy"]["runs"]}
  assert set(runs) == {"seed", "unet"}
  for r in runs.values():
    assert r["train_steps"] >= 1
    _positive(r["train_wall_seconds"], "train_wall_seconds")
    for key in ("abs_rel", "delta1", "rmse"):
      assert math.isfinite(r["test_metrics"][key]), (key, r["test_metrics"])

  real = result["real_size"]
  assert real["image_size"] == [64, 48] and real["depth_size"] == [32, 24]
  assert [q["image_size"] for q in real["points"]] == [[16, 12], [32, 24]]
  for q in real["points"] + [real["png"]]:
    for key in ("tfdata_first_pass_examples_per_s", "tfdata_steady_examples_per_s",
                "tfdata_first_pass_one_thread_examples_per_s",
                "tfdata_first_pass_examples_per_s_per_core", "seed_loader_examples_per_s",
                "ratio_first_pass"):
      _positive(q[key], key)
    assert q["train_files"] == 16  # 80% of the 20 frames, read by both loaders
    assert q["rounds"] == 2 and len(q["tfdata_first_pass_examples_per_s_rounds"]) == 2
    ratios = [a / b for a, b in zip(q["tfdata_first_pass_examples_per_s_rounds"],
                                    q["seed_loader_examples_per_s_rounds"])]
    assert q["ratio_first_pass"] == pytest.approx(statistics.median(ratios))
    # The same first pass with the augmentation left to the train step.
    device = q["tfdata_first_pass_augment_on_device_examples_per_s_rounds"]
    assert len(device) == 2
    _positive(q["tfdata_first_pass_augment_on_device_examples_per_s"], "on device")
    assert q["ratio_first_pass_augment_on_device"] == pytest.approx(statistics.median(
        a / b for a, b in zip(device, q["seed_loader_examples_per_s_rounds"])))
    for key in ("tfdata_first_pass_cpu_ms_per_example", "tfdata_first_pass_cores_busy",
                "seed_loader_ms_per_example", "cpu_ms_per_example_for_3x"):
      _positive(q[key], key)
    assert q["cpu_ms_per_example_for_3x"] == pytest.approx(
        1000 * os.cpu_count() / (3 * q["seed_loader_examples_per_s"]))
    # Every cut of the breakdown, cumulative, with what each stage adds.
    breakdown = q["first_pass_breakdown"]
    assert len(breakdown) == 7 and breakdown[0]["stage"].startswith("TFDS read")
    assert breakdown[-1]["stage"].startswith("train_dataset")
    for row in breakdown:
      _positive(row["ms_per_example"], row["stage"])
    assert breakdown[0]["stage_ms_per_example"] == breakdown[0]["ms_per_example"]
    for before, after in zip(breakdown, breakdown[1:]):
      assert after["stage_ms_per_example"] == pytest.approx(
          after["ms_per_example"] - before["ms_per_example"])
  for q in real["points"]:
    assert q["stored"] == "jpeg" and q["train_architecture"] == "unet"
    for key in ("train_examples_per_s", "first_pass_over_training", "steady_over_training"):
      _positive(q[key], key)
  assert real["png"]["stored"] == "png" and real["png"]["image_size"] == [16, 12]

  names = [t["name"] for t in result["targets"]]
  assert len(names) == 14 and all(isinstance(t["met"], bool) for t in result["targets"])
  # The printed report carries the same figures.
  for heading in ("Input pipeline", "Train step", "FLOPs per example", "Default configuration",
                  "Equal wall-clock budget", "Real size", "first pass vs training",
                  "CPU ms/example for 3x", "Where the first pass goes", "Targets",
                  "augmentation in the train step (--augment_on=device)"):
    assert heading in proc.stdout


def test_sizes_and_bad_flags():
  # Sizes are H,W in every command (the trainer's parser, naming the flag).
  assert config_lib.parse_image_size("96,72", "--image_sizes") == (96, 72)
  for bad in ("192", "4,4", "96x72", "a,b"):
    with pytest.raises(ValueError, match="--image_sizes="):
      config_lib.parse_image_size(bad, "--image_sizes")
  # Flag errors are raised before any work (in-process: no TensorFlow start-up cost).
  flags = benchmark.FLAGS
  flags(["benchmark", "--image_sizes=32,24", "--scaling_sizes=32,24",
         "--architectures=seed,unet"])
  try:
    with pytest.raises(app.UsageError, match="at least 3 distinct sizes"):
      benchmark.run_benchmark()
    flags.scaling_sizes = ["16,16", "48,36"]
    flags.architectures = ["seed", "resnet"]
    with pytest.raises(app.UsageError, match="unknown 'resnet'"):
      benchmark.run_benchmark()
  finally:
    flags.unparse_flags()
