"""The Beam loss check builds a dataset with no depth2d code and counts it."""

import time

from absl import app
from absl import flags
import pytest

from tfds_record3d import beam_loss_repro


def test_splits_hold_every_example_once():
  ranges = beam_loss_repro.split_ranges(5120)
  assert {name: len(r) for name, r in ranges.items()} == {"train": 4160, "validation": 480,
                                                           "test": 480}
  indices = [i for r in ranges.values() for i in r]
  assert sorted(indices) == list(range(5120))
  assert sum(len(r) for r in beam_loss_repro.split_ranges(41).values()) == 41


def test_lost_per_split():
  expected = {"train": 10, "validation": 2, "test": 2}
  assert beam_loss_repro.lost_per_split(expected, dict(expected)) == {}
  assert beam_loss_repro.lost_per_split(expected, {"train": 7, "validation": 2}) == {
      "train": 3, "test": 2}


def test_a_small_build_writes_every_example(tmp_path):
  # The in-memory FnApiRunner (workers=0): the real TFDS Beam build, fast.
  for per_capture in (5, 0):  # captures of 5 examples listed by a FlatMap; one per element
    result = beam_loss_repro.run_once(str(tmp_path / "build"), workers=0, examples=24,
                                      example_bytes=64, frames_per_capture=per_capture)
    assert result["written"] == result["expected"] == {"train": 19, "validation": 2, "test": 3}
    assert result["lost"] == {}


def test_exit_status_says_whether_a_run_lost_examples(tmp_path, monkeypatch):
  values = beam_loss_repro.define_flags(flags.FlagValues())  # apart from the trainer's flags
  values(["beam_loss_repro", "--runs=2", f"--data_dir={tmp_path}"])
  outcomes = iter([{}, {"train": 5}])
  monkeypatch.setattr(beam_loss_repro, "run_once", lambda *a, **k: {
      "expected": {"train": 10}, "written": {"train": 10}, "lost": next(outcomes),
      "seconds": 1.0})
  assert beam_loss_repro.main(["beam_loss_repro"], values) == 1
  values.runs = 1
  outcomes = iter([{}])
  assert beam_loss_repro.main(["beam_loss_repro"], values) == 0
  values.examples = 2
  with pytest.raises(app.UsageError, match="--examples=2: must be at least 3"):
    beam_loss_repro.main(["beam_loss_repro"], values)


def test_busy_ms_costs_cpu_and_leaves_the_example_alone():
  start = time.process_time()
  busy = beam_loss_repro.make_example(3, 16, busy_ms=20)
  assert time.process_time() - start >= 0.02
  key, example = beam_loss_repro.make_example(3, 16)
  assert busy[0] == key == "00000003" and busy[1]["data"] == example["data"]
  assert len(example["data"]) == 16 and example["index"] == 3


def test_captures_list_every_example_once():
  # record3d's shape: a capture per element, a FlatMap to its frames.
  for indices in (range(0, 4160), range(4160, 4640), range(7, 8), range(3, 400)):
    starts = beam_loss_repro.capture_starts(indices, 160)
    frames = [i for s in starts for i in beam_loss_repro.capture_frames(s, indices.stop, 160)]
    assert frames == list(indices)
