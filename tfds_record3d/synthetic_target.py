"""A second synthetic domain, unlike `synthetic` (the `synthetic_target` config).

A network trained on `record3d/synthetic` should meet rooms here that it has
never seen the like of, as a user's first captures of their own home would
be. What differs from the source domain (synthetic.py), and by how much:

  * layout: small furnished rooms, 2.8-4.2 x 3.2-4.8 m (source 3.5-7 x
    3.5-7 m), so depth stays within ~5 m; furniture built from parts:
    tables on four legs, open bookcases against the walls, sofas, cabinets,
    vertical cylinders (stools, pots, a pillar), a pendant lamp shade; many
    occluding edges (source: 3-6 plain boxes and 1-3 spheres on the floor).
  * materials: saturated colours from one hue scheme per room (source: near
    grey with a +-0.08 tint); bricks, wallpaper dots, diagonal stripes,
    carpet speckle, narrow planks; every wall its own material (source:
    opposite walls share one).
  * lighting: one or two warm room lamps (inverse-square point lights, no
    shadows), a cool window light from one wall, a weak camera lamp (0.35-0.7
    against the source's 1.8), so "bright means near" holds much less; a
    tinted global light; more RGB noise (sigma 0.012 against 0.008).
  * camera: held low (0.65-1.0 m against 1.1-1.6 m), nearly level (pitch
    -0.3..0.0 rad against -0.55..-0.2), walking around the room while
    looking across it with a slow pan (source: a straight walk along its
    heading, which may face a wall), more roll, and a wider
    field of view: fx = 0.60 x the long side (~80 degrees across it) against
    the iPhone wide camera's 0.755 (~67 degrees).
  * size: ~20 rooms of ~30 frames (600 frames), split by room as usual, so
    the validation and test rooms are unseen rooms.
The LiDAR-like sensor model (noise, confidence, flying pixels, range) is
the same as the source's: see synthetic.py.
"""

from __future__ import annotations

import colorsys

import numpy as np

from tfds_record3d import synthetic as base

NUM_FRAMES = 600
FRAMES_PER_SEQUENCE = 30
RENDER_SEED = 50_000  # far from the source's 1000.. so no room is shared
FOCAL_FRACTION = 0.60  # fx / long side: 2 atan(0.5 / 0.6) = 80 degrees across it
SEQUENCE_PREFIX = "home"

_MARGIN = 0.55  # m between the camera path and the walls
_CLEARANCE = 0.4  # m between furniture and the camera path
_BOARD = 0.025  # m, thickness of shelves and panels; table legs are 2 boards square


def _color(hue: float, saturation: float, value: float) -> np.ndarray:
  return np.clip(np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value)), 0.02, 0.95)


def _material(rng, kinds, period_range, hue, saturation=(0.35, 0.75), value=(0.45, 0.9)):
  """A two-tone material of one hue: the pattern's "off" colour is a darker,
  slightly shifted shade of its "on" colour."""
  sat, val = rng.uniform(*saturation), rng.uniform(*value)
  color_a = _color(hue, sat, val)
  color_b = _color(hue + rng.uniform(-0.06, 0.06), min(1.0, sat * 1.2), val * rng.uniform(0.3, 0.6))
  return base.Material(kind=int(rng.choice(kinds)), color_a=color_a, color_b=color_b,
                       period=float(rng.uniform(*period_range)))


def _against_wall(room_size, wall: int, along: float, parts):
  """World boxes from parts given as (u0, u1, y0, y1, d0, d1): u along the
  wall from `along`, d out from the wall into the room. Walls 0..3 = x-min,
  x-max, z-min, z-max."""
  boxes = []
  for u0, u1, y0, y1, d0, d1 in parts:
    u = np.array([along + u0, along + u1])
    d = np.array([d0, d1])
    if wall in (1, 3):
      d = room_size[0 if wall == 1 else 2] - d
    x, z = (d, u) if wall in (0, 1) else (u, d)
    boxes.append((np.array([x.min(), y0, z.min()]), np.array([x.max(), y1, z.max()])))
  return boxes


def _bookcase(width, height, depth, shelves):
  t = _BOARD
  parts = [(0, width, 0, height, 0, t),  # back panel
           (0, t, 0, height, 0, depth), (width - t, width, 0, height, 0, depth)]
  for k in range(shelves + 1):
    y = k * (height - t) / shelves
    parts.append((t, width - t, y, y + t, t, depth))
  return parts


def _furniture_candidates(rng, room_size):
  """Yields pieces of furniture as lists of (low, high) boxes; the caller
  rejects those in the camera's way."""
  while True:
    kind = rng.choice(["table", "bookcase", "sofa", "cabinet"], p=[0.3, 0.3, 0.2, 0.2])
    if kind == "table":
      size = np.array([rng.uniform(0.6, 1.3), rng.uniform(0.68, 0.78), rng.uniform(0.5, 0.9)])
      low = np.array([rng.uniform(0, room_size[0] - size[0]), 0.0,
                      rng.uniform(0, room_size[2] - size[2])])
      high = low + size
      leg = 2 * _BOARD
      boxes = [(np.array([low[0], high[1] - 0.04, low[2]]), high)]  # top
      for x0 in (low[0] + 0.03, high[0] - 0.03 - leg):
        for z0 in (low[2] + 0.03, high[2] - 0.03 - leg):
          boxes.append((np.array([x0, 0.0, z0]), np.array([x0 + leg, high[1] - 0.04, z0 + leg])))
      yield boxes
      continue
    wall = int(rng.integers(4))
    wall_length = room_size[2] if wall in (0, 1) else room_size[0]
    if kind == "bookcase":
      width, height, depth = rng.uniform(0.6, 1.2), rng.uniform(1.2, 2.1), rng.uniform(0.28, 0.4)
      parts = _bookcase(width, height, depth, int(rng.integers(3, 6)))
    elif kind == "sofa":
      width, depth = rng.uniform(1.2, 2.0), rng.uniform(0.7, 0.9)
      seat, back = rng.uniform(0.38, 0.48), rng.uniform(0.75, 0.9)
      parts = [(0, width, 0, seat, 0, depth), (0, width, seat, back, 0, 0.22),
               (0, 0.18, seat, seat + 0.2, 0.22, depth), (width - 0.18, width, seat, seat + 0.2, 0.22, depth)]
    else:
      width, depth = rng.uniform(0.4, 1.0), rng.uniform(0.35, 0.6)
      parts = [(0, width, 0, rng.uniform(0.5, 1.9), 0, depth)]
    if width >= wall_length:
      continue
    yield _against_wall(room_size, wall, rng.uniform(0, wall_length - width), parts)


def _trajectory(rng: np.random.Generator, room_size: np.ndarray, num_frames: int):
  """A walk around the room on an ellipse, looking across it.

  Unlike the source's walk (which can end up facing a wall at arm's length
  for a whole sequence), the camera faces the far side of the room, with a
  slow pan: every sequence sees furniture, edges and depths up to ~5 m.
  """
  centre = room_size[[0, 2]] / 2
  radii = (centre - _MARGIN) * rng.uniform(0.4, 0.9, size=2)
  angle = rng.uniform(0, 2 * np.pi)
  angular_speed = rng.choice([-1.0, 1.0]) * rng.uniform(0.01, 0.03)  # radians per frame
  height = rng.uniform(0.65, 1.0)  # held low (source: 1.1-1.6 m, +-0.05 of drift)
  pitch0 = rng.uniform(-0.3, 0.0)  # nearly level (source: -0.55..-0.2)
  pan = rng.uniform(0.2, 0.6)  # radians either side of the room's centre
  phase = rng.uniform(0, 2 * np.pi, size=4)
  poses = []
  for i in range(num_frames):
    a = angle + angular_speed * i
    xz = centre + radii * np.array([np.cos(a), np.sin(a)])
    to_centre = centre - xz
    heading = np.arctan2(to_centre[0], to_centre[1]) + pan * np.sin(0.07 * i + phase[0])
    pitch = pitch0 + 0.06 * np.sin(0.13 * i + phase[1])
    roll = 0.08 * np.sin(0.11 * i + phase[2])  # more roll than the source's 0.04
    position = np.array([xz[0], height + 0.01 * np.sin(0.2 * i + phase[3]), xz[1]])
    poses.append(base.CameraPose(base._rotation(heading, pitch, roll), position))
  return poses


def make_scene(rng: np.random.Generator, num_frames: int):
  """Draws a target-domain room and a camera trajectory that avoids the furniture."""
  room_size = np.array([rng.uniform(2.8, 4.2), rng.uniform(2.2, 2.6), rng.uniform(3.2, 4.8)])
  hue = rng.uniform()  # the room's colour scheme; furniture takes the opposite side
  materials: list[base.Material] = []

  def add(material: base.Material) -> int:
    materials.append(material)
    return len(materials) - 1

  floor = add(_material(rng, [base._PLANKS, base._SPECKLE, base._TILES], (0.05, 0.18),
                        rng.uniform(0.03, 0.12), saturation=(0.3, 0.6), value=(0.35, 0.75)))
  ceiling = add(_material(rng, [base._PLASTER, base._PLANKS], (0.15, 0.6), hue + 0.1,
                          saturation=(0.05, 0.3), value=(0.7, 0.9)))
  walls = [add(_material(rng, [base._BRICKS, base._DOTS, base._DIAGONAL, base._PLASTER],
                         (0.1, 0.35), hue + rng.uniform(-0.08, 0.08))) for _ in range(4)]
  face_materials = (walls[0], walls[1], floor, ceiling, walls[2], walls[3])

  poses = _trajectory(rng, room_size, num_frames)
  path_xz = np.array([pose.position[[0, 2]] for pose in poses])

  boxes: list[base.Box] = []
  wanted = int(rng.integers(3, 6))
  candidates = _furniture_candidates(rng, room_size)
  for _ in range(80):  # rejection sampling
    if wanted == 0:
      break
    parts = next(candidates)
    low = np.min([p[0] for p in parts], axis=0)
    high = np.max([p[1] for p in parts], axis=0)
    if not base._box_clear_of_path(low, high, path_xz, clearance=_CLEARANCE):
      continue
    if any(np.all(low[[0, 2]] < b.high[[0, 2]]) and np.all(high[[0, 2]] > b.low[[0, 2]])
           for b in boxes):
      continue  # overlaps a piece already placed
    material = add(_material(rng, [base._SPECKLE, base._PLANKS, base._DOTS, base._CHECKER],
                             (0.04, 0.2), hue + 0.5 + rng.uniform(-0.15, 0.15)))
    boxes.extend(base.Box(lo, hi, material) for lo, hi in parts)
    wanted -= 1

  cylinders: list[base.Cylinder] = []
  for attempt in range(40):
    if len(cylinders) >= 3:
      break
    pillar = attempt == 0 and rng.uniform() < 0.3
    radius = rng.uniform(0.12, 0.2) if pillar else rng.uniform(0.12, 0.25)
    top = room_size[1] if pillar else rng.uniform(0.3, 0.65)
    center = np.array([rng.uniform(radius, room_size[0] - radius),
                       rng.uniform(radius, room_size[2] - radius)])
    clear = np.linalg.norm(path_xz - center, axis=1) > radius + _CLEARANCE
    inside_box = any(np.all(center + radius > b.low[[0, 2]]) and np.all(center - radius < b.high[[0, 2]])
                     for b in boxes)
    if np.all(clear) and not inside_box:
      material = add(_material(rng, [base._STRIPES, base._SPECKLE, base._CHECKER], (0.03, 0.12),
                               hue + 0.5 + rng.uniform(-0.2, 0.2)))
      cylinders.append(base.Cylinder(center, float(radius), 0.0, float(top), material))

  # A pendant lamp shade hangs from the ceiling; the warm light sits in it.
  shade_radius = rng.uniform(0.12, 0.2)
  lamp = np.array([rng.uniform(0.8, room_size[0] - 0.8), room_size[1] - rng.uniform(0.45, 0.7),
                   rng.uniform(0.8, room_size[2] - 0.8)])
  spheres = [base.Sphere(lamp, float(shade_radius),
                         add(_material(rng, [base._STRIPES], (0.05, 0.1), rng.uniform(0.05, 0.15),
                                       saturation=(0.2, 0.5), value=(0.75, 0.9))))]
  warm = np.array([1.0, 0.78, 0.5])
  lights = [base.PointLight(lamp - np.array([0.0, shade_radius + 0.05, 0.0]),
                            warm * rng.uniform(0.8, 1.4))]
  if rng.uniform() < 0.6:  # a floor lamp in a corner
    corner = np.array([rng.choice([0.3, room_size[0] - 0.3]), 1.5,
                       rng.choice([0.3, room_size[2] - 0.3])])
    lights.append(base.PointLight(corner, warm * rng.uniform(0.5, 1.0)))
  # Daylight through a window in one wall: cool, nearly horizontal. A point
  # light 100 m away is a directional light over a room (falloff < 5%).
  window = np.array([rng.choice([-1.0, 1.0]), -0.3, rng.uniform(-0.4, 0.4)])  # travelling direction
  window /= np.linalg.norm(window)
  cool = np.array([0.7, 0.82, 1.0]) * rng.uniform(0.25, 0.45)
  lights.append(base.PointLight(room_size / 2 - 100.0 * window, cool * 100.0**2, softening=0.0))
  overhead = np.array([rng.uniform(-0.3, 0.3), -1.0, rng.uniform(-0.3, 0.3)])
  scene = base.Scene(
      room_size=room_size,
      face_materials=face_materials,
      boxes=tuple(boxes),
      spheres=tuple(spheres),
      materials=tuple(materials),
      light_direction=overhead / np.linalg.norm(overhead),
      exposure=float(rng.uniform(1.0, 1.5)),
      cylinders=tuple(cylinders),
      ambient=float(rng.uniform(0.05, 0.1)),
      ceiling_power=0.1,  # a faint overhead fill (source: 0.25)
      lamp_power=float(rng.uniform(0.35, 0.7)),
      light_color=np.clip(1.0 + rng.uniform(-0.1, 0.1, size=3), 0.8, 1.2),  # tinted
      point_lights=tuple(lights),
      sensor_noise=0.012,
  )
  return scene, poses


DOMAIN = base.Domain("target", make_scene, FOCAL_FRACTION, NUM_FRAMES, FRAMES_PER_SEQUENCE,
                     RENDER_SEED, SEQUENCE_PREFIX)
