"""The errors a user can fix: bad flags, inputs or workdir state.

`python -m trainer.main` (and the other CLIs) print these as one clear
message, without a traceback, and exit with status 2; anything else is a bug
and keeps its traceback. Each is raised before the run touches what it
protects, and its message names the flag or file and what is wrong.
"""


class UserInputError(ValueError):
  """Bad input the user can fix; the message says what and how."""


class ConfigMismatchError(UserInputError):
  """A rerun's settings differ from those the workdir's networks were trained with."""


class CheckpointError(UserInputError):
  """Checkpoints exist but none can be used."""


class WorkdirLockedError(UserInputError):
  """Another run holds the stage folder."""
