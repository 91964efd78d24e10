"""Any depth2d export behind one interface: a SavedModel folder or a .tflite file.

  model = exported_model.load("M/export")                     # SavedModel
  model = exported_model.load("M/export/depth_int8.tflite")    # TFLite
  depth = model.predict(rgb)        # uint8 [H, W, 3] -> float32 [H, W] meters
  model.input_size                  # (H, W) of a fixed-size TFLite input, None = any size
  model.file_size_bytes             # the .tflite file, or the whole SavedModel folder
  model.latency_ms(num_threads=1)   # median ms per image; num_threads=None: all cores

Both kinds carry the signature trainer/export.py and trainer/tflite_export.py
write: `serving_default(images uint8 [B, H, W, 3]) -> {"depth": float32
[B, H, W]}` (TFLite: B = 1 and a fixed H, W). A path that is not one of these
raises ValueError naming the path and what is wrong.

TFLite files run with LiteRT, `ai_edge_litert.interpreter.Interpreter` (PyPI
`ai-edge-litert`, the maintained runtime; `tf.lite.Interpreter` is deprecated
in TF 2.21 and is only used, with a warning, when ai-edge-litert is missing).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

SIGNATURE_KEY = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "depth"
METADATA_FILE = "depth2d.json"  # written beside saved_model.pb by trainer.export

_warned_fallback = False


def interpreter_class():
  """LiteRT's Interpreter; tf.lite.Interpreter (deprecated) only when LiteRT is missing."""
  global _warned_fallback
  try:
    from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
    return litert.Interpreter
  except ImportError:
    if not _warned_fallback:
      logging.warning("ai-edge-litert is not installed (pip install ai-edge-litert): running "
                      "TFLite files with the deprecated tf.lite.Interpreter instead")
      _warned_fallback = True
    return tf.lite.Interpreter


def make_interpreter(model, num_threads: Optional[int] = None, delegates: bool = True):
  """An allocated interpreter for a TFLite flatbuffer (bytes) or file path (gs:// works).

  num_threads: CPU threads for the kernels (None: all cores). delegates=False:
  no default delegate (XNNPACK), so every op of the file stays visible in the
  op details instead of being fused into DELEGATE nodes.
  """
  content = model if isinstance(model, (bytes, bytearray)) else _read_bytes(model)
  runtime = interpreter_class()
  options = {}
  if not delegates:
    resolvers = sys.modules[runtime.__module__].OpResolverType
    options["experimental_op_resolver_type"] = resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES
  interpreter = runtime(model_content=bytes(content), num_threads=num_threads or os.cpu_count(),
                        **options)
  interpreter.allocate_tensors()
  return interpreter


def _read_bytes(path) -> bytes:
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def resize_rgb(image: np.ndarray, size) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [h, w, 3], bilinear with antialiasing (as network_input)."""
  x = tf.image.resize(tf.constant(image), size, method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).numpy()


def _check_rgb(rgb) -> np.ndarray:
  rgb = np.asarray(rgb)
  if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"predict needs one uint8 RGB image [H, W, 3], got {rgb.dtype} "
                     f"{list(rgb.shape)}")
  return rgb


class ExportedModel:
  """Common part: `predict`, `input_size`, `file_size_bytes`, `latency_ms`."""

  kind = ""

  def __init__(self, path: str, input_size: Optional[Tuple[int, int]], file_size_bytes: int,
               metadata: Optional[dict]):
    self.path = path
    self.input_size = input_size  # (H, W) of a fixed input, None for any size
    self.file_size_bytes = file_size_bytes
    self.metadata = metadata  # depth2d.json when known (stage, architecture, image_size, ...)

  def predict(self, rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W] depth in meters, at the image's own size."""
    raise NotImplementedError

  def latency_ms(self, num_threads: Optional[int] = 1, image_size=None, repeats: int = 20,
                 warmup: int = 3) -> float:
    """Median wall time in ms of one image through the model, on num_threads CPU threads.

    num_threads: 1, or None for all cores (os.cpu_count()). image_size: (H, W)
    of the timed random image; default the fixed input size, else the
    training size from depth2d.json. The first `warmup` calls are not timed.
    """
    raise NotImplementedError

  def _timing_size(self, image_size):
    size = image_size or self.input_size or (self.metadata or {}).get("image_size")
    if not size:
      raise ValueError(f"{self.path}: no image size known for the latency measurement; "
                       "pass image_size=(H, W)")
    return tuple(int(v) for v in size)

  def __repr__(self):
    return (f"{type(self).__name__}({self.path!r}, input_size={self.input_size}, "
            f"{self.file_size_bytes} bytes)")


def _time_calls(call, repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    call()
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return 1000.0 * statistics.median(times)


class TFLiteModel(ExportedModel):
  """A depth_<precision>.tflite file: one uint8 image of a fixed size per call."""

  kind = "tflite"

  def __init__(self, path: str):
    if not tf.io.gfile.exists(path):
      raise ValueError(f"{path}: no such file")
    self._content = _read_bytes(path)
    try:
      self._interpreter = make_interpreter(self._content)
    except (ValueError, RuntimeError) as e:
      raise ValueError(f"{path}: not a TFLite model ({e})") from e
    signatures = self._interpreter.get_signature_list()
    signature = signatures.get(SIGNATURE_KEY)
    if signature is None or list(signature.get("inputs", [])) != [INPUT_NAME] \
        or OUTPUT_NAME not in signature.get("outputs", []):
      raise ValueError(f"{path}: not a depth2d TFLite model: need signature {SIGNATURE_KEY!r} "
                       f"with input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found {signatures}")
    self._runner = self._interpreter.get_signature_runner(SIGNATURE_KEY)
    image = self._runner.get_input_details()[INPUT_NAME]
    depth = self._runner.get_output_details()[OUTPUT_NAME]
    shape = [int(v) for v in image["shape"]]
    if image["dtype"] != np.uint8 or len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
      raise ValueError(f"{path}: input {INPUT_NAME!r} must be uint8 [1, H, W, 3], got "
                       f"{np.dtype(image['dtype']).name} {shape}")
    if depth["dtype"] != np.float32 or [int(v) for v in depth["shape"]] != shape[:3]:
      raise ValueError(f"{path}: output {OUTPUT_NAME!r} must be float32 {shape[:3]}, got "
                       f"{np.dtype(depth['dtype']).name} {[int(v) for v in depth['shape']]}")
    super().__init__(path, (shape[1], shape[2]), len(self._content), None)
    self._logged_resize = False

  def predict(self, rgb):
    rgb = _check_rgb(rgb)
    size = rgb.shape[:2]
    if size != self.input_size:
      if not self._logged_resize:  # once per model: a video would repeat it every frame
        logging.info("%s has a fixed input of %s (H, W): images of %s are resized to it and "
                     "the depth is resized back", self.path, self.input_size, size)
        self._logged_resize = True
      rgb = resize_rgb(rgb, self.input_size)
    depth = self._runner(**{INPUT_NAME: rgb[None]})[OUTPUT_NAME][0]  # [h, w]
    if size != self.input_size:
      depth = tf.image.resize(depth[None, :, :, None], size, method="bilinear")[0, :, :, 0].numpy()
    return np.asarray(depth, np.float32)

  def latency_ms(self, num_threads=1, image_size=None, repeats=20, warmup=3):
    size = self._timing_size(image_size)
    if size != self.input_size:
      raise ValueError(f"{self.path}: the input size is fixed at {self.input_size}, not {size}")
    runner = make_interpreter(self._content, num_threads).get_signature_runner(SIGNATURE_KEY)
    image = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    return _time_calls(lambda: runner(**{INPUT_NAME: image}), repeats, warmup)


class SavedModel(ExportedModel):
  """A SavedModel folder written by trainer.export: any image size."""

  kind = "saved_model"

  def __init__(self, path: str):
    if not any(tf.io.gfile.exists(os.path.join(path, name))
               for name in ("saved_model.pb", "saved_model.pbtxt")):
      raise ValueError(f"{path}: not a SavedModel folder (no saved_model.pb)")
    try:
      loaded = tf.saved_model.load(path)
    except Exception as e:  # pylint: disable=broad-except  # TF raises many kinds here
      raise ValueError(f"{path}: the SavedModel does not load ({type(e).__name__}: {e})") from e
    function = loaded.signatures.get(SIGNATURE_KEY)
    if function is None:
      raise ValueError(f"{path}: not a depth2d SavedModel: no {SIGNATURE_KEY!r} signature "
                       f"(found {sorted(loaded.signatures)})")
    _, inputs = function.structured_input_signature
    spec = inputs.get(INPUT_NAME)
    if list(inputs) != [INPUT_NAME] or spec.dtype != tf.uint8 or spec.shape.rank != 4 \
        or spec.shape[-1] != 3:
      found = {name: f"{s.dtype.name} {s.shape}" for name, s in inputs.items()}
      raise ValueError(f"{path}: not a depth2d SavedModel: {SIGNATURE_KEY} must take one input "
                       f"{INPUT_NAME!r} uint8 [B, H, W, 3], takes {found}")
    output = function.structured_outputs.get(OUTPUT_NAME)
    if output is None or output.dtype != tf.float32:
      raise ValueError(f"{path}: not a depth2d SavedModel: {SIGNATURE_KEY} must return "
                       f"{OUTPUT_NAME!r} float32 [B, H, W], returns {function.structured_outputs}")
    metadata = None
    metadata_path = os.path.join(path, METADATA_FILE)
    if tf.io.gfile.exists(metadata_path):
      with tf.io.gfile.GFile(metadata_path) as f:
        metadata = json.load(f)
    else:
      logging.warning("%s: no %s beside the SavedModel (not written by trainer.export?): "
                      "stage and training size unknown", path, METADATA_FILE)
    self._loaded = loaded  # keeps the variables alive
    self._function = function
    super().__init__(path, None, _folder_size(path), metadata)

  def predict(self, rgb):
    rgb = _check_rgb(rgb)
    depth = self._function(**{INPUT_NAME: tf.constant(rgb[None])})[OUTPUT_NAME]
    return depth[0].numpy().astype(np.float32)

  def latency_ms(self, num_threads=1, image_size=None, repeats=20, warmup=3):
    # TensorFlow fixes its thread pools when it starts, so each thread count is
    # measured in a fresh process.
    size = self._timing_size(image_size)
    request = {"path": self.path, "num_threads": num_threads or os.cpu_count(),
               "image_size": list(size), "repeats": repeats, "warmup": warmup}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", "from trainer import exported_model as m; m._latency_child()",
         json.dumps(request)], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"{self.path}: latency measurement failed:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["latency_ms"])


def _latency_child():
  """Entry point of SavedModel.latency_ms's subprocess: argv[1] is the JSON request."""
  request = json.loads(sys.argv[1])
  tf.config.threading.set_intra_op_parallelism_threads(request["num_threads"])
  tf.config.threading.set_inter_op_parallelism_threads(request["num_threads"])
  model = SavedModel(request["path"])
  image = np.random.default_rng(0).integers(0, 256, (*request["image_size"], 3), dtype=np.uint8)
  latency = _time_calls(lambda: model.predict(image), request["repeats"], request["warmup"])
  print(json.dumps({"latency_ms": latency}))


def _folder_size(path: str) -> int:
  return sum(tf.io.gfile.stat(os.path.join(folder, name)).length
             for folder, _, files in tf.io.gfile.walk(path) for name in files)


def load(path: str) -> ExportedModel:
  """A SavedModel folder or a .tflite file -> ExportedModel; ValueError if it is neither."""
  path = os.fspath(path)
  if tf.io.gfile.isdir(path):
    return SavedModel(path)
  if not tf.io.gfile.exists(path):
    raise ValueError(f"{path}: no such file or folder (want a SavedModel folder or a .tflite file)")
  return TFLiteModel(path)
