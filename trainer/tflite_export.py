"""Mobile export: the depth network as TFLite files in float32, float16 and int8.

`export_tflite(network, image_size, max_depth, export_dir, precisions, ...)`
writes `depth_<precision>.tflite` for each precision into `export_dir`. Every
file has one signature, "serving_default":

  images  uint8   [1, H, W, 3]  RGB at the FIXED `input_size` (H, W) (default
                                 the training size; portrait or landscape)
  depth   float32 [1, H, W]     meters at that size, clipped to [0, max_depth]

which is the SavedModel's `serving_default` (trainer/export.py) for one image
of that size: the image is brought to the training size by the same
`preprocessing.network_input` (see `_FixedSizeInput`), the network runs there
and its depth is resized back bilinearly. A finetune network contains the
gradient network, so one file holds the whole chain. Files are converted by
TensorFlow's own `tf.lite.TFLiteConverter` and run with LiteRT
(`trainer.exported_model.load`, `ai_edge_litert.interpreter.Interpreter`).

Precisions:
- float32: the graph as is.
- float16: float16 weights (half the file); the interpreter computes in
  float32 (or float16 where the CPU delegate can).
- int8: full-integer post-training quantization calibrated on caller-supplied
  uint8 RGB images (training images, read through the input pipeline), int8
  weights (per channel) and activations. Measured on TF 2.21 for the unet
  rough, unet finetune (gradient net inside) and seed rough networks, at the
  training size and at another (landscape) input size: exactly three ops
  stay float (`float_ops` lists them for any file):
    CAST        uint8 image -> float32 (0..255; TFLite has no uint8 -> int8
                path from a float graph's input)
    QUANTIZE    float32 -> int8, right after it (scale 1: lossless)
    DEQUANTIZE  int8 -> float32 meters at the very end
  Everything between runs in int8: the /255, the resize taps when input_size
  differs (GATHER, MUL, SUM), CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV (seed),
  ADD, MUL, CONCATENATION, PAD, RESIZE_BILINEAR, STRIDED_SLICE, the softplus
  outputs (unet and backbones, rewritten: see below) and the clip (MINIMUM,
  RELU).
  Softplus: the int8 graph computes it as relu(x) + log(1 + exp(-|x|))
  (`quantization_friendly_softplus`: ABS, MUL by -1, EXP, ADD, LOG, RELU,
  ADD), the same function in float (`_Int8Softplus` compares the network's
  output both ways at every int8 export; the float32 and float16 files keep
  Keras' softplus). As written by Keras, softplus converts to
  log(1 + exp(x)) (EXP, ADD, LOG): EXP's int8 output then spans
  [0, exp(max x)] (calibrated 0..333 on the demo's finetune chain, a step of
  1.30, kept by the ADD of 1), so the smallest depths it could give were
  log(k * 1.30) = 0.96, 1.37, 1.65 m (k = 2, 3, 4): 37% of the demo's test
  pixels came out 0.96 m (float32: 0.60 to 3.41 m), 23 distinct depths in
  all, abs_rel 0.183 against the SavedModel's 0.097. Rewritten, exp(-|x|)
  lies in (0, 1] and log(1 + .) in
  [0, log 2], both finely quantized (abs_rel 0.101). -|x| is written as
  |x| * -1 on purpose: -abs(x) becomes NEG, which the converter leaves in float
  (a float NEG between a DEQUANTIZE and a QUANTIZE per softplus), and
  min(x, 0) - relu(x) ties the conv output's scale to MINIMUM's negative-only
  range (abs_rel 0.40).
  Size: about 0.30 of the float32 file for the unet (0.27 for the seed), not
  below 1/4, and the demo's cannot be: int8 weights are
  exactly 1/4 of float32 ones, but the int32 biases are as large as float32
  ones, so weights + biases alone are 0.2517 of the demo's float32 file; on
  top, each per-channel quantized tensor stores a float32 scale and an int64
  zero point per output channel (280 KB of the demo's 2.01 MB), and the graph
  and tensor names take ~50 KB.
"""

import os
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import exported_model
from trainer import preprocessing
from trainer.exported_model import INPUT_NAME, OUTPUT_NAME, SIGNATURE_KEY

PRECISIONS = ("float32", "float16", "int8")

# _FixedSizeInput checks its taps against network_input on a random image:
# they agree to float rounding (~1e-7), a real drift is far above this.
_PREPROCESSING_TOLERANCE = 1e-5
# _Int8Softplus checks the rewritten network against the original on a random
# image (meters): float rounding is ~1e-6 m, a different function far above.
_SOFTPLUS_TOLERANCE = 1e-4


def tflite_filename(precision: str) -> str:
  return f"depth_{precision}.tflite"


def parse_precisions(text) -> Tuple[str, ...]:
  """'float32,int8' (or a sequence of names) -> ('float32', 'int8'); clear error on a typo."""
  names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
  names = [n for n in names if n]
  unknown = [n for n in names if n not in PRECISIONS]
  if unknown:
    raise ValueError(f"--tflite: unknown precision(s) {unknown}; valid: {', '.join(PRECISIONS)} "
                     "(comma-separated, e.g. --tflite=float32,int8)")
  if not names:
    raise ValueError(f"--tflite: no precision given; valid: {', '.join(PRECISIONS)}")
  return tuple(dict.fromkeys(names))  # in the given order, repeats dropped


def _check_size(size, what) -> Tuple[int, int]:
  try:
    height, width = (int(v) for v in size)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} must be (H, W), got {size!r}") from e
  if height < 1 or width < 1:
    raise ValueError(f"{what} must be positive, got {size!r}")
  return height, width


def _resize_taps(in_length: int, out_length: int, axis: int):
  """Sparse form of network_input's resize along one axis.

  A one-hot basis image (one channel per input pixel, value 255 -> 1.0) sent
  through `preprocessing.network_input` gives the dense resize matrix
  A [out_length, in_length] of that axis; each output pixel only reads a few
  input pixels, so A is returned as (indices, weights), both [out_length, k].
  """
  basis = np.zeros((1, in_length, 1, in_length), np.uint8)  # rows are the axis
  basis[0, np.arange(in_length), 0, np.arange(in_length)] = 255
  if axis == 2:
    basis = basis.transpose(0, 2, 1, 3)  # [1, 1, in_length, in_length]
  out_size = (out_length, 1) if axis == 1 else (1, out_length)
  dense = preprocessing.network_input(tf.constant(basis), out_size).numpy()
  dense = dense.reshape(out_length, in_length)  # A[i, j]: weight of input j in output i
  taps = max(1, int((dense != 0).sum(axis=1).max()))
  indices = np.zeros((out_length, taps), np.int32)
  weights = np.zeros((out_length, taps), np.float32)
  for i in range(out_length):
    nonzero = np.flatnonzero(dense[i])
    indices[i, :nonzero.size] = nonzero
    weights[i, :nonzero.size] = dense[i, nonzero]
  return indices, weights


class _FixedSizeInput:
  """`preprocessing.network_input` for one fixed input size, in TFLite builtin ops.

  network_input resizes with antialiasing, i.e. tf.raw_ops.ScaleAndTranslate,
  which TFLite has no kernel for (conversion fails: "ScaleAndTranslate is
  neither a custom op nor a flex op"). For a fixed input size that resize is a
  fixed separable linear map, so it is taken FROM network_input (its response
  to one-hot images, `_resize_taps`) and applied as GATHER + MUL + SUM per
  axis. At the training size the resize is the identity (to 1e-7) and no op
  is emitted. The construction is checked against network_input on a random
  image, so a change of network_input that is not a separable linear resize
  any more fails the export instead of silently serving different inputs.
  """

  def __init__(self, input_size, network_size):
    self.input_size = input_size
    self.network_size = network_size
    self._axes = []  # (axis, indices [out, k], weights [out, k]) for axes that change
    for axis, (n_in, n_out) in ((1, (input_size[0], network_size[0])),
                                (2, (input_size[1], network_size[1]))):
      indices, weights = _resize_taps(n_in, n_out, axis)
      identity = (n_in == n_out and indices.shape[1] == 1
                  and np.array_equal(indices[:, 0], np.arange(n_in))
                  and np.allclose(weights[:, 0], 1.0, atol=1e-6))
      if not identity:
        self._axes.append((axis, indices, weights))
    self._check()

  def __call__(self, images: tf.Tensor) -> tf.Tensor:
    """uint8 [B, H_in, W_in, 3] -> float32 [B, h, w, 3] in [0, 1]."""
    x = tf.image.convert_image_dtype(images, tf.float32)  # uint8 / 255, as network_input
    for axis, indices, weights in self._axes:
      x = tf.gather(x, indices, axis=axis)  # axis 1: [B, h, k, W, 3]; axis 2: [B, H, w, k, 3]
      shape = [1, 1, 1, 1, 1]
      shape[axis], shape[axis + 1] = weights.shape
      x = tf.reduce_sum(x * tf.constant(weights.reshape(shape)), axis=axis + 1)
    return tf.clip_by_value(x, 0.0, 1.0)

  def _check(self):
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (1, *self.input_size, 3), dtype=np.uint8))
    expected = preprocessing.network_input(image, self.network_size).numpy()
    error = float(np.abs(self(image).numpy() - expected).max())
    if not error < _PREPROCESSING_TOLERANCE:
      raise RuntimeError(
          f"TFLite preprocessing differs from preprocessing.network_input by {error:.2g} "
          f"for {self.input_size} -> {self.network_size}: network_input is no longer a "
          "separable linear resize, so _FixedSizeInput cannot reproduce it")


def quantization_friendly_softplus(x):
  """softplus(x) = relu(x) + log(1 + exp(-|x|)), in ops whose int8 ranges are small.

  The same function as keras.activations.softplus in float (the numerically
  stable form). In int8: exp(-|x|) is in (0, 1] and log(1 + exp(-|x|)) in
  [0, log 2], so their 8 bits cover small ranges, where log(1 + exp(x))
  spends them on exp(x) up to exp(max x) (see the module docstring).
  `|x| * -1`, not `-|x|`: NEG has no int8 kernel in the converter.
  """
  return tf.nn.relu(x) + tf.math.log(1.0 + tf.exp(tf.abs(x) * -1.0))


class _Int8Softplus:
  """Context: every softplus activation of a network (nested ones included)
  computed by `quantization_friendly_softplus`; restored on exit.

  The int8 graph is traced inside it. On entry the network's output on a
  random image is compared with the original's (the rewrite must be the same
  function in float); a difference above _SOFTPLUS_TOLERANCE raises.
  """

  def __init__(self, network: keras.Model, image_size):
    self.network = network
    self.image_size = image_size
    self.layers = [layer for layer in _all_layers(network)
                   if getattr(layer, "activation", None) is keras.activations.softplus]

  def __enter__(self):
    if not self.layers:
      return self
    image = np.random.default_rng(0).uniform(0, 1, (1, *self.image_size, 3)).astype(np.float32)
    expected = self.network(image, training=False).numpy()
    for layer in self.layers:
      layer.activation = quantization_friendly_softplus
    try:
      error = float(np.abs(self.network(image, training=False).numpy() - expected).max())
      if not error < _SOFTPLUS_TOLERANCE:
        raise RuntimeError(f"quantization_friendly_softplus changes {self.network.name}'s "
                           f"output by {error:.2g} m: not the same function as softplus")
    except BaseException:
      self.__exit__()
      raise
    return self

  def __exit__(self, *exc):
    for layer in self.layers:
      layer.activation = keras.activations.softplus


class TFLiteDepthModule(tf.Module):
  """One-image, fixed-size version of export.DepthServingModule, in TFLite builtin ops."""

  def __init__(self, network: keras.Model, image_size, max_depth: float, input_size=None):
    super().__init__()
    _check_float32(network)
    self.network = network
    # The tf.Variables inside the Keras 3 variables, tracked directly: without
    # this the converter keeps every weight as a resource variable (VAR_HANDLE
    # + READ_VARIABLE ops, weights left out of the file, int8 calibration fails
    # on them); with it they are frozen into the file as constants.
    self._weights = [weight.value for weight in network.weights]
    self.image_size = _check_size(image_size, "image_size")
    self.input_size = _check_size(input_size or image_size, "input_size")
    self.max_depth = float(max_depth)
    self._preprocess = _FixedSizeInput(self.input_size, self.image_size)
    self.serve = tf.function(
        self._serve,
        input_signature=[tf.TensorSpec([1, *self.input_size, 3], tf.uint8, name=INPUT_NAME)])

  def _serve(self, images):
    x = self._preprocess(images)  # [1, h, w, 3] at the training size
    depth = tf.cast(self.network(x, training=False), tf.float32)  # [1, h, w, 1]
    if self.input_size != self.image_size:
      depth = tf.image.resize(depth, self.input_size, method="bilinear")  # as the SavedModel
    return {OUTPUT_NAME: tf.clip_by_value(depth[..., 0], 0.0, self.max_depth)}


def _all_layers(model: keras.Model):
  for layer in model.layers:
    yield layer
    if isinstance(layer, keras.Model):  # a finetune net's gradient network
      yield from _all_layers(layer)


def _check_float32(network: keras.Model):
  mixed = sorted({layer.dtype_policy.name for layer in _all_layers(network)
                  if layer.dtype_policy.compute_dtype != "float32"})
  if mixed:
    raise ValueError(f"network {network.name} computes in {mixed}: convert a float32 copy "
                     "(trainer.export.float32_copy) so every precision starts from float32")


def _calibration_dataset(images: Iterable[np.ndarray], input_size):
  """representative_dataset for the converter: uint8 [1, H, W, 3] per image.

  Images of another size are resized (antialiased) to input_size, as
  exported_model.predict does for a fixed-size model.
  """
  count = 0
  resized = 0
  for image in images:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"calibration image {count}: need uint8 [H, W, 3] RGB, "
                       f"got {image.dtype} {list(image.shape)}")
    if image.shape[:2] != tuple(input_size):
      resized += 1
      image = exported_model.resize_rgb(image, input_size)
    count += 1
    yield {INPUT_NAME: image[None]}
  if resized:
    logging.info("int8 calibration: resized %d of %d images to the input size %s",
                 resized, count, input_size)
  if count == 0:
    raise ValueError("int8 calibration got zero images: pass representative uint8 [H, W, 3] "
                     "training images (e.g. --tflite_calibration_examples > 0)")
  logging.info("int8 calibration: %d images", count)


def convert(network: keras.Model, image_size, max_depth: float,
            precisions: Sequence[str] = PRECISIONS, input_size=None,
            calibration_images: Optional[Iterable[np.ndarray]] = None) -> Dict[str, bytes]:
  """{precision: TFLite flatbuffer} (see the module docstring); int8 needs calibration_images."""
  precisions = parse_precisions(precisions)
  contents = {}
  # One traced and saved graph for the float precisions (tracing and saving
  # are most of a conversion's time), and one for int8 with the softplus
  # outputs rewritten (module docstring); the converter reads them back.
  with tempfile.TemporaryDirectory(prefix="depth2d_tflite_") as folder:
    floats = [p for p in precisions if p != "int8"]
    if floats:
      path = os.path.join(folder, "float")
      module = TFLiteDepthModule(network, image_size, max_depth, input_size)
      tf.saved_model.save(module, path, signatures={SIGNATURE_KEY: module.serve})
      for precision in floats:
        contents[precision] = _convert(tf.lite.TFLiteConverter.from_saved_model(path),
                                       precision, calibration_images, module.input_size)
    if "int8" in precisions:
      path = os.path.join(folder, "int8")
      with _Int8Softplus(network, _check_size(image_size, "image_size")):
        module = TFLiteDepthModule(network, image_size, max_depth, input_size)
        tf.saved_model.save(module, path, signatures={SIGNATURE_KEY: module.serve})
      contents["int8"] = _convert(tf.lite.TFLiteConverter.from_saved_model(path), "int8",
                                  calibration_images, module.input_size)
  return {precision: contents[precision] for precision in precisions}


def _convert(converter, precision, calibration_images, input_size) -> bytes:
  if precision == "float16":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif precision == "int8":
    if calibration_images is None:
      raise ValueError("int8 calibration got zero images: pass calibration_images (uint8 "
                       "[H, W, 3] training images)")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: _calibration_dataset(calibration_images,
                                                                    input_size)
    # int8 kernels wherever TFLite has one; the float builtins remain allowed
    # for the few ops without (the input cast; see the module docstring).
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                           tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert()


def export_tflite(network: keras.Model, image_size, max_depth: float, export_dir: str,
                  precisions: Sequence[str] = PRECISIONS, input_size=None,
                  calibration_images: Optional[Iterable[np.ndarray]] = None) -> Dict[str, str]:
  """Writes export_dir/depth_<precision>.tflite for each precision; returns {precision: path}.

  Args:
    network: the trained float32 Keras depth network (rough, or finetune with
      its gradient network inside), input [B, h, w, 3] float in [0, 1].
    image_size: (h, w), the training size the network runs at.
    max_depth: meters; the output is clipped to [0, max_depth] as in the SavedModel.
    export_dir: folder (created); existing files of the same names are replaced.
    precisions: names from PRECISIONS (or a 'float32,int8' string).
    input_size: (H, W) the file's fixed uint8 input; default image_size.
    calibration_images: int8 only: an iterable of uint8 [H, W, 3] RGB arrays
      (any size; resized to input_size). Read once, so a generator works.
  """
  precisions = parse_precisions(precisions)
  if "int8" in precisions and calibration_images is not None:
    calibration_images = list(calibration_images)  # fail early when empty, before any conversion
  if "int8" in precisions and not calibration_images:
    raise ValueError("int8 calibration got zero images: pass calibration_images (uint8 "
                     "[H, W, 3] training images, e.g. --tflite_calibration_examples > 0)")
  contents = convert(network, image_size, max_depth, precisions, input_size, calibration_images)
  tf.io.gfile.makedirs(export_dir)
  paths = {}
  for precision, content in contents.items():
    path = os.path.join(export_dir, tflite_filename(precision))
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(content)
    logging.info("wrote %s: %.2f MiB (%d bytes), input uint8 %s", path, len(content) / 2**20,
                 len(content), [1, *(input_size or image_size), 3])
    if precision == "int8":
      logging.info("int8 ops left in float: %s", float_ops(content) or "none")
    paths[precision] = path
  return paths


def op_details(model) -> List[dict]:
  """[{'op': 'CONV_2D', 'dtypes': ('int8', 'int8', 'int32', 'int8')}] per op of a TFLite model.

  `model` is the flatbuffer (bytes) or a path. dtypes are those of the op's
  input and output tensors (weights included: an int8 op has int8 / int32
  constants, so a float tensor anywhere means float arithmetic), read from
  the runtime's own view of the model (the interpreter's op details).
  """
  interpreter = exported_model.make_interpreter(model, delegates=False)
  dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
  return [{"op": op["op_name"],
           "dtypes": tuple(dtypes[i] for i in (*op["inputs"], *op["outputs"]) if i in dtypes)}
          for op in interpreter._get_ops_details()]  # pylint: disable=protected-access


def float_ops(model) -> List[str]:
  """Sorted 'OP xN' for ops whose activations are float (QUANTIZE/DEQUANTIZE included)."""
  counts = {}
  for op in op_details(model):
    if any(d in ("float32", "float16") for d in op["dtypes"]):
      counts[op["op"]] = counts.get(op["op"], 0) + 1
  return [f"{name} x{n}" for name, n in sorted(counts.items())]
