"""How an image size is written on every command line of the project: "H,W".

The dataset's tools and the trainer's flags (trainer.config re-exports it)
parse sizes with this one function, so every command accepts the same form
and refuses a bad one with the same message.
"""

from typing import Tuple


def parse_image_size(text: str, flag: str = "--image_size") -> Tuple[int, int]:
  """'H,W' -> (H, W): the one form of an image size in every command."""
  try:
    height, width = (int(v) for v in text.split(","))
  except ValueError:
    raise ValueError(f"{flag}={text!r} must be H,W (two integers), e.g. 128,96") from None
  if height < 8 or width < 8:
    raise ValueError(f"{flag}={text!r}: both sides must be at least 8 pixels")
  return height, width
