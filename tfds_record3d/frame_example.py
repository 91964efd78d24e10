"""One frame as every reader hands it to the builder: the keys of its FeaturesDict."""

from typing import Optional, Union

import numpy as np

# Confidence written for a capture without confidence maps (Record3D's 0, 1, 2 =
# low, medium, high): its depth is trusted like a high-confidence LiDAR return.
NO_CONFIDENCE = 2
# `timestamp` of a frame whose source gives none (Record3D `frameTimestamps`
# absent, a `pairs` file not named by a timestamp).
NO_TIMESTAMP = -1.0
# `camera` values (a ClassLabel: stored as their index, in this order).
CAMERAS = ("lidar", "truedepth", "unknown")
# `pose` of a frame whose source gives none.
IDENTITY_POSE = np.eye(4, dtype=np.float32)


def frame_example(image: Union[np.ndarray, bytes], depth: np.ndarray,
                  confidence: Optional[np.ndarray], intrinsics: np.ndarray, sequence: str,
                  frame: int, *, source: str = "", timestamp: float = NO_TIMESTAMP,
                  pose: Optional[np.ndarray] = None, camera: str = "unknown") -> dict:
  """image uint8 [H,W,3], or the source's encoded JPEG/PNG bytes (stored as
  they are); depth float32 [h,w] meters; confidence uint8 [h,w] or None
  (filled with NO_CONFIDENCE); intrinsics [3,3] for the RGB image's pixels.

  Provenance: source (the file, relative to the manual folder; "" for
  rendered frames), timestamp (seconds, float64), pose (4x4 camera-to-world,
  OpenGL camera axes as Record3D stores it; identity when unknown), camera
  (one of CAMERAS).
  """
  if confidence is None:
    confidence = np.full(depth.shape, NO_CONFIDENCE, np.uint8)
  if camera not in CAMERAS:
    raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
  return {
      "image": image,
      "depth": depth,
      "confidence": confidence,
      "intrinsics": intrinsics,
      "sequence": sequence,
      "frame": frame,
      "source": source,
      "timestamp": np.float64(timestamp),
      "pose": IDENTITY_POSE if pose is None else np.asarray(pose, np.float32),
      "camera": camera,
  }
