"""The optimizer and its learning-rate schedule (one per stage)."""

import keras

from trainer import precision

SCHEDULES = ("constant", "cosine", "warmup_cosine")


def learning_rate_schedule(peak: float, train_steps: int, schedule: str = "warmup_cosine",
                           warmup_steps: int = 0):
  """A float (constant) or a Keras schedule over `train_steps` optimizer steps.

  cosine decays from `peak` to 1% of it; warmup_cosine first rises linearly
  from 0 over `warmup_steps` (at most train_steps - 1), then decays the same way.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"--lr_schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
  if schedule == "constant":
    return peak
  if schedule == "cosine":
    return keras.optimizers.schedules.CosineDecay(peak, decay_steps=train_steps, alpha=0.01)
  warmup = min(warmup_steps, train_steps - 1)
  return keras.optimizers.schedules.CosineDecay(
      0.0, decay_steps=max(1, train_steps - warmup), alpha=0.01,
      warmup_target=peak, warmup_steps=warmup)


def make_optimizer(learning_rate, policy: str) -> keras.optimizers.Optimizer:
  """Adam, wrapped for dynamic loss scaling under mixed_float16."""
  return precision.wrap_optimizer(keras.optimizers.Adam(learning_rate), policy)


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
  lr = optimizer.learning_rate
  return float(lr.numpy() if hasattr(lr, "numpy") else lr)
