"""The training configuration: absl flags in, one frozen dataclass out.

Every run writes its resolved configuration to `<model_dir>/config.json`, so
the workdir says exactly what produced it; `--flagfile` replays a saved set.
"""

import dataclasses
import json
from typing import Optional, Tuple

from absl import flags

# The one form of an image size ("H,W"), shared with the dataset's commands.
from tfds_record3d.sizes import parse_image_size  # noqa: F401  (trainer.config.parse_image_size)

# The choice lists live with what they choose; the flags take them from there.
from trainer import augmentation
from trainer import backbones
from trainer import checkpoints
from trainer import depth_ops
from trainer import distribute
from trainer import losses
from trainer import models
from trainer import optimization
from trainer import precision
from trainer import stages
from trainer import tflite_export


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run depends on. Field docs are the flags' --help texts."""
  model_dir: str
  checkpoint_dir: Optional[str] = None
  tensorboard_dir: Optional[str] = None
  # Data.
  dataset: str = "record3d/synthetic"
  data_dir: Optional[str] = None
  manual_dir: Optional[str] = None
  image_size: Tuple[int, int] = (64, 48)
  depth_resize: str = "valid_average"
  min_depth: float = 0.1
  max_depth: float = 10.0
  augment: bool = True
  augment_on: str = "auto"  # resolved per process: augmentation.resolve_place
  shuffle_buffer: int = 256
  cache_dir: Optional[str] = None  # None: in memory when the split fits, else no cache
  jpeg_reduced_decode: bool = False
  # Which depth pixels count: confidence below this is invalid, like a hole.
  min_confidence: int = 1
  eval_min_confidence: Optional[int] = None  # None: --min_confidence
  # Model.
  stage: str = "all"
  architecture: str = "unet"
  encoder_weights: str = "auto"  # resolved in __post_init__
  freeze_gradient: bool = True
  finetune_init: str = "rough"
  init_from: Optional[str] = None
  # Measured (README "Generalisation"): finetune from this run's rough net beats
  # finetune from the other run's finetune net on the held-out rooms.
  init_from_stages: Tuple[str, ...] = ("rough", "gradient")
  # Optimisation.
  global_batch_size: int = 8
  train_steps: int = 500
  learning_rate: float = 2e-3
  lr_schedule: str = "warmup_cosine"
  warmup_steps: int = 50
  loss: str = "l1"
  gradient_matching_weight: float = 0.5
  encoder_learning_rate_multiplier: float = 1.0
  freeze_encoder_steps: int = 0
  seed: int = 0
  # Loop.
  mode: str = "train_and_eval"
  steps_per_loop: int = 10
  log_every_steps: int = 50
  eval_every_steps: int = 0
  checkpoint_every_steps: int = 200
  keep_checkpoints: int = 3
  eval_split: str = "test"
  num_eval_examples: int = 0
  num_image_summaries: int = 4
  # Distribution.
  strategy: str = "auto"
  num_devices: Optional[int] = None
  tpu: Optional[str] = None
  mixed_precision: str = "auto"
  # Exports: the SavedModel always; TFLite files when asked.
  export: bool = True  # SavedModel (and --tflite) exports when a run ends
  tflite: Tuple[str, ...] = ()
  tflite_input_size: Optional[Tuple[int, int]] = None  # None: --image_size
  tflite_calibration_examples: int = 200
  # Demo chain after `--stage=all`: export, predict a few test images, report.
  num_predict_images: int = 4
  # Reruns on an existing --model_dir.
  config_mismatch: str = "error"
  rebuild_dataset: bool = False

  def __post_init__(self):
    if self.encoder_weights == "auto":  # ImageNet for a pretrained backbone, else none
      object.__setattr__(self, "encoder_weights", "imagenet" if self.architecture in
                         backbones.ARCHITECTURES else "none")

  @property
  def eval_confidence(self) -> int:
    """The confidence below which ground truth is ignored by the metrics."""
    return self.min_confidence if self.eval_min_confidence is None else self.eval_min_confidence

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


# Settings a rerun on the same --model_dir may change: how long, how often, on
# what hardware, where the data sits. Every other field defines the trained
# networks or their recipe (architecture, sizes, data, loss, schedule, batch...)
# and must equal what config.json recorded, or the run stops (--config_mismatch).
RESUMABLE_FIELDS = frozenset({
    "model_dir", "checkpoint_dir", "tensorboard_dir", "data_dir", "manual_dir",
    "stage", "mode", "train_steps", "steps_per_loop", "log_every_steps", "eval_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "eval_split", "num_eval_examples",
    "num_image_summaries", "strategy", "num_devices", "tpu", "mixed_precision",
    "num_predict_images", "config_mismatch", "rebuild_dataset", "eval_min_confidence",
    "export", "tflite", "tflite_input_size", "tflite_calibration_examples", "cache_dir",
    # Where the augmentation runs: the same training tensors either way (to float rounding).
    "augment_on",
    # Only read when a stage starts from nothing: a resumed run ignores them.
    "init_from", "init_from_stages",
})
# Settings that define only one stage's network: they block a rerun only once
# that stage has a checkpoint.
STAGE_FIELDS = {"finetune_init": "finetune", "freeze_gradient": "finetune"}
CONFIDENCE_LEVELS = (0, 1, 2)  # Record3D: low, medium, high
CONFIG_MISMATCH_CHOICES = ("error", "allow")


def differences(stored: dict, config: Config) -> Tuple[dict, dict]:
  """(blocking, allowed): {field: (stored value, given value)} between a stored
  config.json and this run. A field the stored file predates counts as stored
  at its default."""
  given = json.loads(config.to_json())
  defaults = json.loads(Config(model_dir="").to_json())
  blocking, allowed = {}, {}
  for name, value in given.items():
    before = stored.get(name, defaults[name])
    if before != value:
      (allowed if name in RESUMABLE_FIELDS else blocking)[name] = (before, value)
  return blocking, allowed


def define_flags() -> None:
  """Declares the trainer's flags (idempotent, so tests can import main twice)."""
  if "model_dir" in flags.FLAGS:
    return
  default = Config(model_dir="")
  f = flags
  f.DEFINE_string("model_dir", None,
                  "Workdir: checkpoints, summaries, metrics, config.json and exports "
                  "go here (one subfolder per stage). Local path or gs://. On Vertex AI "
                  "it defaults to AIP_MODEL_DIR.")
  f.DEFINE_string("checkpoint_dir", None, "Checkpoints (default <model_dir>/<stage>/checkpoints; "
                  "on Vertex AI, AIP_CHECKPOINT_DIR/<stage>).")
  f.DEFINE_string("tensorboard_dir", None, "TensorBoard logs (default <model_dir>/<stage>/tensorboard; "
                  "on Vertex AI, AIP_TENSORBOARD_LOG_DIR/<stage>).")
  f.DEFINE_string("dataset", default.dataset, "TFDS name, e.g. record3d/synthetic, record3d/pairs, "
                  "record3d/r3d. It is built first if missing from --data_dir.")
  f.DEFINE_string("data_dir", default.data_dir, "TFDS data_dir (default: TFDS' own, ~/tensorflow_datasets).")
  f.DEFINE_string("manual_dir", default.manual_dir, "Manual folder for building record3d/pairs or "
                  "record3d/r3d when it is not yet prepared.")
  f.DEFINE_string("image_size", ",".join(map(str, default.image_size)),
                  "Training size H,W; RGB and depth are resized to it (portrait 4:3 keeps "
                  "Record3D's aspect). The default is small so the demo runs in minutes on a "
                  "laptop CPU; use e.g. 192,144 or 384,288 for real captures on accelerators.")
  f.DEFINE_enum("depth_resize", default.depth_resize, depth_ops.RESIZE_METHODS,
                "How depth is resized: nearest, or an average over valid pixels only; both "
                "keep invalid (0) pixels from bleeding into valid ones.")
  f.DEFINE_float("min_depth", default.min_depth, "Depth below this (m) is invalid in losses and metrics.")
  f.DEFINE_float("max_depth", default.max_depth, "Depth above this (m) is invalid in losses and metrics.")
  f.DEFINE_integer("min_confidence", default.min_confidence,
                   "Depth pixels whose confidence (Record3D: 0 low, 1 medium, 2 high; 2 where "
                   "the source has none) is below this are invalid in the losses and the "
                   "metrics, like holes. 1 drops the LiDAR's low-confidence returns (edges, "
                   "dark or glossy surfaces, far away); see README.")
  f.DEFINE_integer("eval_min_confidence", default.eval_min_confidence,
                   "The same for the metrics only (default: --min_confidence), so runs "
                   "trained with different masks are scored alike.")
  f.DEFINE_bool("augment", default.augment, "Horizontal flip and colour jitter on training examples.")
  f.DEFINE_enum("augment_on", default.augment_on, augmentation.PLACES,
                "Where --augment runs: host (the input pipeline, per example), device (the "
                "train step, per batch, on the accelerator, with the mask and the target, and the "
                "image resize when the split has one image size: the host CPU then only "
                "decodes and resizes depth), or "
                "auto: device when this process sees a GPU or TPU, else host. Same training "
                "tensors either way, to float rounding.")
  f.DEFINE_string("cache_dir", default.cache_dir,
                  "Cache the decoded, resized training split in files here (for splits that do "
                  "not fit in memory; by default a split that fits is cached in memory). One "
                  "run per folder at a time.")
  f.DEFINE_bool("jpeg_reduced_decode", default.jpeg_reduced_decode,
                "Decode training JPEGs at reduced scale (libjpeg DCT ratio) where the size "
                "allows: a faster input pipeline, but exports see full decodes, and a net "
                "trained this way scored worse served (README Performance). Off by default.")
  f.DEFINE_integer("shuffle_buffer", default.shuffle_buffer, "Training shuffle buffer (examples).")
  f.DEFINE_enum("stage", default.stage, stages.STAGE_CHOICES,
                "rough: the seed's baseline net; gradient: predicts the Sobel edges of depth; "
                "finetune: depth net fed with the trained gradient net's output (see "
                "--finetune_init); all: rough, gradient, then finetune, each in "
                "<model_dir>/<stage>.")
  f.DEFINE_enum("architecture", default.architecture, models.ARCHITECTURES,
                "seed: the notebook's body exactly (no downsampling, ~0.41 M MACs/pixel); "
                "unet: encoder-decoder with skips, far cheaper (see README Performance).")
  f.DEFINE_string("encoder_weights", default.encoder_weights,
                  "mobilenet_v3 / resnet50: the encoder's starting weights: imagenet (Keras' "
                  "file, downloaded or found in ~/.keras/models; see README for offline use), "
                  "none (random), or a .weights.h5 / .keras file. auto: imagenet for those, "
                  "none for seed / unet (which have no pretrained encoder).")
  f.DEFINE_string("init_from", default.init_from,
                  "Start each stage that has no checkpoint yet from the same stage of another "
                  "run: a --model_dir (its <stage>/checkpoints) or a stage folder of one. "
                  "Weights only; the optimizer starts fresh. Same --architecture and "
                  "--image_size required.")
  f.DEFINE_list("init_from_stages", list(default.init_from_stages),
                "The stages --init_from applies to. The default leaves finetune out: it "
                "starts from this run's own rough net (--finetune_init=rough), already "
                "trained on this data, which measured better than the other run's finetune "
                "net (README Generalisation); add finetune to start it from --init_from.")
  f.DEFINE_bool("freeze_gradient", default.freeze_gradient,
                "Finetune stage: keep the gradient net's weights fixed.")
  f.DEFINE_enum("finetune_init", default.finetune_init, checkpoints.FINETUNE_INITS,
                "Finetune stage: rough (fine-tune the trained rough net of this --model_dir, "
                "its gradient-input weights starting at zero, so step 0 predicts what rough "
                "does) or scratch (a freshly initialised body).")
  f.DEFINE_integer("global_batch_size", default.global_batch_size,
                   "Examples per step over all replicas; must divide by the replica count.")
  f.DEFINE_integer("train_steps", default.train_steps, "Optimizer steps per stage.")
  f.DEFINE_float("learning_rate", default.learning_rate, "Peak learning rate (Adam).")
  f.DEFINE_enum("lr_schedule", default.lr_schedule, optimization.SCHEDULES, "Learning-rate schedule.")
  f.DEFINE_integer("warmup_steps", default.warmup_steps, "Linear warm-up steps for warmup_cosine.")
  f.DEFINE_enum("loss", default.loss, losses.LOSSES,
                "Depth loss over valid pixels: mse (the seed's), l1, silog (Eigen "
                "scale-invariant log). The gradient stage always uses mse on Sobel edges.")
  f.DEFINE_float("gradient_matching_weight", default.gradient_matching_weight,
                 "Weight of the multi-scale gradient-matching term added to the depth loss.")
  f.DEFINE_float("encoder_learning_rate_multiplier", default.encoder_learning_rate_multiplier,
                 "mobilenet_v3 / resnet50: the encoder learns at --learning_rate times this "
                 "(its own Adam); the decoder at --learning_rate.")
  f.DEFINE_integer("freeze_encoder_steps", default.freeze_encoder_steps,
                   "mobilenet_v3 / resnet50: the encoder stays fixed for the first N steps of "
                   "each stage (decoder warm-up), then trains.")
  f.DEFINE_integer("seed", default.seed, "Random seed (weights, shuffling, augmentation).")
  f.DEFINE_enum("mode", default.mode, stages.MODES,
                "train, eval (latest checkpoint), train_and_eval, or export (latest checkpoint "
                "to <model_dir>/export).")
  f.DEFINE_integer("steps_per_loop", default.steps_per_loop,
                   "Train steps run inside one tf.function call (host round trips are costly on TPU).")
  f.DEFINE_integer("log_every_steps", default.log_every_steps, "Log loss, examples/s and time left.")
  f.DEFINE_integer("eval_every_steps", default.eval_every_steps,
                   "Evaluate during training every N steps (0: only at the end).")
  f.DEFINE_integer("checkpoint_every_steps", default.checkpoint_every_steps,
                   "Save a checkpoint every N steps (and always at the end).")
  f.DEFINE_integer("keep_checkpoints", default.keep_checkpoints, "Checkpoints kept per stage.")
  f.DEFINE_string("eval_split", default.eval_split, "Split evaluated (test, validation, ...).")
  f.DEFINE_integer("num_eval_examples", default.num_eval_examples,
                   "Evaluate on at most this many examples (0: the whole split).")
  f.DEFINE_integer("num_image_summaries", default.num_image_summaries,
                   "Test images shown in TensorBoard and kept for the comparison grid.")
  f.DEFINE_enum("strategy", default.strategy, distribute.STRATEGIES,
                "tf.distribute strategy; auto: TPU if found, multi-worker if TF_CONFIG names "
                "a cluster, mirrored with several GPUs, else one device.")
  f.DEFINE_integer("num_devices", default.num_devices,
                   "Local devices for --strategy=mirrored (default: all GPUs).")
  f.DEFINE_string("tpu", default.tpu, "TPU name, or 'local' on a TPU VM.")
  f.DEFINE_enum("mixed_precision", default.mixed_precision, precision.CHOICES,
                "auto: mixed_bfloat16 on TPU, mixed_float16 on GPU, float32 on CPU.")
  f.DEFINE_bool("export", default.export,
                "Write each depth stage's SavedModel (and the --tflite files) when training "
                "ends. --noexport keeps checkpoints and metrics only (the transfer study's "
                "runs, scored from their checkpoints); refused with --mode=export or --tflite.")
  f.DEFINE_list("tflite", list(default.tflite),
                "Also write <model_dir>/export/depth_<precision>.tflite for these precisions "
                f"({', '.join(tflite_export.PRECISIONS)}): uint8 RGB in at "
                "--tflite_input_size, depth in meters out, the finetune chain when it ran; "
                "int8 is calibrated on training images. Works with --mode=export.")
  f.DEFINE_string("tflite_input_size", None,
                  "H,W of the TFLite files' fixed input (default --image_size); portrait or "
                  "landscape.")
  f.DEFINE_integer("tflite_calibration_examples", default.tflite_calibration_examples,
                   "Training images that calibrate the int8 TFLite file.")
  f.DEFINE_integer("num_predict_images", default.num_predict_images,
                   "--stage=all: test images run through the exported model with trainer.predict.")
  f.DEFINE_enum("config_mismatch", default.config_mismatch, CONFIG_MISMATCH_CHOICES,
                "A rerun on a --model_dir whose config.json records other settings that "
                "define the networks (architecture, image size, data, loss, schedule, batch...): "
                "error (stop before touching anything, listing them) or allow (go on, "
                "logged and recorded in config_history.jsonl; checkpoints of another shape "
                "still fail to restore).")
  f.DEFINE_bool("rebuild_dataset", default.rebuild_dataset,
                "Rebuild --dataset from --manual_dir even though --data_dir holds a build "
                "(needed when the manual folder changed since that build).")


def config_from_flags(values: flags.FlagValues, model_dir: str,
                      checkpoint_dir: Optional[str], tensorboard_dir: Optional[str]) -> Config:
  """Builds and validates the Config; directories come resolved (flags or Vertex AI)."""
  names = {f.name for f in dataclasses.fields(Config)}
  kwargs = {name: values[name].value for name in names if name in values}
  kwargs.update(model_dir=model_dir, checkpoint_dir=checkpoint_dir,
                tensorboard_dir=tensorboard_dir,
                image_size=parse_image_size(values.image_size),
                init_from_stages=tuple(values.init_from_stages),
                tflite=tflite_export.parse_precisions(values.tflite) if values.tflite else (),
                tflite_input_size=parse_image_size(values.tflite_input_size,
                                                   "--tflite_input_size")
                if values.tflite_input_size else None)
  config = Config(**kwargs)
  validate(config)
  return config


def validate(config: Config) -> None:
  """Errors that name the flag, raised before any work is done."""
  if config.mode == "export" and not config.export:
    raise ValueError("--mode=export writes the exports: drop --noexport")
  if config.tflite and not config.export:
    raise ValueError(f"--tflite={','.join(config.tflite)} needs the exports: drop --noexport")
  positive = ("global_batch_size", "train_steps", "steps_per_loop", "log_every_steps",
              "checkpoint_every_steps", "keep_checkpoints")
  for name in positive:
    if getattr(config, name) < 1:
      raise ValueError(f"--{name} must be at least 1, got {getattr(config, name)}")
  if config.learning_rate <= 0:
    raise ValueError(f"--learning_rate must be positive, got {config.learning_rate}")
  if not 0 < config.min_depth < config.max_depth:
    raise ValueError(f"need 0 < --min_depth < --max_depth, got {config.min_depth}, {config.max_depth}")
  if config.eval_every_steps < 0 or config.num_eval_examples < 0:
    raise ValueError("--eval_every_steps and --num_eval_examples must be >= 0")
  if config.warmup_steps < 0:
    raise ValueError(f"--warmup_steps must be >= 0, got {config.warmup_steps}")
  if "int8" in config.tflite and config.tflite_calibration_examples < 1:
    raise ValueError("--tflite=int8 needs --tflite_calibration_examples >= 1, got "
                     f"{config.tflite_calibration_examples}")
  unknown = [s for s in config.init_from_stages if s not in models.STAGES]
  if unknown or not config.init_from_stages:
    raise ValueError(f"--init_from_stages: {unknown or 'empty'}; give some of "
                     f"{','.join(models.STAGES)}")
  for name in ("min_confidence", "eval_min_confidence"):
    value = getattr(config, name)
    if value is not None and value not in CONFIDENCE_LEVELS:
      raise ValueError(f"--{name} must be 0, 1 or 2 (Record3D low, medium, high), got {value}")
  if config.architecture in backbones.ARCHITECTURES:
    if config.encoder_learning_rate_multiplier <= 0:
      raise ValueError("--encoder_learning_rate_multiplier must be positive, got "
                       f"{config.encoder_learning_rate_multiplier} (to hold the encoder still, "
                       "use --freeze_encoder_steps)")
    if config.freeze_encoder_steps < 0:
      raise ValueError(f"--freeze_encoder_steps must be >= 0, got {config.freeze_encoder_steps}")
  else:
    backbones.check_no_encoder_weights(config.architecture, config.encoder_weights)
    for name, neutral in (("encoder_learning_rate_multiplier", 1.0), ("freeze_encoder_steps", 0)):
      if getattr(config, name) != neutral:
        raise ValueError(f"--{name} is for the pretrained-backbone architectures "
                         f"{backbones.ARCHITECTURES}, not --architecture={config.architecture}")
