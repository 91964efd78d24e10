"""`python -m tfds_record3d.build_benchmark` end to end at a tiny size: every
figure is reported and consistent, the captures are reused, bad flags are
named. No timing thresholds: the numbers depend on the machine and its load."""

import json
import math
import os
import subprocess
import sys

import pytest

from tfds_record3d import build_benchmark


def _run(args, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-m", "tfds_record3d.build_benchmark", *args], env=env,
                        capture_output=True, text=True, timeout=timeout)


TINY = ["--frames=20", "--captures=2", "--distinct_frames=2", "--image_size=64,48",
        "--depth_size=32,24"]


@pytest.mark.slow
def test_build_benchmark_reports_every_figure(tmp_path):
  out = tmp_path / "build.json"
  # beam_memory: Beam's own writer and the Beam path of the builder, in this
  # process (the multi-process runner is the same code plus worker start-up).
  # Two rounds, one with TFDS' unordered writer: what the README's table runs
  # with worker processes.
  proc = _run([*TINY, "--modes=in_process,beam_memory_unordered", "--rounds=2",
               "--num_shards=2", f"--workdir={tmp_path / 'w'}", f"--json={out}"])
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())
  assert result["frames"] == 20 and result["captures"] == 2
  assert result["check"]["seconds"] > 0 and result["check"]["frames_per_s"] > 0
  assert [(b["mode"], b["round"]) for b in result["builds"]] == [
      ("in_process", 1), ("beam_memory_unordered", 1), ("in_process", 2),
      ("beam_memory_unordered", 2)]
  assert [b["unordered"] for b in result["builds"]] == [False, True, False, True]
  for build in result["builds"]:
    assert build["frames"] == 20 and build["lost"] is None, build  # the builder checks too
    for key in ("seconds", "frames_per_s", "cpu_seconds", "launcher_cpu_seconds",
                "cpu_ms_per_frame", "cores_busy", "frames_per_s_bound"):
      assert math.isfinite(build[key]) and build[key] > 0, (build["mode"], key, build[key])
    assert build["cpu_seconds"] == pytest.approx(
        build["launcher_cpu_seconds"] + build["worker_cpu_seconds"])
    assert build["frames_per_s"] == pytest.approx(build["frames"] / build["seconds"])
  assert result["builds"][0]["beam_flags"] is None
  assert result["builds"][1]["beam_flags"] == ["--runner=FnApiRunner"]
  # The printed table has a row per build, the medians and the check's line.
  for row in ("| in_process (round 1) | 20 |", "| beam_memory_unordered (round 2) | 20 |",
              "Medians over 2 rounds, frames/s: in_process ", "Builds that lost frames: 0 of 4.",
              "Launcher check"):
    assert row in proc.stdout, (row, proc.stdout)
  # Where the Beam builds' time went: the runner's stages, seen in this run.
  assert result["builds"][0]["phases"] == []  # in process: no runner
  for build in result["builds"][1::2]:
    names = [p["phase"] for p in build["phases"]]
    assert names[:2] == [build_benchmark.STARTUP, build_benchmark.FIRST], names
    assert {"read + encode frames", "serialize, group by shard", "write shards",
            build_benchmark.LAST} <= set(names), names
    assert sum(p["seconds"] for p in build["phases"]) == pytest.approx(build["seconds"])
    assert all(p["worker_cores"] == 0 for p in build["phases"])  # beam_memory: no workers
  assert "| beam_memory_unordered (round 1) | read + encode frames |" in proc.stdout
  medians = build_benchmark.median_rates(result["builds"])
  assert medians["in_process"] == pytest.approx(
      (result["builds"][0]["frames_per_s"] + result["builds"][2]["frames_per_s"]) / 2)

  # A second run reuses the captures (same sizes) instead of writing them again.
  captures = sorted((tmp_path / "w" / "captures_20_2").glob("*.r3d"))
  assert len(captures) == 2
  mtimes = [p.stat().st_mtime_ns for p in captures]
  proc = _run([*TINY, "--modes=in_process", f"--workdir={tmp_path / 'w'}"])
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert [p.stat().st_mtime_ns for p in captures] == mtimes


def test_modes_turn_into_the_runner_flags_and_unknown_ones_are_named():
  assert build_benchmark.beam_flags("in_process") is None
  assert build_benchmark.beam_flags("beam_memory") == ["--runner=FnApiRunner"]
  assert build_benchmark.beam_flags("beam_3") == [
      "--runner=FnApiRunner", "--direct_num_workers=3", "--direct_running_mode=multi_processing"]
  assert build_benchmark.beam_flags("beam_2_unordered") == build_benchmark.beam_flags("beam_2")
  assert build_benchmark.unordered("beam_2_unordered") and not build_benchmark.unordered("beam_2")
  for bad in ("beam_0", "beam_x", "beam", "dataflow", "in_process_unordered", "beam_x_unordered"):
    with pytest.raises(ValueError, match=repr(bad)):
      build_benchmark.beam_flags(bad)


def test_bad_flags_stop_before_anything_is_written(tmp_path):
  proc = _run([*TINY, "--modes=in_process,beam_two", f"--workdir={tmp_path / 'w'}"])
  assert proc.returncode != 0 and "beam_two" in proc.stderr
  proc = _run(["--frames=5", "--captures=2", f"--workdir={tmp_path / 'w'}"])
  assert proc.returncode != 0 and "--frames=5" in proc.stderr
  proc = _run([*TINY[:-1], "--depth_size=32", f"--workdir={tmp_path / 'w'}"])
  assert proc.returncode != 0 and "--depth_size" in proc.stderr
  proc = _run([*TINY, "--rounds=0", f"--workdir={tmp_path / 'w'}"])
  assert proc.returncode != 0 and "--rounds=0" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_a_build_that_lost_frames_is_reported_not_hidden():
  build = {"mode": "beam_2", "frames": 40, "lost": "record3d/r3d: ... (train: 30 written of 40)",
           "seconds": 2.0, "frames_per_s": 20.0, "cpu_ms_per_frame": 90.0,
           "launcher_cpu_seconds": 1.2, "worker_cpu_seconds": 2.4, "cores_busy": 1.8,
           "frames_per_s_bound": 22.2}
  table = build_benchmark.format_table({"builds": [build], "machine": {"cpus": 2},
                                        "check": {"seconds": 1.0, "frames_per_s": 40.0}})
  assert "| beam_2 | LOST frames of 40 |" in table
  assert "beam_2: record3d/r3d: ... (train: 30 written of 40)" in table


def test_phases_split_the_build_at_the_stages_and_count_their_cpu():
  # Stages start at t=1, 3, 6, 7 of a build from 0 to 10; the launcher uses 1
  # core throughout, the workers 2 cores from t=3 to 6 and nothing otherwise.
  timeline = [(t, float(t), 2.0 * min(max(t - 3, 0), 3)) for t in range(11)]
  starts = [(1.0, "((test-Create-Impulse))"), (3.0, "(train-ReadFrames)+(train_write-Encode)"),
            (6.0, "(train_write-Serialize)"), (7.0, "(FinalizeWrite)")]
  rows = {p["phase"]: p for p in build_benchmark.phases(starts, timeline, 0.0, 10.0)}
  assert list(rows) == [build_benchmark.STARTUP, build_benchmark.FIRST, "read + encode frames",
                        "serialize, group by shard", build_benchmark.LAST]
  assert [rows[k]["seconds"] for k in rows] == [1.0, 2.0, 3.0, 1.0, 3.0]
  assert rows["read + encode frames"]["worker_cores"] == pytest.approx(2.0)
  assert rows["serialize, group by shard"]["worker_cores"] == pytest.approx(0.0)
  assert all(p["launcher_cores"] == pytest.approx(1.0) for p in rows.values())
  assert build_benchmark.phase_of("(x_write-Write-WriteImpl-WriteBundles_46)") == "write shards"
  assert build_benchmark.phase_of("(train-ListFrames_15)") == build_benchmark.OTHER
