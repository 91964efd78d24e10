"""Mixed precision: which policy for which device, and the optimizer it needs."""

from absl import logging
import keras
import tensorflow as tf

from trainer import errors

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
CHOICES = ("auto",) + POLICIES  # --mixed_precision


def resolve_policy(name: str, strategy: tf.distribute.Strategy) -> str:
  """`auto`: bfloat16 on TPU (native), float16 on GPU (tensor cores), float32 on CPU.

  CPUs gain nothing reliable from half precision, so auto keeps float32 there;
  mixed_float16 / mixed_bfloat16 can still be forced on CPU (tests do).
  """
  if name != "auto":
    if name not in POLICIES:
      raise errors.UserInputError(f"--mixed_precision={name!r} is not one of auto, {', '.join(POLICIES)}")
    return name
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return "mixed_bfloat16"
  if tf.config.list_logical_devices("GPU"):
    return "mixed_float16"
  return "float32"


def set_global_policy(policy: str) -> None:
  """Layers built after this compute in the policy's dtype, variables stay float32.

  The networks keep their output layer in float32 (models.py), so losses and
  metrics see float32 predictions.
  """
  keras.mixed_precision.set_global_policy(policy)
  logging.info("mixed precision policy: %s", policy)


def wrap_optimizer(optimizer: keras.optimizers.Optimizer, policy: str) -> keras.optimizers.Optimizer:
  """float16 needs dynamic loss scaling against gradient underflow; bfloat16 does not."""
  if policy == "mixed_float16":
    return keras.optimizers.LossScaleOptimizer(optimizer)
  return optimizer
