"""The matplotlib figures: `comparison.png` of the `--stage=all` report, and
`errors_by_depth.png` and `worst.png` of `python -m trainer.evaluate`.

Depth is drawn with one colour scale per row (the ground truth's,
`depth_ops.depth_range`) on `depth_colour_map` (turbo, black where there is no
ground truth), with a colour bar in meters. `save_figure` writes a PNG to any
tf.io.gfile path.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import matplotlib
matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from trainer import depth_ops
from trainer import metrics as metrics_lib

if TYPE_CHECKING:
  from trainer.config import Config

FIGURE_TILE_INCHES = 2.2  # width of one image column


def depth_colour_map():
  """The colour map of depth images: turbo (near = blue), NaN (no ground truth) black."""
  return matplotlib.colormaps["turbo"].with_extremes(bad="black")


def _no_ticks(axes) -> None:
  for axis in axes:
    axis.set_xticks([])
    axis.set_yticks([])


def comparison_figure(samples: Dict[str, dict], config: Config, path: str) -> None:
  """Writes the comparison PNG: rows of RGB | ground truth | one column per stage.

  `samples`: {stage: {"image" [N,H,W,3] in [0,1], "depth" [N,H,W,1] m,
  "prediction" [N,H,W,1] m}} with the same N test images for every stage.
  """
  stages = list(samples)
  first = samples[stages[0]]
  count = len(first["image"])
  height, width = first["image"].shape[1:3]
  columns = 2 + len(stages)
  figure, axes = plt.subplots(
      count, columns, squeeze=False, constrained_layout=True,
      figsize=(FIGURE_TILE_INCHES * columns + 0.8,
               FIGURE_TILE_INCHES * height / width * count + 0.6))
  cmap = depth_colour_map()
  for i in range(count):
    truth = first["depth"][i][..., 0]
    vmin, vmax = depth_ops.depth_range(truth)  # one scale per row: the ground truth's
    row = axes[i]
    row[0].imshow(first["image"][i])
    row[0].set_title("RGB" if i == 0 else "")
    shown = row[1].imshow(np.where(truth > 0, truth, np.nan), cmap=cmap, vmin=vmin, vmax=vmax)
    row[1].set_title("ground truth" if i == 0 else "")
    for column, stage in enumerate(stages, start=2):
      prediction = samples[stage]["prediction"][i]
      abs_rel = float(metrics_lib.depth_metrics(
          truth[None], prediction[None, ..., 0], config.min_depth, config.max_depth
      )["abs_rel"][0])
      row[column].imshow(prediction[..., 0], cmap=cmap, vmin=vmin, vmax=vmax)
      row[column].set_title(f"{stage} ({config.architecture})\nabs_rel {abs_rel:.3f}",
                            fontsize=9)
    _no_ticks(row)
    # Arrows: predictions beyond the ground truth's range are drawn at its ends.
    figure.colorbar(shown, ax=list(row), shrink=0.9, extend="both", label="depth (m)")
  figure.suptitle(f"{config.dataset}, split {config.eval_split}: {count} images at "
                  f"{height}x{width} (black: no ground truth)")
  save_figure(figure, path)


def save_figure(figure, path: str) -> None:
  """PNG at 100 dpi to any tf.io.gfile path (gs:// too); closes the figure."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100)
  plt.close(figure)
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buffer.getvalue())


def errors_by_depth_figure(errors: Optional[dict], edges: np.ndarray, name: str,
                           num_images: int, path: str) -> None:
  """abs_rel and rmse against ground-truth distance, metric and median-scaled, and
  the share of pixels per bin. errors: export_eval.depth_bin_errors (arrays [K] per
  bin of `edges` [K+1] m), None when no pixel was valid."""
  figure, axes = plt.subplots(3, 1, sharex=True, figsize=(7.5, 8.0), constrained_layout=True,
                              gridspec_kw={"height_ratios": [3, 3, 1.6]})
  width = float(edges[1] - edges[0])
  figure.suptitle(f"{name}: errors by ground-truth distance\n({num_images} images, pixels "
                  f"pooled in {width:.2g} m bins)")
  if errors is None or not np.any(errors["count"] > 0):
    for axis in axes:
      axis.text(0.5, 0.5, "no valid ground truth", ha="center", va="center",
                transform=axis.transAxes)
    save_figure(figure, path)
    return
  used = errors["count"] > 0
  centres = (0.5 * (edges[:-1] + edges[1:]))[used]
  for axis, metric, label in ((axes[0], "abs_rel", "abs_rel (|p - g| / g)"),
                              (axes[1], "rmse", "rmse (m)")):
    axis.plot(centres, errors[metric][used], "o-", label="metric depth")
    axis.plot(centres, errors[f"scaled_{metric}"][used], "s--",
              label="median-scaled per image")
    axis.set_ylabel(label)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend()
  axes[0].set_title("relative error")
  axes[1].set_title("root mean squared error")
  share = 100.0 * errors["count"][used] / errors["count"].sum()
  axes[2].bar(centres, share, width=0.9 * width, color="grey")
  axes[2].set_ylabel("pixels (%)")
  axes[2].set_title("valid ground-truth pixels per bin")
  axes[2].set_xlabel("ground-truth depth (m)")
  axes[2].grid(alpha=0.3)
  save_figure(figure, path)


def extremes_figure(worst: Sequence[dict], best: Sequence[dict], title: str, path: str) -> None:
  """Rows of RGB | ground truth | prediction | error map for the worst then the best
  images by abs_rel. Each item: {"rgb" uint8 [H,W,3], "truth" [h,w] m (0: invalid),
  "prediction" [h,w] m, "sequence", "frame", "values": the image's metrics}."""
  rows = [("worst", i, item) for i, item in enumerate(worst, 1)] + \
         [("best", i, item) for i, item in enumerate(best, 1)]
  if not rows:
    figure = plt.figure(figsize=(6, 2))
    figure.text(0.5, 0.5, f"{title}: no image with valid ground truth", ha="center")
    save_figure(figure, path)
    return
  height, width = rows[0][2]["truth"].shape
  figure, axes = plt.subplots(
      len(rows), 4, squeeze=False, constrained_layout=True,
      figsize=(4 * FIGURE_TILE_INCHES + 1.6, FIGURE_TILE_INCHES * height / width * len(rows) + 0.8))
  depth_cmap = depth_colour_map()
  error_cmap = matplotlib.colormaps["magma"].with_extremes(bad="black")
  for row, (kind, rank, item) in zip(axes, rows):
    truth, prediction = item["truth"], item["prediction"]
    valid = np.isfinite(truth) & (truth > 0)
    vmin, vmax = depth_ops.depth_range(truth)  # one scale per row: the ground truth's
    error = np.where(valid, np.abs(prediction - truth), np.nan)
    values = item["values"]
    row[0].imshow(item["rgb"])
    row[0].set_ylabel(f"{kind} {rank}\n{item['sequence']} #{item['frame']}", fontsize=9)
    shown = row[1].imshow(np.where(valid, truth, np.nan), cmap=depth_cmap, vmin=vmin, vmax=vmax)
    row[2].imshow(prediction, cmap=depth_cmap, vmin=vmin, vmax=vmax)
    row[2].set_title(f"abs_rel {values['abs_rel']:.3f}, rmse {values['rmse']:.3f} m\n"
                     f"median-scaled abs_rel {values['median_scaled/abs_rel']:.3f}", fontsize=8)
    errors_shown = row[3].imshow(error, cmap=error_cmap, vmin=0.0,
                                 vmax=max(float(np.nanmax(error)), 1e-3))
    _no_ticks(row)
    figure.colorbar(shown, ax=[row[1], row[2]], shrink=0.9, extend="both", label="depth (m)")
    figure.colorbar(errors_shown, ax=row[3], shrink=0.9, label="|prediction - truth| (m)")
  for axis, label in zip(axes[0], ("RGB", "ground truth", "prediction", "error")):
    axis.set_title(f"{label}\n{axis.get_title()}" if axis.get_title() else label, fontsize=9)
  # On two lines: the model path and dataset alone can be wider than the figure.
  figure.suptitle(f"{title}:\nworst and best images by abs_rel (black: no ground truth)")
  save_figure(figure, path)
