"""trainer.evaluate on exports of a tiny model trained by the real trainer.

The agreement test: `--resolution=model` on the SavedModel and on a float32
TFLite file gives the metrics of the trainer's own eval of that checkpoint
(`<model_dir>/rough/metrics.json`, same split, same size: 24x18 from 64x48
RGB). The trainer's eval resizes the RGB in float; the export gets it resized
to 24x18 as uint8 (what a phone app feeds a fixed-size TFLite file), so the
inputs differ by the rounding of 0.5/255 at most: measured here, the metrics
then differ by ~1e-6 relative, well inside RTOL.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from trainer import datasets
from trainer import errors
from trainer import export_eval
from trainer import input_pipeline
from trainer import metrics as metrics_lib
from trainer import report
from trainer import stages
from trainer import tflite_export


# Neither the stored RGB size (64x48) nor the stored depth size (32x24), so
# that the model and depth resolutions differ.
TRAINED_SIZE = (24, 18)
NUM_TEST_IMAGES = 4  # the tiny build's test split
# The trainer averages per-image float32 metrics in float64; evaluate does the
# same image by image: float32 rounding of the network and the metrics, and the
# uint8 rounding of the resized RGB (see the module docstring).
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def trained(make_config, tmp_path_factory):
  """(config, SavedModel dir, float32 .tflite path) of a 4-step rough model."""
  config = make_config(tmp_path_factory.mktemp("trained"), stage="rough", image_size=TRAINED_SIZE)
  results = stages.train_and_evaluate(config)
  export_dir = f"{config.model_dir}/export"
  tflite = tflite_export.export_tflite(results["rough"].model, config.image_size,
                                       config.max_depth, export_dir, ("float32",))["float32"]
  return config, export_dir, tflite


def _options(config, **overrides):
  values = dict(dataset=config.dataset, data_dir=config.data_dir, split=config.eval_split,
                latency_repeats=0)
  values.update(overrides)
  return export_eval.ExportEvalOptions(**values)


def _trainer_metrics(config):
  with open(f"{config.model_dir}/rough/metrics.json") as f:
    return json.load(f)


def _assert_same_metrics(ours, theirs):
  assert ours["num_images"] == theirs["num_images"] == NUM_TEST_IMAGES
  for name in metrics_lib.METRIC_NAMES:
    assert ours[name] == pytest.approx(theirs[name], rel=RTOL, abs=ATOL), name
    assert ours["median_scaled"][name] == pytest.approx(
        theirs["median_scaled"][name], rel=RTOL, abs=ATOL), f"median_scaled {name}"


@pytest.mark.parametrize("kind", ["saved_model", "tflite"])
def test_model_resolution_gives_the_trainers_metrics(trained, tmp_path, kind):
  config, export_dir, tflite = trained
  path = export_dir if kind == "saved_model" else tflite
  summary = export_eval.evaluate_export(path, str(tmp_path / "out"),
                                     _options(config, resolution="model"))
  assert summary["model_kind"] == kind
  assert summary["evaluated_sizes"] == [list(TRAINED_SIZE)]
  _assert_same_metrics(summary, _trainer_metrics(config))
  # What was written is what was returned.
  with open(tmp_path / "out" / "metrics.json") as f:
    _assert_same_metrics(json.load(f), summary)


def test_in_loop_eval_reports_median_scaled_metrics(trained, event_scalars):
  """The trainer's own eval: metrics.json, TensorBoard and results.md."""
  config, _, _ = trained
  saved = _trainer_metrics(config)
  assert set(saved["median_scaled"]) == set(metrics_lib.METRIC_NAMES) | {"num_images"}
  assert saved["median_scaled"]["num_images"] == saved["num_images"] == NUM_TEST_IMAGES
  # Scale-free: the median-scaled abs_rel differs from the metric one of a 4-step model.
  assert saved["median_scaled"]["abs_rel"] != pytest.approx(saved["abs_rel"], rel=1e-3)
  logdir = f"{config.model_dir}/rough/tensorboard"
  assert event_scalars(logdir, "eval_median_scaled/abs_rel") == {
      config.train_steps: pytest.approx(saved["median_scaled"]["abs_rel"], rel=1e-6)}
  assert event_scalars(logdir, "eval/abs_rel") == {
      config.train_steps: pytest.approx(saved["abs_rel"], rel=1e-6)}
  builder = datasets.get_builder(config.dataset, config.data_dir)
  report.write_report(config, builder, {"rough": saved})
  text = open(f"{config.model_dir}/results.md").read()
  metric_part, scaled_part = text.split("## Median-scaled")
  assert f"{saved['abs_rel']:.4f}" in metric_part
  assert f"{saved['median_scaled']['abs_rel']:.4f}" in scaled_part
  assert scaled_part.count("| constant (train median") == 1  # the baseline row too
  rows = json.load(open(f"{config.model_dir}/results.json"))
  constant = next(v for k, v in rows.items() if k.startswith("constant"))
  # Median-scaled, a constant prediction becomes each image's own median depth.
  assert constant["median_scaled"]["abs_rel"] < constant["abs_rel"]


def test_outputs_of_the_default_depth_resolution(trained, tmp_path, tiny_record3d):
  config, _, tflite = trained
  out = tmp_path / "out"
  summary = export_eval.evaluate_export(tflite, str(out), _options(config, latency_repeats=2))
  assert sorted(os.listdir(out)) == sorted(export_eval.OUTPUT_FILES)
  # Scored at the stored depth size (conftest.TINY_DEPTH_SIZE), ground truth untouched:
  # the valid pixels are exactly the stored ones in range with enough confidence.
  assert summary["resolution"] == "depth" and summary["evaluated_sizes"] == [[32, 24]]
  builder = datasets.get_builder("record3d/pairs", tiny_record3d[0])
  stored = list(builder.as_dataset(split="test", shuffle_files=False).as_numpy_iterator())
  expected_valid = [int(np.sum((ex["depth"] > summary["min_depth"])
                               & (ex["depth"] < summary["max_depth"])
                               & (ex["confidence"] >= summary["min_confidence"])))
                    for ex in stored]
  with open(out / "per_image.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == NUM_TEST_IMAGES
  assert [(r["sequence"], int(r["frame"])) for r in rows] == \
      [(ex["sequence"].decode(), int(ex["frame"])) for ex in stored]
  assert [int(r["num_valid"]) for r in rows] == expected_valid
  # The summary is the mean of the CSV's rows (per image, then over images).
  for name in ("abs_rel", "rmse", "delta1"):
    assert summary[name] == pytest.approx(np.mean([float(r[name]) for r in rows]), rel=1e-5)
    assert summary["median_scaled"][name] == pytest.approx(
        np.mean([float(r[f"median_scaled_{name}"]) for r in rows]), rel=1e-5)
  saved = json.load(open(out / "metrics.json"))
  assert saved["model"] == tflite and saved["dataset"] == "record3d/pairs"
  assert saved["split"] == "test" and saved["num_images"] == NUM_TEST_IMAGES
  assert saved["file_size_bytes"] == os.path.getsize(tflite)
  latency = saved["latency_ms"]
  assert latency["1_thread"] > 0 and latency["all_cores"] > 0
  assert latency["image_size"] == list(TRAINED_SIZE)
  for name in ("errors_by_depth.png", "worst.png"):
    image = Image.open(out / name)
    assert image.format == "PNG" and min(image.size) > 300, name
  # 3 worst + 3 best of 4 images: every image once, 4 rows taller than wide.
  assert Image.open(out / "worst.png").height > Image.open(out / "worst.png").width * 0.8


def test_model_resolution_ground_truth_is_the_trainers(make_config, tmp_path):
  """score_inputs' ground truth equals input_pipeline.eval_dataset's, pixel for pixel."""
  config = make_config(tmp_path, eval_min_confidence=2)
  builder = datasets.get_builder(config.dataset, config.data_dir)
  theirs = np.concatenate([b["depth"].numpy()[..., 0] for b in
                           input_pipeline.eval_dataset(config, "rough", builder)])
  options = export_eval.resolve_options(_options(config, resolution="model", min_confidence=2), {})
  trainer_config = export_eval.trainer_config(options, config.image_size)

  class Constant:  # any model: only the ground truth is compared here
    def predict(self, rgb):
      assert rgb.dtype == np.uint8 and rgb.shape == (*config.image_size, 3)
      return np.ones(rgb.shape[:2], np.float32)

  ours = [export_eval.score_inputs(ex, Constant(), options, trainer_config)[1]
          for ex in builder.as_dataset(split="test", shuffle_files=False).as_numpy_iterator()]
  np.testing.assert_array_equal(np.stack(ours), theirs[:len(ours)])
  assert (theirs > 0).any()


def test_existing_outputs_are_never_overwritten(trained, tmp_path):
  config, _, tflite = trained
  out = tmp_path / "out"
  out.mkdir()
  (out / "metrics.json").write_text("earlier")
  (out / "notes.txt").write_text("mine")
  with pytest.raises(errors.UserInputError, match="--overwrite") as error:
    export_eval.evaluate_export(tflite, str(out), _options(config))
  assert "metrics.json" in str(error.value) and str(out) in str(error.value)
  assert (out / "metrics.json").read_text() == "earlier"
  assert sorted(os.listdir(out)) == ["metrics.json", "notes.txt"]
  export_eval.evaluate_export(tflite, str(out), _options(config, overwrite=True, num_extremes=1))
  assert json.load(open(out / "metrics.json"))["num_images"] == NUM_TEST_IMAGES
  assert (out / "notes.txt").read_text() == "mine"


def test_a_model_that_is_not_ours_is_a_clear_error(trained, tmp_path):
  config, _, _ = trained
  junk = tmp_path / "model.tflite"
  junk.write_bytes(b"not a flatbuffer")
  for path, fragment in ((junk, "not a TFLite model"), (tmp_path / "missing", "no such file"),
                         (tmp_path, "not a SavedModel folder")):
    with pytest.raises(errors.UserInputError, match=fragment) as error:
      export_eval.evaluate_export(str(path), str(tmp_path / "out"), _options(config))
    assert f"--model={path}" in str(error.value)
  assert not (tmp_path / "out").exists()


def test_bad_options_are_clear_errors(trained, tmp_path):
  config, export_dir, _ = trained
  for overrides, fragment in (({"min_confidence": 3}, "--min_confidence"),
                              ({"min_depth": 5.0, "max_depth": 1.0}, "--min_depth"),
                              ({"split": "nope"}, "--split")):
    with pytest.raises(errors.UserInputError, match=fragment):
      export_eval.evaluate_export(export_dir, str(tmp_path / "out"), _options(config, **overrides))
  assert not (tmp_path / "out").exists()


def test_depth_bin_sums_hand_values():
  truth = np.array([[0.5, 1.5], [1.6, 0.0]], np.float32)  # (1,1) invalid
  prediction = np.array([[1.0, 1.5], [0.8, 7.0]], np.float32)
  edges = np.array([0.0, 1.0, 2.0])
  sums = export_eval.depth_bin_sums(truth, prediction, truth > 0, 2.0, edges, 0.1, 10.0)
  np.testing.assert_allclose(sums["count"], [1, 2])
  np.testing.assert_allclose(sums["abs_rel"], [1.0, 0.0 + 0.5])  # |0.5-1|/0.5; 0, 0.8/1.6
  np.testing.assert_allclose(sums["sq"], [0.25, 0.64])
  np.testing.assert_allclose(sums["scaled_abs_rel"], [3.0, 1.0 + 0.0])  # p x2: 2, 3, 1.6
  errors_by_bin = export_eval.depth_bin_errors(sums)
  np.testing.assert_allclose(errors_by_bin["rmse"], [0.5, np.sqrt(0.32)])
  np.testing.assert_allclose(errors_by_bin["scaled_abs_rel"], [3.0, 0.5])


def test_extremes_keep_the_worst_and_best_once():
  keeper = export_eval.Extremes(2)
  for value in (0.3, 0.1, 0.9, 0.5, 0.2):
    keeper.offer({"abs_rel": value})
  worst, best = keeper.worst_and_best()
  assert [x["abs_rel"] for x in worst] == [0.9, 0.5]
  assert [x["abs_rel"] for x in best] == [0.1, 0.2]
  few = export_eval.Extremes(3)
  for value in (0.3, 0.1):
    few.offer({"abs_rel": value})
  worst, best = few.worst_and_best()
  assert [x["abs_rel"] for x in worst] == [0.3, 0.1] and best == []


# ---------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------
def _cli(args, env):
  return subprocess.run([sys.executable, "-m", "trainer.evaluate", *args], capture_output=True,
                        text=True, env=env, timeout=300, check=False)


@pytest.mark.slow
def test_cli_writes_every_output_and_refuses_bad_input(trained, tmp_path, tiny_record3d,
                                                       subprocess_env):
  # The .tflite file: SavedModel latency runs in 2 more processes (exported_model).
  config, _, tflite = trained
  data_dir, manual_dir = tiny_record3d
  out = tmp_path / "out"
  args = [f"--model={tflite}", "--dataset=record3d/pairs", f"--manual_dir={manual_dir}",
          f"--data_dir={data_dir}", "--split=test", f"--output_dir={out}", "--resolution=model",
          "--latency_repeats=2"]
  done = _cli(args, subprocess_env())
  assert done.returncode == 0, done.stderr[-3000:]
  assert sorted(os.listdir(out)) == sorted(export_eval.OUTPUT_FILES)
  summary = json.load(open(out / "metrics.json"))
  _assert_same_metrics(summary, _trainer_metrics(config))
  assert summary["latency_ms"]["1_thread"] > 0 and summary["latency_ms"]["all_cores"] > 0
  assert "evaluate test: 4/4 (100%)" in done.stderr  # progress with time left
  assert " left" in done.stderr
  # Earlier outputs: refused, one message, no traceback, exit 2.
  again = _cli(args, subprocess_env())
  assert again.returncode == 2 and "Traceback" not in again.stderr
  assert "trainer.evaluate: error:" in again.stderr and "--overwrite" in again.stderr
  # Not one of our models.
  junk = tmp_path / "junk.tflite"
  junk.write_bytes(b"\0" * 64)
  bad = _cli([f"--model={junk}", f"--output_dir={tmp_path / 'other'}", f"--data_dir={data_dir}",
              "--dataset=record3d/pairs"], subprocess_env())
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert f"trainer.evaluate: error: --model={junk}" in bad.stderr
  assert not (tmp_path / "other").exists()
