"""trainer.predict on whole captures (.r3d, video, folder of frames): per-frame
outputs, the depth video, the stability figure, the fused point cloud, damage."""

import json
import os
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from tfds_record3d import intrinsics as intrinsics_lib
from tfds_record3d import poses as poses_lib
from tfds_record3d import synthetic
from tfds_record3d import writers
from trainer import captures
from trainer import pointclouds
from trainer import predict
from trainer import stability

imageio = pytest.importorskip("imageio.v2", reason="the video extra: pip install -e '.[video]'")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE, DEPTH_SIZE = (64, 48), (32, 24)  # tiny: 2 shared CPU cores
FRAMES = 5
SEED = 3


def _record3d_pose_rows(seed, num_frames):
  """Record3D pose rows (qx,qy,qz,qw,tx,ty,tz, camera-to-world, OpenGL camera axes)
  of the synthetic capture `seed`: its true OpenCV poses with y and z flipped."""
  _, cameras = synthetic.make_scene(np.random.default_rng(seed), num_frames)
  rows = []
  for camera in cameras:
    rotation_gl = camera.rotation @ np.diag([1.0, -1.0, -1.0])
    rows.append([*poses_lib.quaternion_from_matrix(rotation_gl), *camera.position])
  return rows, cameras


def write_posed_r3d(path, seed=SEED, num_frames=FRAMES):
  """A synthetic .r3d with its real (non-identity) poses in the metadata; returns
  (path, OpenCV camera poses). writers.write_r3d writes identity poses, so the
  metadata entry is rewritten here."""
  frames = list(synthetic.render_sequence(seed, num_frames, IMAGE_SIZE, DEPTH_SIZE))
  writers.write_r3d(path, frames)
  rows, cameras = _record3d_pose_rows(seed, num_frames)
  with zipfile.ZipFile(path) as archive:
    entries = {n: archive.read(n) for n in archive.namelist()}
  metadata = json.loads(entries["metadata"])
  metadata["poses"] = rows
  entries["metadata"] = json.dumps(metadata).encode()
  with zipfile.ZipFile(path, "w") as archive:  # metadata first, as write_r3d writes it
    for name, data in entries.items():
      archive.writestr(name, data)
  return str(path), cameras


def write_mp4(path, num_frames=FRAMES, faststart=True):
  """A tiny H.264 video of synthetic frames (the index first with faststart)."""
  frames = [f["image"] for f in synthetic.render_sequence(SEED, num_frames, IMAGE_SIZE,
                                                           DEPTH_SIZE)]
  params = ["-movflags", "+faststart"] if faststart else []
  with imageio.get_writer(str(path), format="ffmpeg", fps=10, codec="libx264", quality=8,
                          macro_block_size=1, ffmpeg_params=params,
                          ffmpeg_log_level="error") as writer:
    for frame in frames:
      writer.append_data(frame)
  return str(path)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """A tiny untrained SavedModel (rough U-Net at 32x24, depth ~2 m) in our serving format."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from trainer import export as export_lib  # pylint: disable=import-outside-toplevel
  from trainer import models  # pylint: disable=import-outside-toplevel
  network = models.build_stage_network("rough", "unet", (32, 24), initial_depth=2.0)
  module = export_lib.DepthServingModule(network, (32, 24), max_depth=10.0)
  path = str(tmp_path_factory.mktemp("export") / "export")
  tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
  with open(os.path.join(path, "depth2d.json"), "w", encoding="utf-8") as f:  # as trainer.export
    json.dump({"stage": "rough", "architecture": "unet", "image_size": [32, 24],
               "max_depth": 10.0}, f)
  return path


@pytest.fixture(scope="module")
def model(export):
  return predict.load_model(export)


def _video_frames(path):
  with imageio.get_reader(str(path), format="ffmpeg") as reader:
    return [np.asarray(f) for f in reader]


# ----------------------------------------------------------------------------
# Geometry: Record3D poses, axes, fusion (no model).
# ----------------------------------------------------------------------------
def test_lidar_depth_of_two_frames_lands_on_the_same_world_surface(tmp_path):
  path, cameras = write_posed_r3d(tmp_path / "walk.r3d", num_frames=8)  # ~30 cm apart
  capture = captures.open_capture(path)
  frames = list(capture.frames())
  assert len(frames) == 8 and capture.poses.shape == (8, 4, 4)
  assert not np.allclose(frames[0].pose, np.eye(4))  # a real pose, not identity
  # The Record3D pose, converted to OpenCV axes, is the renderer's own camera.
  transform = poses_lib.opencv_camera_to_world(frames[2].pose)
  np.testing.assert_allclose(transform[:3, :3], cameras[2].rotation, atol=1e-5)
  np.testing.assert_allclose(transform[:3, 3], cameras[2].position, atol=1e-5)

  k = frames[0].intrinsics * np.array([[DEPTH_SIZE[1] / IMAGE_SIZE[1]],
                                         [DEPTH_SIZE[0] / IMAGE_SIZE[0]], [1]])

  def reprojection_error(read=lambda pose: pose):
    """The last frame's LiDAR points projected into frame 0 with the poses as
    `read` makes them: median |z - depth_0| / depth_0."""
    world = pointclouds.world_points(frames[-1].depth, k, read(frames[-1].pose))[0]
    camera = np.linalg.inv(poses_lib.opencv_camera_to_world(read(frames[0].pose)))
    xyz = world @ camera[:3, :3].T + camera[:3, 3]
    xyz = xyz[xyz[:, 2] > 0.1]
    col = np.floor(k[0, 0] * xyz[:, 0] / xyz[:, 2] + k[0, 2]).astype(int)
    row = np.floor(k[1, 1] * xyz[:, 1] / xyz[:, 2] + k[1, 2]).astype(int)
    inside = (row >= 0) & (row < DEPTH_SIZE[0]) & (col >= 0) & (col < DEPTH_SIZE[1])
    seen = frames[0].depth[row[inside], col[inside]]
    z = xyz[inside, 2][seen > 0]
    assert z.size > 100, "the two views must overlap"
    return float(np.median(np.abs(z - seen[seen > 0]) / seen[seen > 0]))

  # Same walls seen from two poses: the surfaces coincide within the sensor
  # noise (~2%)...
  assert reprojection_error() < 0.03
  # ...and would not, were the OpenGL axes taken for OpenCV ones, or the poses
  # for world-to-camera.
  assert reprojection_error(lambda pose: pose @ poses_lib.OPENCV_TO_OPENGL) > 0.06
  assert reprojection_error(np.linalg.inv) > 0.1


def test_one_world_point_seen_from_two_poses_fuses_to_one_voxel():
  k = np.array([[40.0, 0, 12], [0, 40.0, 16], [0, 0, 1]], np.float32)
  point = np.array([0.31, -0.21, -2.52])  # inside a 5 cm voxel, not on its face
  s = np.sqrt(0.5)
  depth_maps, poses = [], []
  for quaternion, centre in (((0, 0, 0, 1), (0.0, 0.0, 0.0)), ((0, s, 0, s), (2.8, 0.1, -2.4))):
    pose = poses_lib.pose_matrix(*quaternion, *centre)
    camera = np.linalg.inv(poses_lib.opencv_camera_to_world(pose).astype(np.float64))
    x, y, z = camera[:3, :3] @ point + camera[:3, 3]  # OpenCV camera coordinates
    assert z > 0, "the point must be in front of both cameras"
    u, v = k[0, 0] * x / z + k[0, 2], k[1, 1] * y / z + k[1, 2]
    # A depth map seeing the point at the pixel it projects into (moved to the
    # pixel centre, so the intrinsics need the same shift).
    depth = np.zeros((32, 24), np.float32)
    row, col = int(v), int(u)
    depth[row, col] = z
    shifted = k.copy()
    shifted[0, 2] += (col + 0.5) - u
    shifted[1, 2] += (row + 0.5) - v
    depth_maps.append((depth, shifted))
    poses.append(pose)
  fuser = pointclouds.VoxelFuser(0.05)
  for (depth, intrinsics), pose in zip(depth_maps, poses):
    xyz, _ = pointclouds.world_points(depth, intrinsics, pose)
    np.testing.assert_allclose(xyz[0], point, atol=1e-4)
    fuser.add(xyz, np.array([[255, 0, 0]], np.uint8))
  xyz, rgb, counts = fuser.points()
  assert len(xyz) == 1 and counts[0] == 2 and rgb[0].tolist() == [255, 0, 0]
  np.testing.assert_allclose(xyz[0], point, atol=1e-4)


def test_stability_meter_measures_flicker_where_the_image_is_static():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (40, 30, 3), np.uint8)
  meter = stability.StabilityMeter()
  for t in range(4):
    depth = np.full((40, 30), 2.0, np.float32) * (1.0 + 0.05 * (t % 2))  # 2.0, 2.1, 2.0...
    moved = rgb.copy()
    moved[:20] = rng.integers(0, 256, (20, 30, 3), np.uint8)  # top half changes
    meter.add(moved, depth)
  figure = meter.summary()["rgb_static"]
  assert figure["pairs"] == 3 and figure["pairs_used"] == 3
  assert figure["median"] == pytest.approx(0.1 / 2.05, rel=1e-6)
  assert 0.4 < figure["static_fraction"] < 0.6
  assert meter.summary()["ground_truth_static"] is None


def test_one_colour_scale_for_the_whole_video():
  from trainer import video  # pylint: disable=import-outside-toplevel
  scale = video.ColourScale()
  for value in (1.0, 3.0):  # flat frames: a per-frame scale would hide the jump
    scale.add(np.full((64, 80), value, np.float32))
  low, high = scale.range()
  assert low == pytest.approx(1.0) and high == pytest.approx(3.0)
  near, far = (video.compose(np.zeros((32, 24, 3), np.uint8), np.full((32, 24), d, np.float32),
                             low, high) for d in (1.0, 3.0))
  assert near.shape == far.shape and near.shape[0] % 16 == 0 and near.shape[1] % 16 == 0
  depth_panel = (slice(100, 150), slice(200, 300))  # inside the depth half, below the label
  assert not np.array_equal(near[depth_panel], far[depth_panel])
  assert video._ticks(0.4, 5.3) == ([1.0, 2.0, 3.0, 4.0, 5.0], 0)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# Predicting captures.
# ----------------------------------------------------------------------------
def _per_frame(folder, suffix):
  return sorted(f for f in os.listdir(folder) if f.endswith(suffix))


def test_r3d_writes_every_frame_a_video_stability_and_fused_clouds(export, model, tmp_path):
  path, cameras = write_posed_r3d(tmp_path / "kitchen.r3d")
  out = tmp_path / "out"
  # Voxels larger than the tiny LiDAR's point spacing (~10 cm at 2-3 m), so
  # that views of the same walls merge.
  outcome = predict.predict_paths(export, [path], str(out), ply=True, voxel_size=0.2)
  assert outcome == {path: None}
  assert _per_frame(out / "kitchen", "_depth.npy") == [f"{i:06d}_depth.npy" for i in range(FRAMES)]
  assert len(_per_frame(out / "kitchen", "_depth.png")) == FRAMES
  assert len(_per_frame(out / "kitchen", ".ply")) == FRAMES
  frames = _video_frames(out / "kitchen_depth.mp4")
  assert len(frames) == FRAMES
  assert frames[0].shape[0] % 16 == 0 and frames[0].shape[0] >= 256  # readable, enlarged
  stability = json.loads((out / "kitchen_stability.json").read_text())
  assert stability["frames"] == FRAMES and stability["complete"]
  for key in ("rgb_static", "ground_truth_static"):
    assert stability[key]["pairs"] == FRAMES - 1
    assert np.isfinite(stability[key]["median"]) and stability[key]["median"] >= 0
  fused, colours = pointclouds.read_ply(out / "kitchen_fused.ply")
  lidar, _ = pointclouds.read_ply(out / "kitchen_fused_lidar.ply")
  assert 0 < len(fused) <= FRAMES * IMAGE_SIZE[0] * IMAGE_SIZE[1] and colours.dtype == np.uint8
  # Predicted points lie where the model put them: along the cameras' rays at
  # the predicted depth (~2 m from the untrained net), in front of a camera.
  depths = [np.load(out / "kitchen" / f"{i:06d}_depth.npy") for i in range(FRAMES)]
  low, high = min(d.min() for d in depths), max(d.max() for d in depths)
  centres = np.stack([c.position for c in cameras])
  distance = np.sqrt(((fused[:, None] - centres[None]) ** 2).sum(-1)).min(axis=1)
  assert (distance > 0.9 * low).all() and (distance < 1.6 * high).all()
  # The LiDAR views of the same walls overlap in world coordinates: all frames
  # together occupy not many more voxels than the first frame alone.
  first = captures.open_capture(path).frames().__next__()
  alone = pointclouds.VoxelFuser(0.2)
  k_depth = intrinsics_lib.scale_intrinsics(first.intrinsics, IMAGE_SIZE, DEPTH_SIZE)
  xyz, _ = pointclouds.world_points(first.depth, k_depth, first.pose)
  alone.add(xyz, np.zeros((len(xyz), 3), np.uint8))
  assert len(alone.points()[0]) < len(lidar) < 1.6 * len(alone.points()[0])
  # The same capture again: refused, naming an existing file, nothing changed.
  before = (out / "kitchen" / "000000_depth.npy").read_bytes()
  with pytest.raises(ValueError, match=r"already exist.*kitchen.*--overwrite"):
    predict.predict_paths(export, [path], str(out))
  assert (out / "kitchen" / "000000_depth.npy").read_bytes() == before
  # A capture and an image of the same name write different files; two
  # captures of the same name are refused before anything is written.
  (tmp_path / "b").mkdir()
  os.link(path, tmp_path / "b" / "kitchen.r3d")
  with pytest.raises(ValueError, match="same outputs"):
    predict.predict_paths(export, [path, str(tmp_path / "b" / "kitchen.r3d")],
                          str(tmp_path / "out2"))
  assert not (tmp_path / "out2").exists()


def test_mp4_and_folder_of_frames(export, tmp_path):
  video = write_mp4(tmp_path / "walk.mp4")
  folder = tmp_path / "shots"
  folder.mkdir()
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for i, frame in enumerate(synthetic.render_sequence(SEED, 3, IMAGE_SIZE, DEPTH_SIZE)):
    Image.fromarray(frame["image"]).save(folder / f"img{i * 5}.png")  # img0, img5, img10
  out = tmp_path / "out"
  outcome = predict.predict_paths(export, [video, str(folder)], str(out), ply=True)
  assert outcome == {video: None, str(folder): None}
  assert len(_per_frame(out / "walk", "_depth.npy")) == FRAMES
  assert len(_video_frames(out / "walk_depth.mp4")) == FRAMES
  assert _per_frame(out / "shots", "_depth.npy") == [
      "img0_depth.npy", "img10_depth.npy", "img5_depth.npy"]
  assert len(_video_frames(out / "shots_depth.mp4")) == 3
  # Natural order in the video: img0, img5, img10 (the RGB half of frame 2 is img10).
  video_frames = _video_frames(out / "shots_depth.mp4")
  last = np.asarray(Image.open(folder / "img10.png").resize((192, 256)), np.float32)
  assert np.abs(video_frames[2][:256, :192].astype(np.float32) - last).mean() < 12
  for name in ("walk", "shots"):
    stability = json.loads((out / f"{name}_stability.json").read_text())
    assert stability["ground_truth_static"] is None  # no LiDAR in a video
    assert np.isfinite(stability["rgb_static"]["median"])
  assert not (out / "walk_fused.ply").exists()  # no poses in a video: no fused cloud
  assert len(_per_frame(out / "walk", ".ply")) == FRAMES  # but per-frame clouds


# ----------------------------------------------------------------------------
# Damaged captures: frames up to the damage, then an error naming file and frame.
# ----------------------------------------------------------------------------
def test_truncated_r3d_reads_frames_until_the_damage(export, tmp_path):
  path, _ = write_posed_r3d(tmp_path / "cut.r3d")
  data = open(path, "rb").read()
  with zipfile.ZipFile(path) as archive:  # cut inside frame 3's RGB
    cut = archive.getinfo("rgbd/3.jpg").header_offset + 40
  open(path, "wb").write(data[:cut])
  capture = captures.open_capture(path)
  read = []
  with pytest.raises(captures.CaptureError, match=r"cut\.r3d: frame 3: truncated") as error:
    for frame in capture.frames():
      read.append(frame)
  assert [f.name for f in read] == ["000000", "000001", "000002"] and error.value.frame == 3
  assert all(f.depth is not None and f.pose is not None for f in read)
  assert f"the metadata lists {FRAMES} frames" in str(error.value)
  out = tmp_path / "out"
  outcome = predict.predict_paths(export, [path], str(out), ply=True)
  assert "cut.r3d: frame 3" in outcome[path]
  assert len(_per_frame(out / "cut", "_depth.npy")) == 3  # outputs so far kept
  assert len(_video_frames(out / "cut_depth.mp4")) == 3
  stability = json.loads((out / "cut_stability.json").read_text())
  assert not stability["complete"] and "frame 3" in stability["error"]
  assert (out / "cut_fused.ply").exists()


def test_damaged_frame_inside_an_intact_r3d(tmp_path):
  path, _ = write_posed_r3d(tmp_path / "bad.r3d")
  with zipfile.ZipFile(path) as archive:
    entries = {n: archive.read(n) for n in archive.namelist()}
  entries["rgbd/1.depth"] = entries["rgbd/1.depth"][:10]  # not LZFSE any more
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in entries.items():
      archive.writestr(name, data)
  frames = captures.open_capture(path).frames()
  assert next(frames).name == "000000"
  with pytest.raises(captures.CaptureError, match=r"bad\.r3d: frame 1: rgbd/1\.depth"):
    next(frames)


def test_truncated_mp4(export, tmp_path):
  good = write_mp4(tmp_path / "full.mp4", num_frames=10)
  cut = tmp_path / "cut.mp4"
  data = open(good, "rb").read()
  cut.write_bytes(data[:int(len(data) * 0.6)])
  out = tmp_path / "out"
  outcome = predict.predict_paths(export, [str(cut)], str(out))
  assert "cut.mp4: frame" in outcome[str(cut)] and "ends early" in outcome[str(cut)]
  kept = len(_per_frame(out / "cut", "_depth.npy"))
  assert 0 < kept < 10 and f"frame {kept}:" in outcome[str(cut)]
  assert len(_video_frames(out / "cut_depth.mp4")) == kept
  # Index at the end (no faststart) and cut: nothing is readable, said so.
  no_index = write_mp4(tmp_path / "late.mp4", faststart=False)
  cut = tmp_path / "late_cut.mp4"
  cut.write_bytes(open(no_index, "rb").read()[:2000])
  with pytest.raises(captures.CaptureError, match=r"late_cut\.mp4: frame 0: not a readable"):
    list(captures.open_capture(str(cut)).frames())


def test_missing_video_extra_is_named_before_anything_is_written(export, tmp_path, monkeypatch):
  path, _ = write_posed_r3d(tmp_path / "kitchen.r3d", num_frames=2)
  monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails
  out = tmp_path / "out"
  with pytest.raises(ImportError, match=r'pip install -e "\.\[video\]"'):
    predict.predict_paths(export, [path], str(out))
  assert not out.exists()
  assert predict.predict_paths(export, [path], str(out), video=False) == {path: None}
  assert (out / "kitchen_stability.json").exists() and not (out / "kitchen_depth.mp4").exists()


@pytest.mark.slow
def test_cli_on_an_r3d(export, tmp_path, subprocess_env):
  path, _ = write_posed_r3d(tmp_path / "kitchen.r3d", num_frames=3)
  out = tmp_path / "out"
  command = [sys.executable, "-m", "trainer.predict", f"--export_dir={export}",
             f"--output_dir={out}", "--ply", "--noframe_ply", path]
  proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "kitchen: flicker (median frame-to-frame relative depth change)" in proc.stdout
  assert "predict kitchen: 3/3 (100%)" in proc.stderr and " left" in proc.stderr
  assert (out / "kitchen_fused.ply").exists() and not _per_frame(out / "kitchen", ".ply")
  again = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 2 and "already exist" in again.stderr
  assert "Traceback" not in again.stderr


def test_cli_refuses_a_gs_output_dir_before_anything_is_written(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  flag_values = types.SimpleNamespace(export_dir=str(tmp_path), output_dir="gs://bucket/out",
                                      voxel_size=0.05, fps=None)
  assert predict.main(["trainer.predict", "photo.png"], flag_values) == 2
  assert ("--output_dir=gs://bucket/out: must be a local folder" in capsys.readouterr().err)
  assert not list(tmp_path.iterdir())  # no local "gs:" folder
