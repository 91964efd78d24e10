"""Procedural indoor scenes with exact depth (the `synthetic` config).

Each sequence is one room (floor, ceiling, four walls) furnished with
axis-aligned boxes and spheres, seen by a hand-held camera that walks a short
smooth trajectory, like a Record3D capture. Everything is ray-cast
analytically with vectorised numpy, once at the RGB size and once at the
depth size, from the same camera, so depth is exact and never resampled.

Depth is meant to be learnable from the image, even by a small CNN at low
resolution, so the renderer deliberately provides monocular cues:
  * textures defined in world units (tiles, checkers, planks, stripes) whose
    image frequency grows with distance, filtered by the pixel footprint so
    they fade out instead of aliasing far away;
  * Lambertian shading from a ceiling light (surface orientation);
  * a lamp at the camera (like a flash or a torch) whose light falls off with
    the squared distance: brightness alone says "near" or "far".

World frame: x right, y up, floor at y = 0, the room spans [0, size] on each
axis. Camera frame: OpenCV (x right, y down, z forward). Depth is the z
coordinate in the camera frame (what LiDAR depth maps store), in meters.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator

import numpy as np

from tfds_record3d import intrinsics as intrinsics_lib
from tfds_record3d.frame_example import frame_example

# The seed's data: 1059 frames, portrait 3:4, depth at the LiDAR's 256x192.
NUM_FRAMES = 1059
IMAGE_SIZE = (320, 240)  # (H, W) of RGB; small so the build stays fast on 2 cores.
DEPTH_SIZE = (256, 192)  # (H, W) of depth and confidence.
FRAMES_PER_SEQUENCE = 35  # Typical sequence length (lengths vary +-15%).
# Bump together with the builder VERSION whenever rendering changes.
RENDER_SEED = 1_000

# Like the iPhone LiDAR, returns beyond this range are invalid (depth 0).
MAX_RANGE_M = 6.5

# Texture kinds.
_CHECKER, _TILES, _PLANKS, _STRIPES, _PLASTER = range(5)

# Light levels in linear RGB (before gamma).
_AMBIENT = 0.08
_CEILING_LIGHT = 0.25
_LAMP_POWER = 1.8  # Irradiance at 1 m is LAMP_POWER / (1 + _LAMP_SOFTENING).
_LAMP_SOFTENING = 0.3  # m^2, keeps very close surfaces from blowing out.


@dataclasses.dataclass(frozen=True)
class Material:
  kind: int  # One of the texture kinds above.
  color_a: np.ndarray  # (3,) linear albedo of the pattern's "on" state.
  color_b: np.ndarray  # (3,) linear albedo of the "off" state.
  period: float  # Pattern period in meters (world units).


@dataclasses.dataclass(frozen=True)
class Box:
  low: np.ndarray  # (3,) min corner, meters.
  high: np.ndarray  # (3,) max corner.
  material: int  # Index into Scene.materials.


@dataclasses.dataclass(frozen=True)
class Sphere:
  center: np.ndarray  # (3,)
  radius: float
  material: int


@dataclasses.dataclass(frozen=True)
class Scene:
  room_size: np.ndarray  # (3,) extent along x, y (height), z.
  # Room faces in order x-min, x-max, floor, ceiling, z-min, z-max.
  face_materials: tuple[int, ...]
  boxes: tuple[Box, ...]
  spheres: tuple[Sphere, ...]
  materials: tuple[Material, ...]
  light_direction: np.ndarray  # (3,) unit, direction the ceiling light travels.
  exposure: float


@dataclasses.dataclass(frozen=True)
class CameraPose:
  rotation: np.ndarray  # (3, 3) camera-to-world; columns = camera x, y, z axes.
  position: np.ndarray  # (3,) camera centre in world coordinates.


@dataclasses.dataclass(frozen=True)
class View:
  """One rendered view; all arrays have the render size (H, W)."""
  rgb: np.ndarray | None  # uint8 (H, W, 3), None if not shaded.
  depth: np.ndarray  # float32 (H, W) z-depth in meters, 0 = invalid.
  confidence: np.ndarray  # uint8 (H, W), 2 high, 1 grazing, 0 out of range.
  surface: np.ndarray  # int32 (H, W): 0..5 room faces, 6+ objects.


FLOOR_SURFACE = 2  # `View.surface` value of floor pixels.


def _random_color(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
  base = rng.uniform(lo, hi)
  tint = rng.uniform(-0.08, 0.08, size=3)
  return np.clip(base + tint, 0.02, 0.95)


def _random_material(rng: np.random.Generator, kinds, period_range) -> Material:
  color_a = _random_color(rng, 0.35, 0.85)
  color_b = np.clip(color_a * rng.uniform(0.35, 0.7), 0.02, 0.95)
  return Material(
      kind=int(rng.choice(kinds)),
      color_a=color_a,
      color_b=color_b,
      period=float(rng.uniform(*period_range)),
  )


def _camera_trajectory(
    rng: np.random.Generator, room_size: np.ndarray, num_frames: int
) -> list[CameraPose]:
  """A smooth hand-held walk inside the room, looking slightly down."""
  margin = 0.7
  position = np.array([
      rng.uniform(margin, room_size[0] - margin),
      rng.uniform(1.1, 1.6),
      rng.uniform(margin, room_size[2] - margin),
  ])
  yaw = rng.uniform(0, 2 * np.pi)
  yaw_rate = rng.uniform(-0.03, 0.03)  # radians per frame
  pitch0 = rng.uniform(-0.55, -0.2)  # looking down: the floor is visible
  speed = rng.uniform(0.02, 0.05)  # meters per frame
  phase = rng.uniform(0, 2 * np.pi, size=3)
  poses = []
  for i in range(num_frames):
    pitch = pitch0 + 0.08 * np.sin(0.15 * i + phase[0])
    roll = 0.04 * np.sin(0.11 * i + phase[1])
    heading = yaw + yaw_rate * i
    # Walk roughly along the heading, bouncing off the walls' safety margin.
    step = speed * np.array([np.sin(heading + 0.5), 0.0, np.cos(heading + 0.5)])
    position = position + step
    position[1] += 0.005 * np.sin(0.2 * i + phase[2])
    for axis in (0, 2):
      position[axis] = np.clip(position[axis], margin, room_size[axis] - margin)
    poses.append(CameraPose(_rotation(heading, pitch, roll), position.copy()))
  return poses


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
  """Camera-to-world rotation for an OpenCV camera (x right, y down, z fwd)."""
  forward = np.array([
      np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)
  ])
  world_up = np.array([0.0, 1.0, 0.0])
  right = np.cross(forward, world_up)
  right /= np.linalg.norm(right)
  down = np.cross(forward, right)
  # Roll about the optical axis.
  c, s = np.cos(roll), np.sin(roll)
  right, down = c * right + s * down, -s * right + c * down
  return np.stack([right, down, forward], axis=1)


def _box_clear_of_path(low, high, path_xz, clearance) -> bool:
  """True if the box footprint stays `clearance` m away from every position."""
  nearest = np.clip(path_xz, low[[0, 2]], high[[0, 2]])
  return bool(np.all(np.linalg.norm(path_xz - nearest, axis=1) > clearance))


def make_scene(
    rng: np.random.Generator, num_frames: int
) -> tuple[Scene, list[CameraPose]]:
  """Draws a furnished room and a camera trajectory that avoids the furniture."""
  room_size = np.array([
      rng.uniform(3.5, 7.0), rng.uniform(2.4, 3.1), rng.uniform(3.5, 7.0)
  ])
  materials: list[Material] = []

  def add(material: Material) -> int:
    materials.append(material)
    return len(materials) - 1

  floor = add(_random_material(rng, [_CHECKER, _TILES, _PLANKS], (0.25, 0.7)))
  ceiling = add(Material(_PLASTER, np.full(3, 0.85), np.full(3, 0.7), 0.9))
  wall_a = add(_random_material(rng, [_STRIPES, _PLASTER, _TILES], (0.12, 0.5)))
  wall_b = add(_random_material(rng, [_STRIPES, _PLASTER, _CHECKER], (0.12, 0.5)))
  face_materials = (wall_a, wall_a, floor, ceiling, wall_b, wall_b)

  poses = _camera_trajectory(rng, room_size, num_frames)
  path_xz = np.array([pose.position[[0, 2]] for pose in poses])

  boxes: list[Box] = []
  for _ in range(60):  # rejection sampling; most rooms get 3-6 pieces
    if len(boxes) >= rng.integers(3, 7):
      break
    size = np.array([
        rng.uniform(0.4, 1.6), rng.uniform(0.3, 1.9), rng.uniform(0.4, 1.6)
    ])
    low = np.array([
        rng.uniform(0.0, room_size[0] - size[0]),
        0.0,
        rng.uniform(0.0, room_size[2] - size[2]),
    ])
    high = low + size
    if _box_clear_of_path(low, high, path_xz, clearance=0.45):
      material = add(_random_material(rng, [_PLANKS, _CHECKER, _STRIPES], (0.08, 0.3)))
      boxes.append(Box(low, high, material))

  spheres: list[Sphere] = []
  for _ in range(30):
    if len(spheres) >= rng.integers(1, 4):
      break
    radius = rng.uniform(0.15, 0.5)
    center = np.array([
        rng.uniform(radius, room_size[0] - radius),
        radius,
        rng.uniform(radius, room_size[2] - radius),
    ])
    on_box = [b for b in boxes if np.all(center[[0, 2]] > b.low[[0, 2]])
              and np.all(center[[0, 2]] < b.high[[0, 2]])]
    if on_box:  # Rest it on top of the box under it instead of inside it.
      center[1] = max(b.high[1] for b in on_box) + radius
    if center[1] + radius > room_size[1]:
      continue
    clear = np.linalg.norm(path_xz - center[[0, 2]], axis=1) > radius + 0.45
    if np.all(clear):
      material = add(_random_material(rng, [_STRIPES, _CHECKER], (0.06, 0.2)))
      spheres.append(Sphere(center, float(radius), material))

  light = np.array([rng.uniform(-0.5, 0.5), -1.0, rng.uniform(-0.5, 0.5)])
  scene = Scene(
      room_size=room_size,
      face_materials=face_materials,
      boxes=tuple(boxes),
      spheres=tuple(spheres),
      materials=tuple(materials),
      light_direction=light / np.linalg.norm(light),
      exposure=float(rng.uniform(0.9, 1.1)),
  )
  return scene, poses


@dataclasses.dataclass
class _Hits:
  """Closest intersection per ray; arrays of length N (rays)."""
  t: np.ndarray  # (N,) ray parameter == camera z-depth (rays have z = 1).
  normal: np.ndarray  # (N, 3) unit world normal (outward for objects, inward for the room).
  surface: np.ndarray  # (N,) 0..5 room faces, 6 + i box i, 6 + len(boxes) + j sphere j.
  material: np.ndarray  # (N,) index into Scene.materials.
  uv: np.ndarray  # (N, 2) surface coordinates in meters (for textures).


def _intersect(scene: Scene, origin: np.ndarray, dirs: np.ndarray) -> _Hits:
  """Closest hit of each ray `origin + t * dirs[k]`; dirs (N, 3), not unit.

  First pass: only the nearest t and which surface it belongs to (cheap,
  whole-array ops). Second pass: normals and texture coordinates, computed
  once per surface on just the rays that hit it.
  """
  n = dirs.shape[0]
  with np.errstate(divide="ignore", invalid="ignore"):
    inv = 1.0 / dirs  # (N, 3); +-inf where a component is 0, handled by slabs.
  best_t = np.full(n, np.inf)
  surface = np.zeros(n, np.int32)

  def keep_closer(t, surface_id):
    closer = t < best_t
    np.copyto(best_t, t, where=closer)
    surface[closer] = surface_id

  # Room: from inside, each axis is left through the side the ray points to.
  for axis in range(3):
    positive = dirs[:, axis] > 0
    bound = np.where(positive, scene.room_size[axis], 0.0)
    t = (bound - origin[axis]) * inv[:, axis]
    t[dirs[:, axis] == 0] = np.inf
    closer = t < best_t
    np.copyto(best_t, t, where=closer)
    surface[closer] = 2 * axis + positive[closer]

  # Boxes (slab method). The camera is never inside one.
  first_box = 6
  inv_columns = [np.ascontiguousarray(inv[:, k]) for k in range(3)]  # 3 x (N,)
  for i, box in enumerate(scene.boxes):
    t_enter = np.full(n, -np.inf)
    t_exit = np.full(n, np.inf)
    for k in range(3):  # per-axis columns: much faster than (N, 3) reductions
      t_low = (box.low[k] - origin[k]) * inv_columns[k]
      t_high = (box.high[k] - origin[k]) * inv_columns[k]
      np.maximum(t_enter, np.minimum(t_low, t_high), out=t_enter)
      np.minimum(t_exit, np.maximum(t_low, t_high), out=t_exit)
    t_enter[(t_enter > t_exit) | (t_enter <= 1e-6)] = np.inf
    keep_closer(t_enter, first_box + i)

  # Spheres: smallest positive root of |o + t d - c|^2 = r^2.
  first_sphere = first_box + len(scene.boxes)
  a = np.einsum("ij,ij->i", dirs, dirs)
  for j, sphere in enumerate(scene.spheres):
    oc = origin - sphere.center
    b = 2.0 * _dot(dirs, oc)
    c = oc @ oc - sphere.radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
      t = (-b - np.sqrt(disc)) / (2 * a)
    t[~(t > 1e-6)] = np.inf  # also catches NaN (missed rays)
    keep_closer(t, first_sphere + j)

  points = origin + best_t[:, None] * dirs  # (N, 3) world hit points
  normal = np.zeros((n, 3))
  uv = np.zeros((n, 2))
  material = np.zeros(n, np.int32)
  for surface_id in np.unique(surface):
    idx = np.nonzero(surface == surface_id)[0]
    p = points[idx]
    if surface_id < first_box:  # room face 2 * axis + side
      axis, side = divmod(int(surface_id), 2)
      normal[idx, axis] = -1.0 if side else 1.0  # pointing into the room
      uv[idx] = p[:, [a_ for a_ in range(3) if a_ != axis]]
      material[idx] = scene.face_materials[surface_id]
    elif surface_id < first_sphere:
      box = scene.boxes[surface_id - first_box]
      # The face hit is the one the point lies on: nearest of the 6 planes.
      gaps = np.concatenate([np.abs(p - box.low), np.abs(p - box.high)], axis=1)
      face = np.argmin(gaps, axis=1)  # 0..2 low faces, 3..5 high faces
      axis = face % 3
      normal[idx, axis] = np.where(face >= 3, 1.0, -1.0)
      # Texture coordinates: the two axes spanning the face.
      uv[idx] = np.where(
          (axis == 0)[:, None], p[:, [2, 1]],
          np.where((axis == 1)[:, None], p[:, [0, 2]], p[:, [0, 1]]))
      material[idx] = box.material
    else:
      sphere = scene.spheres[surface_id - first_sphere]
      normal[idx] = (p - sphere.center) / sphere.radius
      # uv: arc length around the vertical axis, and height.
      uv[idx, 0] = np.arctan2(normal[idx, 2], normal[idx, 0]) * sphere.radius
      uv[idx, 1] = p[:, 1]
      material[idx] = sphere.material
  return _Hits(t=best_t, normal=normal, surface=surface, material=material, uv=uv)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Sum over the last axis of a * b. Avoids BLAS for (N, 3) @ (3,): tiny
  products where BLAS threads only spin and steal the other core."""
  if b.ndim == 1:
    return a[..., 0] * b[0] + a[..., 1] * b[1] + a[..., 2] * b[2]
  return np.einsum("...i,...i->...", a, b)


def _pattern(kind: int, uv: np.ndarray, period: float) -> np.ndarray:
  """Pattern value in [0, 1] at surface coordinates uv (M, 2) meters."""
  s, t = uv[:, 0] / period, uv[:, 1] / period
  if kind == _CHECKER:
    return ((np.floor(s) + np.floor(t)) % 2).astype(np.float64)
  if kind == _TILES:
    grout = (s % 1.0 < 0.06) | (t % 1.0 < 0.06)
    # Per-tile brightness jitter from a cheap integer hash of the tile index.
    cell = (np.floor(s) * 73856093 + np.floor(t) * 19349663) % 1000 / 1000.0
    return np.where(grout, 0.0, 0.65 + 0.35 * cell)
  if kind == _PLANKS:
    plank = np.floor(t)
    seam = t % 1.0 < 0.05
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * (s / 3.0 + 0.4 * np.sin(1.7 * t + plank)))
    return np.where(seam, 0.0, 0.3 + 0.7 * grain)
  if kind == _STRIPES:
    return 0.5 + 0.5 * np.sin(2 * np.pi * s)
  # _PLASTER: soft blotches, three incommensurate waves.
  return 0.5 + 0.5 * (
      np.sin(2 * np.pi * (s + 0.3 * t)) * np.sin(2 * np.pi * (0.7 * t - 0.2 * s))
  ) * np.sin(2 * np.pi * 0.37 * (s + t))


def _shade(
    scene: Scene, hits: _Hits, dirs: np.ndarray, focal: float,
    noise_rng: np.random.Generator,
) -> np.ndarray:
  """Linear albedo x lighting -> sRGB uint8, for rays dirs (N, 3)."""
  ray_length = np.linalg.norm(dirs, axis=1)
  unit_dirs = dirs / ray_length[:, None]
  distance = hits.t * ray_length  # Euclidean distance camera -> surface.
  cos_view = np.abs(np.einsum("ij,ij->i", hits.normal, unit_dirs))
  # Pixel footprint on the surface (m). Patterns finer than ~2 pixels fade to
  # their mean (a cheap stand-in for mip-mapping) instead of aliasing.
  footprint = distance / (focal * np.maximum(cos_view, 0.15))

  albedo = np.zeros_like(dirs)
  for index in np.unique(hits.material):
    mask = hits.material == index
    material = scene.materials[index]
    value = _pattern(material.kind, hits.uv[mask], material.period)
    contrast = np.clip(2.0 - 4.0 * footprint[mask] / material.period, 0.0, 1.0)
    value = 0.5 + contrast * (value - 0.5)
    albedo[mask] = material.color_b + value[:, None] * (material.color_a - material.color_b)

  ceiling_light = np.maximum(0.0, -_dot(hits.normal, scene.light_direction))
  lamp = cos_view / (distance**2 + _LAMP_SOFTENING)  # lamp sits at the camera
  irradiance = _AMBIENT + _CEILING_LIGHT * ceiling_light + _LAMP_POWER * lamp
  linear = albedo * irradiance[:, None] * scene.exposure
  # Soft exposure curve instead of clipping, so a wall right in front of the
  # lamp still shows its texture.
  srgb = (1.0 - np.exp(-1.5 * linear)) ** (1 / 2.2)
  srgb = srgb + noise_rng.normal(0.0, 0.008, size=srgb.shape)  # sensor noise
  return np.clip(np.round(srgb * 255.0), 0, 255).astype(np.uint8)


def render_view(
    scene: Scene,
    pose: CameraPose,
    intrinsics: np.ndarray,
    size: tuple[int, int],
    shade: bool = True,
    noise_seed: int = 0,
) -> View:
  """Ray-casts one view of `size` (H, W) with `intrinsics` (3, 3) for that size."""
  height, width = size
  # Pixel centres at (j + 0.5, i + 0.5), see intrinsics.py.
  u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
  fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
  # Camera-frame rays with z = 1, so the hit parameter t is the z-depth.
  rays_cam = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1)
  rays_cam = rays_cam.reshape(-1, 3)
  dirs = sum(rays_cam[:, k, None] * pose.rotation[:, k] for k in range(3))  # (N, 3) world
  hits = _intersect(scene, pose.position, dirs)

  depth = hits.t.astype(np.float32)
  unit_dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
  cos_view = np.abs(np.einsum("ij,ij->i", hits.normal, unit_dirs))
  confidence = np.where(cos_view < 0.25, 1, 2).astype(np.uint8)
  out_of_range = hits.t * np.linalg.norm(dirs, axis=1) > MAX_RANGE_M
  depth[out_of_range] = 0.0
  confidence[out_of_range] = 0

  rgb = None
  if shade:
    rgb = _shade(scene, hits, dirs, float(fx), np.random.default_rng(noise_seed))
    rgb = rgb.reshape(height, width, 3)
  return View(
      rgb=rgb,
      depth=depth.reshape(size),
      confidence=confidence.reshape(size),
      surface=hits.surface.reshape(size),
  )


def render_sequence(
    seed: int,
    num_frames: int,
    image_size: tuple[int, int] = IMAGE_SIZE,
    depth_size: tuple[int, int] = DEPTH_SIZE,
    name: str | None = None,
) -> Iterator[dict[str, object]]:
  """Yields `num_frames` examples of one synthetic capture.

  Each example has the builder's feature keys, as numpy values:
    image uint8 (H, W, 3), depth float32 (Hd, Wd) meters (0 = invalid),
    confidence uint8 (Hd, Wd), intrinsics float32 (3, 3) for the image size,
    sequence str, frame int.
  Same seed -> same frames, byte for byte.
  """
  if not intrinsics_lib.same_aspect_ratio(image_size, depth_size):
    raise ValueError(f"image_size {image_size} and depth_size {depth_size} differ in aspect ratio")
  name = name or f"room_{seed}"
  scene, poses = make_scene(np.random.default_rng(seed), num_frames)
  k_image = intrinsics_lib.default_intrinsics(*image_size)
  k_depth = intrinsics_lib.scale_intrinsics(k_image, image_size, depth_size)
  for frame, pose in enumerate(poses):
    image_view = render_view(scene, pose, k_image, image_size,
                             noise_seed=seed * 100_003 + frame)
    depth_view = render_view(scene, pose, k_depth, depth_size, shade=False)
    yield frame_example(image_view.rgb, depth_view.depth, depth_view.confidence, k_image,
                        name, frame)


@dataclasses.dataclass(frozen=True)
class SequencePlan:
  name: str
  seed: int
  num_frames: int


def plan_sequences(
    num_frames: int = NUM_FRAMES,
    frames_per_sequence: int = FRAMES_PER_SEQUENCE,
    base_seed: int = RENDER_SEED,
) -> list[SequencePlan]:
  """Deterministically cuts `num_frames` into sequences of ~frames_per_sequence.

  At least 3 sequences whenever there are 3+ frames, so that every split of
  the by-sequence split is non-empty.
  """
  count = max(min(3, num_frames), round(num_frames / frames_per_sequence))
  lengths = np.full(count, num_frames // count)
  lengths[: num_frames % count] += 1
  # Vary lengths by up to ~15%: move frames within disjoint neighbour pairs
  # (keeps the total, and no length drifts by more than the jitter).
  digest = hashlib.sha256(f"{base_seed}:{num_frames}".encode()).digest()
  rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
  jitter = int(lengths.min() * 0.15)
  for i in range(0, count - 1, 2):
    delta = int(rng.integers(-jitter, jitter + 1))
    if lengths[i] + delta >= 1 and lengths[i + 1] - delta >= 1:
      lengths[i] += delta
      lengths[i + 1] -= delta
  return [
      SequencePlan(name=f"room_{i:03d}", seed=base_seed + i, num_frames=int(n))
      for i, n in enumerate(lengths)
  ]
