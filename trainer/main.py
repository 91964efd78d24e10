r"""Train, evaluate and export depth2d networks.

  python -m trainer.main --model_dir=runs/demo                  # everything on synthetic data
  python -m trainer.main --model_dir=M --stage=gradient --dataset=record3d/pairs \
      --manual_dir=~/captures --image_size=192,144 --train_steps=20000

See README.md (Training) and `--helpfull` for every flag.
"""

from absl import app
from absl import flags
from absl import logging

from trainer import cloud_env
from trainer import config as config_lib
from trainer import stages

config_lib.define_flags()
flags.adopt_module_key_flags(config_lib)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    dirs = cloud_env.resolve_output_dirs(FLAGS.model_dir, FLAGS.checkpoint_dir,
                                         FLAGS.tensorboard_dir)
    config = config_lib.config_from_flags(FLAGS, dirs.model_dir, dirs.checkpoint_dir,
                                          dirs.tensorboard_dir)
  except ValueError as e:
    raise app.UsageError(str(e))
  results = stages.train_and_evaluate(config)
  for stage, result in results.items():
    state = "stopped by SIGTERM (rerun to resume)" if result.preempted else "done"
    logging.info("%s: %s at step %d", stage, state, result.step)


if __name__ == "__main__":
  app.run(main)
