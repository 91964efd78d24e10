"""Writing examples back to the input formats (tests, dummy data, demos).

`examples` are feature dicts as yielded by `synthetic.render_sequence`:
image uint8 (H, W, 3), depth float32 (Hd, Wd) meters (0 = invalid),
confidence uint8 (Hd, Wd), intrinsics float32 (3, 3) for the image size,
frame int.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Iterable, Mapping

import lzfse
import numpy as np
import OpenEXR
from etils import epath
from PIL import Image

from tfds_record3d import decoding
from tfds_record3d import pairs_format
from tfds_record3d import r3d_format


def encode_image(image: np.ndarray, suffix: str = ".jpg", quality: int = 95) -> bytes:
  buffer = io.BytesIO()
  fmt = "PNG" if suffix.lower() == ".png" else "JPEG"
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format=fmt, quality=quality)
  return buffer.getvalue()


def encode_depth(depth: np.ndarray, suffix: str, depth_scale: float = 1000.0) -> bytes:
  """float32 meters -> bytes of a `.png` (uint16 units), `.npy` or `.exr` depth file."""
  depth = np.asarray(depth, np.float32)
  buffer = io.BytesIO()
  if suffix == ".png":
    # 0 stays invalid; values too far for uint16 saturate to 65535 (also invalid).
    raw = np.round(depth * depth_scale)
    raw = np.where(raw > decoding.UINT16_SATURATED, decoding.UINT16_SATURATED, raw)
    Image.fromarray(raw.astype(np.uint16)).save(buffer, format="PNG")
  elif suffix == ".npy":
    np.save(buffer, depth)
  elif suffix == ".exr":
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {"R": depth}) as exr:
      exr.write(buffer)
  else:
    raise ValueError(f"unsupported depth suffix {suffix!r}")
  return buffer.getvalue()


def write_pairs_sequence(
    folder,
    examples: Iterable[Mapping],
    *,
    depth_suffix: str = ".png",
    depth_scale: float = pairs_format.DEFAULT_DEPTH_SCALE,
    image_suffix: str = ".jpg",
    rgb_dir: str = "rgb",
    depth_dir: str = "depth",
    write_confidence: bool = True,
    write_manifest: bool = True,
    stem_format: str = "{frame:06d}",
) -> epath.Path:
  """Writes one `pairs` sequence folder; returns it.

  folder/rgb/000000.jpg, folder/depth/000000.png (uint16 at `depth_scale`
  units per meter, or .npy / .exr meters), folder/confidence/000000.png,
  and folder/depth2d.json with depth_scale and the first frame's intrinsics
  (when write_manifest). Use rgb_dir="X", depth_dir="Y" for the seed's names.
  """
  folder = epath.Path(folder)
  for sub in (rgb_dir, depth_dir) + ((pairs_format.CONFIDENCE_DIR,) if write_confidence else ()):
    (folder / sub).mkdir(parents=True, exist_ok=True)
  first_intrinsics = None
  for example in examples:
    stem = stem_format.format(frame=int(example["frame"]))
    (folder / rgb_dir / f"{stem}{image_suffix}").write_bytes(
        encode_image(example["image"], image_suffix))
    (folder / depth_dir / f"{stem}{depth_suffix}").write_bytes(
        encode_depth(example["depth"], depth_suffix, depth_scale))
    if write_confidence:
      (folder / pairs_format.CONFIDENCE_DIR / f"{stem}.png").write_bytes(
          encode_image_gray(example["confidence"]))
    if first_intrinsics is None:
      first_intrinsics = np.asarray(example["intrinsics"], np.float32)
  if write_manifest:
    manifest = {"depth_scale": depth_scale}
    if first_intrinsics is not None:
      manifest["intrinsics"] = first_intrinsics.tolist()
    (folder / pairs_format.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
  return folder


def encode_image_gray(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def write_r3d(
    path,
    examples: Iterable[Mapping],
    *,
    fps: int = 30,
    camera_type: int = 1,
    write_confidence: bool = True,
    write_metadata: bool = True,
    poses=None,
    timestamps=None,
    compression: int = zipfile.ZIP_STORED,
) -> epath.Path:
  """Writes a Record3D-style `.r3d` ZIP; returns its path.

  metadata JSON (w, h, dw, dh, K column-major for the RGB size, fps,
  cameraType, initPose, poses, frameTimestamps), and per frame i (0, 1, ...
  in the order given): rgbd/{i}.jpg, rgbd/{i}.depth (LZFSE float32 (dh, dw)),
  rgbd/{i}.conf (LZFSE uint8 (dh, dw)). write_metadata=False makes the
  broken file of a bad-input test.

  poses: N rows qx,qy,qz,qw,tx,ty,tz (default: identity for every frame);
  timestamps: N seconds (default i / fps). Either may have another length
  (a bad-input test); [] writes an empty list. compression: zipfile.ZIP_STORED
  or ZIP_DEFLATED (readers must handle both).
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  examples = list(examples)
  if not examples:
    raise ValueError("write_r3d needs at least one example")
  first = examples[0]
  height, width = first["image"].shape[:2]
  depth_height, depth_width = first["depth"].shape
  metadata = {
      "w": width, "h": height, "dw": depth_width, "dh": depth_height,
      # Record3D stores K column-major: the flattened transpose.
      "K": np.asarray(first["intrinsics"], np.float64).T.reshape(-1).tolist(),
      "fps": fps,
      "cameraType": camera_type,
      "initPose": [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
      "poses": ([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0] for _ in examples] if poses is None
                else np.asarray(poses, np.float64).tolist()),
      "frameTimestamps": ([i / fps for i in range(len(examples))] if timestamps is None
                          else [float(t) for t in timestamps]),
  }
  with path.open("wb") as f, zipfile.ZipFile(f, "w", compression) as archive:
    if write_metadata:
      archive.writestr(r3d_format.METADATA_NAME, json.dumps(metadata))
    for i, example in enumerate(examples):
      archive.writestr(f"rgbd/{i}.jpg", encode_image(example["image"], ".jpg"))
      depth = np.ascontiguousarray(example["depth"], dtype="<f4")
      archive.writestr(f"rgbd/{i}.depth", lzfse.compress(depth.tobytes()))
      if write_confidence:
        confidence = np.ascontiguousarray(example["confidence"], dtype=np.uint8)
        archive.writestr(f"rgbd/{i}.conf", lzfse.compress(confidence.tobytes()))
  return path
