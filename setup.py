"""depth2d: single-image depth networks trained on Record3D (iPhone LiDAR) captures."""

import setuptools

CORE = [
    # TensorFlow 2.21 ships Keras 3 as tf.keras; the trainer relies on that.
    "tensorflow>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",  # tf.summary needs it in TF 2.21
    "tensorflow-datasets>=4.9.9,<5",
    # `tfds build` (tensorflow-datasets 4.9.x) imports both at start-up.
    "apache-beam>=2.60,<3",
    "mlcroissant>=1.0,<2",
    # tensorflow-datasets 4.9.10 imports it when a builder lives outside TFDS
    # (our `record3d`) but does not declare it.
    "importlib_resources>=6",
    "absl-py>=2.1,<3",
    "numpy>=1.26,<3",
    "Pillow>=10,<14",
    "matplotlib>=3.8,<4",  # colour maps and the report's comparison figure
    "lzfse>=0.4,<0.5",  # Record3D .r3d depth and confidence are LZFSE-compressed
    "openexr>=3.2,<4",  # Record3D EXR exports and .exr depth in `pairs`
    "google-cloud-storage>=2.18,<4",
    # tensorflow-datasets needs both already; tfds_record3d.build_benchmark uses
    # them directly (progress bars, the Beam workers' CPU time).
    "tqdm>=4.60,<5",
    "psutil>=5.9,<8",
]

CLOUD = [
    "google-cloud-aiplatform>=1.70,<3",
    "PyYAML>=6,<7",  # `launch.vertex --dry_run` writes the gcloud --config YAML
]

# Mobile export: running .tflite files with the maintained LiteRT interpreter
# (TensorFlow's own tf.lite converts; 1.0.x fails to load our files).
LITERT = [
    "ai-edge-litert>=1.1.2,<3",
]

# trainer.predict's depth videos and video inputs; imageio-ffmpeg ships its own
# ffmpeg binary (tested: imageio 2.38.2, imageio-ffmpeg 0.8.1).
VIDEO = [
    "imageio>=2.31,<3",
    "imageio-ffmpeg>=0.5,<1",
]

TEST = CLOUD + LITERT + VIDEO + [
    "pytest>=8,<10",
    "pytest-xdist>=3.5,<4",  # -n 2: the suite on both cores of a 2-core CI machine
    "dill>=0.3",  # tfds.testing imports it
    "gcp-storage-emulator>=2024.0",
    "trustme>=1.1,<2",  # tests/gcs_server.py: the TLS certificate TF's GCS client trusts
]

setuptools.setup(
    name="depth2d",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["trainer", "trainer.*", "tfds_record3d", "tfds_record3d.*", "launch", "launch.*"]),
    package_data={"tfds_record3d": ["**/dummy_data/**/*", "**/*.txt", "**/*.tsv"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={"cloud": CLOUD, "litert": LITERT, "video": VIDEO, "test": TEST},
)
