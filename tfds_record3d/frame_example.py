"""One frame as every reader hands it to the builder: the keys of its FeaturesDict."""

from typing import Optional

import numpy as np

# Confidence written for a capture without confidence maps (Record3D's 0, 1, 2 =
# low, medium, high): its depth is trusted like a high-confidence LiDAR return.
NO_CONFIDENCE = 2


def frame_example(image: np.ndarray, depth: np.ndarray, confidence: Optional[np.ndarray],
                  intrinsics: np.ndarray, sequence: str, frame: int) -> dict:
  """image uint8 [H,W,3]; depth float32 [h,w] meters; confidence uint8 [h,w] or None
  (filled with NO_CONFIDENCE); intrinsics [3,3] for the RGB image's pixels."""
  if confidence is None:
    confidence = np.full(depth.shape, NO_CONFIDENCE, np.uint8)
  return {
      "image": image,
      "depth": depth,
      "confidence": confidence,
      "intrinsics": intrinsics,
      "sequence": sequence,
      "frame": frame,
  }
