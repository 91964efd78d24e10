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

The stored `depth` is SENSOR depth, not the exact render: `lidar_measurement`
turns the exact depth into what an iPhone LiDAR (ARKit `sceneDepth`, which
Record3D saves) delivers, with its errors, and a `confidence` map (0 low,
1 medium, 2 high) that says where it is unreliable, so that confidence
masking has something real to prove. Per pixel, with z the exact z-depth,
r the distance along the ray and theta the angle between ray and normal:
  * noise sigma(z) = 0.008 z + 0.002 z^2 m: 1.0 cm at 1 m (1%), 2.4 cm at 2 m,
    4.2 cm at 3 m, 6.4 cm at 4 m, 9 cm at 5 m (1.8%). ~1 cm near matches
    Luetzenburg et al. 2021 (Sci. Rep. 11:22221, iPhone 12 Pro: about +-1 cm
    on objects at close range); the quadratic term stands for a time-of-flight
    return whose power falls as 1/r^2 (our model, not a fit). 70% of the
    variance is smooth (a bilinear field on a 24-cell grid across the long
    side: the dense map is ARKit's interpolation of a 24x24 grid of laser
    dots, per teardowns reported by Scaniverse 2021), 30% per pixel.
  * grazing angles: sigma is multiplied by min(1 / cos(theta), 6) (the spot
    stretches along the surface); confidence 1 below cos 0.4 (theta > 66 deg),
    0 below cos 0.2 (theta > 78 deg).
  * range: Apple specifies the scanner "up to 5 meters"; confidence 1 beyond
    r = 4 m, 0 beyond 5 m where sigma also doubles (weak returns), and no
    depth at all (0 = invalid) beyond MAX_RANGE_M = 6.5 m.
  * depth discontinuities (an occluding edge: neighbours on different surfaces
    whose depths differ by > 8%): within a band of 2 pixels either side at
    256x192 (1 at small sizes) the depth is WRONG, a "flying pixel" mixed
    between the near and the far surface (near + w (far - near), w uniform in
    0.15..0.85), and confidence is 0. This is how interpolated sparse ToF
    depth looks at edges.
  * everywhere else confidence is 2.
The errors are drawn from a generator seeded by (sequence seed, frame): the
data set is deterministic for its version. `render_view` still gives the
exact depth (for tests and for anyone who wants ground truth).

Domains: `source` (this module's rooms, config `synthetic`) and `target`
(`synthetic_target.py`, config `synthetic_target`): other layouts,
materials, lighting, camera height and field of view, for measuring how a
network generalises to rooms unlike any it trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterator

import numpy as np

from tfds_record3d import intrinsics as intrinsics_lib
from tfds_record3d.frame_example import frame_example

# The seed's data: 1059 frames, portrait 3:4, depth at the LiDAR's 256x192.
NUM_FRAMES = 1059
IMAGE_SIZE = (320, 240)  # (H, W) of RGB; small so the build stays fast on 2 cores.
DEPTH_SIZE = (256, 192)  # (H, W) of depth and confidence.
FRAMES_PER_SEQUENCE = 35  # Typical sequence length (lengths vary +-15%).
FPS = 30  # `timestamp` = frame / FPS, like a Record3D capture at 30 frames per second
# Bump together with the builder VERSION whenever rendering changes.
RENDER_SEED = 1_000

# --- LiDAR-like sensor model (see the module docstring for the reasons) ---
NOISE_LINEAR = 0.008  # sigma(z) = NOISE_LINEAR * z + NOISE_QUADRATIC * z^2, meters
NOISE_QUADRATIC = 0.002
NOISE_SMOOTH_SHARE = 0.7  # share of the noise variance that is spatially smooth
NOISE_GRID_CELLS = 24  # smooth noise: cells across the long side (24x24 laser dots)
GRAZING_NOISE_CAP = 6.0  # sigma *= min(1 / cos(theta), cap)
GRAZING_MEDIUM_COS = 0.4  # cos(theta) below this: confidence 1 (theta > 66 deg)
GRAZING_LOW_COS = 0.2  # below this: confidence 0 (theta > 78 deg)
HIGH_RANGE_M = 4.0  # beyond this distance: confidence 1
LOW_RANGE_M = 5.0  # beyond: confidence 0 and noise x FAR_NOISE_FACTOR (Apple: "up to 5 m")
FAR_NOISE_FACTOR = 2.0
# Like the iPhone LiDAR, returns beyond this range are invalid (depth 0).
MAX_RANGE_M = 6.5
EDGE_JUMP = 0.08  # relative depth jump between surfaces that makes an occluding edge
EDGE_MIX = (0.15, 0.85)  # flying pixels: weight of the far surface, so always wrong

CONFIDENCE_LOW, CONFIDENCE_MEDIUM, CONFIDENCE_HIGH = 0, 1, 2

# Texture kinds. The last four are only used by the target domain.
_CHECKER, _TILES, _PLANKS, _STRIPES, _PLASTER, _BRICKS, _SPECKLE, _DOTS, _DIAGONAL = range(9)

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
class Cylinder:
  """Vertical cylinder (stools, pots, pillars) with flat caps."""
  center_xz: np.ndarray  # (2,) axis position on the floor plane
  radius: float
  y_low: float
  y_high: float
  material: int


@dataclasses.dataclass(frozen=True)
class PointLight:
  position: np.ndarray  # (3,) world
  color: np.ndarray  # (3,) linear RGB power; irradiance at d m is color * cos / (d^2 + softening)
  softening: float = 0.2


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
  # The fields below default to the source domain's lighting.
  cylinders: tuple[Cylinder, ...] = ()
  ambient: float = _AMBIENT
  ceiling_power: float = _CEILING_LIGHT
  lamp_power: float = _LAMP_POWER
  # Colour of ambient + ceiling + camera lamp; None = white (and the exact
  # arithmetic of the source renders, which stay byte-identical).
  light_color: np.ndarray | None = None
  point_lights: tuple[PointLight, ...] = ()
  sensor_noise: float = 0.008  # RGB noise sigma in [0, 1] sRGB


@dataclasses.dataclass(frozen=True)
class CameraPose:
  rotation: np.ndarray  # (3, 3) camera-to-world; columns = camera x, y, z axes.
  position: np.ndarray  # (3,) camera centre in world coordinates.


@dataclasses.dataclass(frozen=True)
class View:
  """One rendered view; all arrays have the render size (H, W)."""
  rgb: np.ndarray | None  # uint8 (H, W, 3), None if not shaded.
  depth: np.ndarray  # float32 (H, W) EXACT z-depth in meters, at any range.
  distance: np.ndarray  # float32 (H, W) distance camera -> surface along the ray.
  cos_view: np.ndarray  # float32 (H, W) |cos| of the angle between ray and normal.
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

  # Vertical cylinders: side (a circle in x-z) within [y_low, y_high], and caps.
  first_cylinder = first_sphere + len(scene.spheres)
  a_xz = dirs[:, 0] * dirs[:, 0] + dirs[:, 2] * dirs[:, 2]
  for j, cylinder in enumerate(scene.cylinders):
    ox, oz = origin[0] - cylinder.center_xz[0], origin[2] - cylinder.center_xz[1]
    b = 2.0 * (dirs[:, 0] * ox + dirs[:, 2] * oz)
    c = ox * ox + oz * oz - cylinder.radius**2
    with np.errstate(divide="ignore", invalid="ignore"):
      t = (-b - np.sqrt(b * b - 4 * a_xz * c)) / (2 * a_xz)
      y = origin[1] + t * dirs[:, 1]
      t[~((t > 1e-6) & (y >= cylinder.y_low) & (y <= cylinder.y_high))] = np.inf
      for cap in (cylinder.y_low, cylinder.y_high):
        t_cap = (cap - origin[1]) * inv[:, 1]
        px, pz = ox + t_cap * dirs[:, 0], oz + t_cap * dirs[:, 2]
        on_cap = (t_cap > 1e-6) & (px * px + pz * pz <= cylinder.radius**2) & (t_cap < t)
        np.copyto(t, t_cap, where=on_cap)
    keep_closer(t, first_cylinder + j)

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
    elif surface_id < first_cylinder:
      sphere = scene.spheres[surface_id - first_sphere]
      normal[idx] = (p - sphere.center) / sphere.radius
      # uv: arc length around the vertical axis, and height.
      uv[idx, 0] = np.arctan2(normal[idx, 2], normal[idx, 0]) * sphere.radius
      uv[idx, 1] = p[:, 1]
      material[idx] = sphere.material
    else:
      cylinder = scene.cylinders[surface_id - first_cylinder]
      radial = p[:, [0, 2]] - cylinder.center_xz
      off_side = np.abs(np.linalg.norm(radial, axis=1) - cylinder.radius)
      off_cap = np.minimum(np.abs(p[:, 1] - cylinder.y_low), np.abs(p[:, 1] - cylinder.y_high))
      side = off_side <= off_cap  # the nearer of the side and the cap planes
      cap_sign = np.where(p[:, 1] > 0.5 * (cylinder.y_low + cylinder.y_high), 1.0, -1.0)
      normal[idx, 0] = np.where(side, radial[:, 0] / cylinder.radius, 0.0)
      normal[idx, 1] = np.where(side, 0.0, cap_sign)
      normal[idx, 2] = np.where(side, radial[:, 1] / cylinder.radius, 0.0)
      arc = np.arctan2(radial[:, 1], radial[:, 0]) * cylinder.radius
      uv[idx, 0] = np.where(side, arc, p[:, 0])
      uv[idx, 1] = np.where(side, p[:, 1], p[:, 2])
      material[idx] = cylinder.material
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
  if kind == _BRICKS:  # period = brick length; rows a third of it, every other row offset
    row_t = 3.0 * t
    row = np.floor(row_t)
    s_row = s + 0.5 * (row % 2)
    mortar = (row_t % 1.0 < 0.12) | (s_row % 1.0 < 0.04)
    cell = (np.floor(s_row) * 73856093 + row * 19349663) % 1000 / 1000.0
    return np.where(mortar, 1.0, 0.15 + 0.45 * cell)
  if kind == _SPECKLE:  # carpet / terrazzo: random value per cell of size `period`
    return (np.floor(s) * 73856093 + np.floor(t) * 19349663 + 7) % 997 / 996.0
  if kind == _DOTS:  # wallpaper polka dots
    return (np.hypot(s % 1.0 - 0.5, t % 1.0 - 0.5) < 0.28).astype(np.float64)
  if kind == _DIAGONAL:
    return ((s + t) % 1.0 < 0.5).astype(np.float64)
  # _PLASTER: soft blotches, three incommensurate waves.
  return 0.5 + 0.5 * (
      np.sin(2 * np.pi * (s + 0.3 * t)) * np.sin(2 * np.pi * (0.7 * t - 0.2 * s))
  ) * np.sin(2 * np.pi * 0.37 * (s + t))


def _shade(
    scene: Scene, hits: _Hits, origin: np.ndarray, dirs: np.ndarray, focal: float,
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
  irradiance = scene.ambient + scene.ceiling_power * ceiling_light + scene.lamp_power * lamp
  irradiance = irradiance[:, None]
  if scene.light_color is not None:
    irradiance = irradiance * scene.light_color
  if scene.point_lights:  # room lamps: inverse-square, no shadows
    points = origin + hits.t[:, None] * dirs
    for light in scene.point_lights:
      to_light = light.position - points
      squared = _dot(to_light, to_light)
      facing = np.maximum(0.0, _dot(hits.normal, to_light)) / np.sqrt(squared)
      irradiance = irradiance + (facing / (squared + light.softening))[:, None] * light.color
  linear = albedo * irradiance * scene.exposure
  # Soft exposure curve instead of clipping, so a wall right in front of the
  # lamp still shows its texture.
  srgb = (1.0 - np.exp(-1.5 * linear)) ** (1 / 2.2)
  srgb = srgb + noise_rng.normal(0.0, scene.sensor_noise, size=srgb.shape)  # sensor noise
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

  ray_length = np.linalg.norm(dirs, axis=1)
  cos_view = np.abs(_dot(hits.normal, dirs)) / ray_length
  rgb = None
  if shade:
    rgb = _shade(scene, hits, pose.position, dirs, float(fx),
                 np.random.default_rng(noise_seed))
    rgb = rgb.reshape(height, width, 3)
  return View(
      rgb=rgb,
      depth=hits.t.astype(np.float32).reshape(size),
      distance=(hits.t * ray_length).astype(np.float32).reshape(size),
      cos_view=cos_view.astype(np.float32).reshape(size),
      surface=hits.surface.reshape(size),
  )


# --- LiDAR-like sensor model ----------------------------------------------

def noise_sigma(depth: np.ndarray) -> np.ndarray:
  """Depth noise std (m) of a fronto-parallel surface in range, at z-depth (m)."""
  depth = np.asarray(depth, np.float64)
  return NOISE_LINEAR * depth + NOISE_QUADRATIC * depth**2


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
  """Unit-variance noise, bilinear between N(0, 1) values on a coarse grid
  (NOISE_GRID_CELLS cells across the long side): the correlated error of a
  depth map interpolated from a sparse dot pattern."""
  height, width = size
  cell = max(height, width) / NOISE_GRID_CELLS
  grid = rng.standard_normal((int(np.ceil(height / cell)) + 1, int(np.ceil(width / cell)) + 1))
  y, x = (np.arange(height) + 0.5) / cell, (np.arange(width) + 0.5) / cell
  y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
  fy, fx = (y - y0)[:, None], (x - x0)[None, :]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  value = top * (1 - fy) + bottom * fy
  # A blend of independent unit normals has variance sum(weight^2): undo it,
  # so that sigma means the same at grid points and between them.
  variance = ((1 - fy) ** 2 + fy**2) * ((1 - fx) ** 2 + fx**2)
  return value / np.sqrt(variance)


def _window_extremes(values: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
  """(min, max) over a (2 radius + 1)^2 window, edges replicated; separable."""
  lows, highs = values, values
  for axis in (0, 1):
    n = values.shape[axis]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded_lows, padded_highs = np.pad(lows, pad, mode="edge"), np.pad(highs, pad, mode="edge")
    window = lambda k: (slice(k, k + n), slice(None)) if axis == 0 else (slice(None), slice(k, k + n))
    lows, highs = padded_lows[window(0)].copy(), padded_highs[window(0)].copy()
    for k in range(1, 2 * radius + 1):
      np.minimum(lows, padded_lows[window(k)], out=lows)
      np.maximum(highs, padded_highs[window(k)], out=highs)
  return lows, highs


def occluding_edges(depth: np.ndarray, surface: np.ndarray) -> np.ndarray:
  """bool (H, W): a 3x3 neighbour lies on another surface, EDGE_JUMP farther or nearer.

  Surface labels keep smooth surfaces seen at a grazing angle (whose depth
  changes fast from pixel to pixel) and concave corners out.
  """
  edges = np.zeros(depth.shape, bool)
  # Four neighbour directions; each pair of pixels is compared once and both
  # ends are marked (the other four directions are the same pairs).
  for a, b in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
               ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
               ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),
               ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1)))):
    jump = np.abs(depth[a] - depth[b]) > EDGE_JUMP * np.minimum(depth[a], depth[b])
    jump &= surface[a] != surface[b]
    edges[a] |= jump
    edges[b] |= jump
  return edges


def edge_band_radius(size: tuple[int, int]) -> int:
  """Half-width (pixels) of the flying-pixel band: 2 at the LiDAR's 256x192."""
  return max(1, round(max(size) / 128))


def lidar_measurement(view: View, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Exact depth -> (sensor depth float32 m, 0 = invalid; confidence uint8 0/1/2).

  The model, its numbers and their reasons are in the module docstring.
  """
  depth = view.depth.astype(np.float64)
  distance, cos_view = view.distance, view.cos_view
  sigma = noise_sigma(depth) * np.minimum(1.0 / np.maximum(cos_view, 1e-3), GRAZING_NOISE_CAP)
  sigma = np.where(distance > LOW_RANGE_M, FAR_NOISE_FACTOR * sigma, sigma)
  noise = (np.sqrt(NOISE_SMOOTH_SHARE) * _smooth_noise(rng, depth.shape)
           + np.sqrt(1 - NOISE_SMOOTH_SHARE) * rng.standard_normal(depth.shape))
  sensor = depth + sigma * noise

  radius = edge_band_radius(depth.shape)
  band = occluding_edges(depth, view.surface)
  if radius > 1:  # the 3x3 test marks one pixel either side; widen to `radius`
    band = _window_extremes(band, radius - 1)[1]
  near, far = _window_extremes(depth, radius)
  mix = rng.uniform(*EDGE_MIX, size=depth.shape)
  sensor = np.where(band, near + mix * (far - near), sensor)

  confidence = np.full(depth.shape, CONFIDENCE_HIGH, np.uint8)
  confidence[(distance > HIGH_RANGE_M) | (cos_view < GRAZING_MEDIUM_COS)] = CONFIDENCE_MEDIUM
  confidence[(distance > LOW_RANGE_M) | (cos_view < GRAZING_LOW_COS) | band] = CONFIDENCE_LOW
  invalid = distance > MAX_RANGE_M
  sensor = np.maximum(sensor, 0.05)  # ToF never reports a negative or zero range
  sensor[invalid] = 0.0
  confidence[invalid] = CONFIDENCE_LOW
  return sensor.astype(np.float32), confidence


@dataclasses.dataclass(frozen=True)
class Domain:
  """One family of synthetic rooms: how scenes are drawn and how many frames."""
  name: str  # "source" | "target"
  make_scene: Callable[[np.random.Generator, int], tuple[Scene, list[CameraPose]]]
  focal_fraction: float  # fx = fy = focal_fraction * long side of the image
  num_frames: int
  frames_per_sequence: int
  base_seed: int
  sequence_prefix: str


def domain(name: str) -> Domain:
  """The `source` (config `synthetic`) or `target` (config `synthetic_target`) domain."""
  if name == "source":
    return Domain("source", make_scene, intrinsics_lib.DEFAULT_FOCAL_FRACTION, NUM_FRAMES,
                  FRAMES_PER_SEQUENCE, RENDER_SEED, "room")
  if name == "target":
    from tfds_record3d import synthetic_target  # imports this module: import late
    return synthetic_target.DOMAIN
  raise ValueError(f"unknown synthetic domain {name!r}: 'source' or 'target'")


def _intrinsics(size: tuple[int, int], focal_fraction: float) -> np.ndarray:
  """Pinhole K for `size` (H, W): square pixels, principal point at the centre."""
  if focal_fraction == intrinsics_lib.DEFAULT_FOCAL_FRACTION:
    return intrinsics_lib.default_intrinsics(*size)
  focal = focal_fraction * max(size)
  return np.array([[focal, 0.0, size[1] / 2.0], [0.0, focal, size[0] / 2.0], [0.0, 0.0, 1.0]],
                  np.float32)


def render_sequence(
    seed: int,
    num_frames: int,
    image_size: tuple[int, int] = IMAGE_SIZE,
    depth_size: tuple[int, int] = DEPTH_SIZE,
    name: str | None = None,
    domain_name: str = "source",
) -> Iterator[dict[str, object]]:
  """Yields `num_frames` examples of one synthetic capture.

  Each example has the builder's feature keys, as numpy values:
    image uint8 (H, W, 3), depth float32 (Hd, Wd) SENSOR depth in meters
    (0 = invalid; see `lidar_measurement`), confidence uint8 (Hd, Wd),
    intrinsics float32 (3, 3) for the image size, sequence str, frame int.
  Same seed and domain -> same frames, byte for byte.
  """
  if not intrinsics_lib.same_aspect_ratio(image_size, depth_size):
    raise ValueError(f"image_size {image_size} and depth_size {depth_size} differ in aspect ratio")
  spec = domain(domain_name)
  name = name or f"{spec.sequence_prefix}_{seed}"
  scene, poses = spec.make_scene(np.random.default_rng(seed), num_frames)
  k_image = _intrinsics(image_size, spec.focal_fraction)
  k_depth = intrinsics_lib.scale_intrinsics(k_image, image_size, depth_size)
  for frame, pose in enumerate(poses):
    image_view = render_view(scene, pose, k_image, image_size,
                             noise_seed=seed * 100_003 + frame)
    depth_view = render_view(scene, pose, k_depth, depth_size, shade=False)
    # Its own stream per frame (not the RGB noise's): frames can be rendered
    # in any order, or alone, and come out the same.
    depth, confidence = lidar_measurement(depth_view, np.random.default_rng((seed, frame, 3)))
    yield frame_example(image_view.rgb, depth, confidence, k_image, name, frame,
                        timestamp=frame / FPS, pose=opengl_pose(pose), camera="lidar")


def opengl_pose(pose: CameraPose) -> np.ndarray:
  """4x4 float32 camera-to-world with OpenGL camera axes (x right, y up, z
  back), as Record3D stores poses; ours are OpenCV (y down, z forward)."""
  matrix = np.eye(4, dtype=np.float32)
  matrix[:3, :3] = pose.rotation * np.array([1.0, -1.0, -1.0])  # flip camera y and z
  matrix[:3, 3] = pose.position
  return matrix


@dataclasses.dataclass(frozen=True)
class SequencePlan:
  name: str
  seed: int
  num_frames: int
  domain: str = "source"


def plan_sequences(
    num_frames: int | None = None,
    frames_per_sequence: int | None = None,
    base_seed: int | None = None,
    domain_name: str = "source",
) -> list[SequencePlan]:
  """Deterministically cuts `num_frames` into sequences of ~frames_per_sequence.

  None takes the domain's value (source: 1059 frames, ~35 per sequence,
  seeds from 1000, names room_000...; target: see synthetic_target.py).
  At least 3 sequences whenever there are 3+ frames, so that every split of
  the by-sequence split is non-empty.
  """
  spec = domain(domain_name)
  num_frames = spec.num_frames if num_frames is None else num_frames
  frames_per_sequence = frames_per_sequence or spec.frames_per_sequence
  base_seed = spec.base_seed if base_seed is None else base_seed
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
      SequencePlan(name=f"{spec.sequence_prefix}_{i:03d}", seed=base_seed + i,
                   num_frames=int(n), domain=spec.name)
      for i, n in enumerate(lengths)
  ]
