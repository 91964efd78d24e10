"""Properties of the split-by-sequence assignment (tfds_record3d.splits)."""

import random

import pytest

from tfds_record3d import splits


def _frames_of(plan):
  """{(sequence, position)} per split."""
  return {split: {(name, p) for name, positions in parts for p in positions}
          for split, parts in plan.items()}


def _random_counts(rng, n):
  return {f"seq_{rng.randrange(10**6)}_{i}": rng.randint(1, 60) for i in range(n)}


@pytest.mark.parametrize("num_sequences", [1, 2, 3, 4, 7, 30, 101])
def test_every_frame_lands_in_exactly_one_split(num_sequences):
  counts = _random_counts(random.Random(num_sequences), num_sequences)
  frames = _frames_of(splits.split_sequences(counts))
  all_frames = [f for split in splits.SPLIT_NAMES for f in frames[split]]
  assert len(all_frames) == len(set(all_frames)) == sum(counts.values())


@pytest.mark.parametrize("num_sequences", [3, 4, 5, 10, 30])
def test_sequences_are_never_shared_and_splits_are_non_empty(num_sequences):
  for trial in range(20):
    counts = _random_counts(random.Random(1000 * num_sequences + trial), num_sequences)
    plan = splits.split_sequences(counts)
    owners = {}
    for split, parts in plan.items():
      assert parts, f"{split} empty for {counts}"
      for name, positions in parts:
        assert positions == range(counts[name]), "a sequence must go whole to one split"
        assert owners.setdefault(name, split) == split


def test_deterministic_and_independent_of_listing_order():
  counts = _random_counts(random.Random(7), 25)
  shuffled = list(counts.items())
  random.Random(8).shuffle(shuffled)
  assert splits.split_sequences(counts) == splits.split_sequences(dict(shuffled))


def test_about_80_10_10_of_frames():
  rng = random.Random(3)
  counts = {f"capture_{i:03d}": rng.randint(25, 45) for i in range(60)}
  plan = splits.split_sequences(counts)
  total = sum(counts.values())
  share = {s: sum(len(p) for _, p in parts) / total for s, parts in plan.items()}
  assert share["train"] == pytest.approx(0.8, abs=0.04)
  assert share["validation"] == pytest.approx(0.1, abs=0.04)
  assert share["test"] == pytest.approx(0.1, abs=0.04)


@pytest.mark.parametrize("num_frames", [3, 4, 10, 37, 1059])
def test_single_sequence_is_cut_in_contiguous_ordered_blocks(num_frames):
  plan = splits.split_sequences({"only": num_frames})
  blocks = [plan[s][0][1] for s in splits.SPLIT_NAMES]  # each split non-empty
  assert blocks[0].start == 0 and blocks[-1].stop == num_frames
  for before, after in zip(blocks, blocks[1:]):
    assert before.stop == after.start and before.step == 1
  if num_frames >= 20:
    assert len(blocks[0]) / num_frames == pytest.approx(0.8, abs=0.05)


def test_two_sequences_are_each_cut_in_blocks():
  plan = splits.split_sequences({"a": 10, "b": 20})
  for split in splits.SPLIT_NAMES:
    assert {name for name, _ in plan[split]} == {"a", "b"}
