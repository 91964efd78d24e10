"""The `record3d` TFDS dataset (Record3D iPhone LiDAR captures).

`import tfds_record3d` registers the builder, after which
`tfds.load('record3d/synthetic', data_dir=..., split='train')` works.

Non-TFDS helpers the trainer and tests use:
  synthetic.render_sequence(seed, num_frames, image_size, depth_size) -> examples
  writers.write_pairs_sequence(folder, examples, ...), writers.write_r3d(path, examples, ...)
  splits.split_sequences(frame_counts) -> {split: [(sequence, positions)]}
  provenance.fingerprint(manual_dir) -> {digest, files, bytes} (a build's is in
    info.metadata["provenance"], with built_at and manual_dir)
"""

from tfds_record3d.record3d.record3d_dataset_builder import Builder
from tfds_record3d.record3d.record3d_dataset_builder import Record3dConfig
from tfds_record3d.validation import ManualInputError

__all__ = ["Builder", "Record3dConfig", "ManualInputError"]
