"""trainer.transfer_study end to end on the tiny dataset: a source run, a
transfer recipe and a scratch recipe, every split and stage scored."""

import json

from absl import flags
import pytest

from trainer import transfer_study


@pytest.mark.slow
def test_study_runs_its_recipes_and_writes_every_score(tiny_record3d, tmp_path):
  data_dir, _ = tiny_record3d
  values = transfer_study.define_flags(flags.FlagValues())  # apart from the trainer's flags
  values(["transfer_study", f"--workdir={tmp_path}", f"--data_dir={data_dir}",
          "--source_dataset=record3d/pairs", "--target_dataset=record3d/pairs",
          # One recipe: a scratch one is the source run's code path again (~40 s more).
          "--recipes=unet_transfer", "--seeds=0", "--image_size=32,24",
          "--train_steps=2", "--source_train_steps=2", "--global_batch_size=4"])
  transfer_study.main(["transfer_study"], values)
  study = json.loads((tmp_path / "study.json").read_text())
  assert [(r["recipe"], r["seed"]) for r in study["runs"]] == [("unet_transfer", 0)]
  transfer = study["runs"][0]
  assert transfer["overrides"]["init_from"] == study["settings"]["source_runs"]["unet"]
  for run in study["runs"]:
    for split in ("validation", "test"):
      for stage in ("rough", "finetune"):
        metrics = run["scores"][split][stage]
        assert metrics["num_images"] > 0 and "abs_rel" in metrics["median_scaled"]
  # The runs are scored from checkpoints: none of them wrote an export.
  assert list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("export"))
  table = (tmp_path / "study.md").read_text()
  assert "| unet_transfer | finetune | 0 |" in table and "## test" in table
