r"""Train, evaluate and export depth2d networks.

  python -m trainer.main --model_dir=runs/demo                  # everything on synthetic data
  python -m trainer.main --model_dir=M --stage=gradient --dataset=record3d/pairs \
      --manual_dir=~/captures --image_size=192,144 --train_steps=20000

See README.md (Training) and `--helpfull` for every flag.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from tfds_record3d import ManualInputError
from trainer import cloud_env
from trainer import config as config_lib
from trainer import errors
from trainer import stages
from trainer import train

config_lib.define_flags()
flags.adopt_module_key_flags(config_lib)
FLAGS = flags.FLAGS

# Shown as one message, without a traceback (exit status 2; a diverged run: 1).
_USER_ERRORS = (errors.UserInputError, ManualInputError, FileNotFoundError)


def fail(message: str, status: int = 2) -> None:
  print(f"trainer.main: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
  try:
    dirs = cloud_env.resolve_output_dirs(FLAGS.model_dir, FLAGS.checkpoint_dir,
                                         FLAGS.tensorboard_dir)
    config = config_lib.config_from_flags(FLAGS, dirs.model_dir, dirs.checkpoint_dir,
                                          dirs.tensorboard_dir)
  except ValueError as e:  # a flag: the message names it
    fail(str(e))
  try:
    results = stages.train_and_evaluate(config)
  except _USER_ERRORS as e:
    fail(str(e))
  except train.NonFiniteLossError as e:
    fail(str(e), status=1)
  for stage, result in results.items():
    state = "stopped by SIGTERM (rerun to resume)" if result.preempted else "done"
    logging.info("%s: %s at step %d", stage, state, result.step)


if __name__ == "__main__":
  app.run(main)
