"""Regenerates dummy_data/ for the builder tests: python -m tfds_record3d.record3d.make_dummy_data

dummy_data/pairs/  4 sequences x 3 frames, one per supported layout/format:
  lab/        rgb/ + depth/ uint16 PNG (mm) + confidence/ + depth2d.json with K
  seed_style/ the seed's X/ + Y/, PNG depth at 5000 units/m (TUM) via depth2d.json
  npy_seq/    PNG RGB, float32 .npy depth, no manifest (default intrinsics)
  exr_seq/    .exr depth + a Record3D EXR-export metadata.json (column-major K)
dummy_data/r3d/    3 .r3d files x 3 frames (one without .conf), made by writers.write_r3d.
Frames are tiny synthetic renders: RGB 40x30, depth 16x12.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
from etils import epath

from tfds_record3d import synthetic
from tfds_record3d import writers

DUMMY_DIR = epath.Path(__file__).parent / "dummy_data"
IMAGE_SIZE = (40, 30)
DEPTH_SIZE = (16, 12)
FRAMES = 3


def _frames(seed: int) -> list[dict]:
  return list(synthetic.render_sequence(seed, FRAMES, IMAGE_SIZE, DEPTH_SIZE))


def make_pairs(root: epath.Path) -> None:
  writers.write_pairs_sequence(root / "lab", _frames(1))
  writers.write_pairs_sequence(root / "seed_style", _frames(2), rgb_dir="X", depth_dir="Y",
                               depth_scale=5000.0, write_confidence=False)
  # No intrinsics in this manifest: drop it entirely (default intrinsics).
  writers.write_pairs_sequence(root / "npy_seq", _frames(3), depth_suffix=".npy",
                               image_suffix=".png", write_confidence=False,
                               write_manifest=False)
  frames = _frames(4)
  writers.write_pairs_sequence(root / "exr_seq", frames, depth_suffix=".exr",
                               write_confidence=False, write_manifest=False)
  k = frames[0]["intrinsics"]
  (root / "exr_seq" / "metadata.json").write_text(json.dumps({
      "w": IMAGE_SIZE[1], "h": IMAGE_SIZE[0], "dw": DEPTH_SIZE[1], "dh": DEPTH_SIZE[0],
      "K": np.asarray(k, np.float64).T.reshape(-1).tolist(), "fps": 30}))


def make_r3d(root: epath.Path) -> None:
  writers.write_r3d(root / "kitchen.r3d", _frames(5))
  writers.write_r3d(root / "office.r3d", _frames(6))
  writers.write_r3d(root / "truedepth.r3d", _frames(7), camera_type=0, write_confidence=False)


def main() -> None:
  for name, make in (("pairs", make_pairs), ("r3d", make_r3d)):
    root = DUMMY_DIR / name
    if root.exists():
      shutil.rmtree(root)
    root.mkdir(parents=True)
    make(root)
    print(f"wrote {root}")


if __name__ == "__main__":
  main()
