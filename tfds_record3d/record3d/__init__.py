"""record3d dataset (TFDS dataset folder: builder, dummy_data/, checksums.tsv)."""
