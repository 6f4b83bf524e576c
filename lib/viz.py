"""Figures. Every figure a notebook shows is also saved as PNG in its run folder (Run.save_figure)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def slice_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 4,
               percentiles: tuple[float, float] = (1.0, 99.0), size: float = 3.0):
    """A grid of 2D images, each contrast-stretched to its own percentiles. Returns the figure."""
    import matplotlib.pyplot as plt

    if len(images) == 0:
        raise ValueError("slice_grid: no images given")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, img) in enumerate(zip(axes.flat, images)):
        lo, hi = np.percentile(img, percentiles)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def dataset_bars(summary):
    """Files per dataset: expected (or listed) by the manifest against present on this machine."""
    import matplotlib.pyplot as plt

    names = list(summary["dataset"])
    expected = [max(int(e) if e == e and e is not None else 0, int(n))  # e == e: not NaN
                for e, n in zip(summary["expected_files"], summary["listed_files"])]
    present = [int(p) for p in summary["present_files"]]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2))
    for offset, values, label, color in ((-0.2, expected, "expected / listed", "0.65"),
                                         (0.2, present, "present here", "tab:blue")):
        ax.barh(y + offset, values, height=0.4, label=label, color=color)
        for yi, v in zip(y + offset, values):
            text = f"{v:,}" if v or label == "present here" else "count unknown"
            ax.text(max(v, 1) * 1.15, yi, text, va="center", fontsize=7)
    ax.set_yticks(y, names)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(expected + present + [10]) * 8)
    ax.set_xlabel("files (symmetric log scale)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def histograms(samples: dict, bins: int = 80, ncols: int = 4, size: float = 3.0):
    """One intensity histogram per label (``{label: array}``, log counts). Returns the figure."""
    import matplotlib.pyplot as plt

    if not samples:
        raise ValueError("histograms: no samples given")
    ncols = min(ncols, len(samples))
    nrows = -(-len(samples) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * 0.8 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, values) in zip(axes.flat, samples.items()):
        ax.axis("on")
        ax.hist(np.asarray(values).ravel(), bins=bins, color="tab:blue", log=True)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


# Display windows (centre, width): CT in HU; "auto" stretches the 1st–99th percentiles (MRI).
VIEW_WINDOWS = {"auto": None, "CT brain": (40, 80), "CT blood": (80, 200), "CT bone": (600, 2800),
                "CT lung": (-600, 1500)}


def _window_limits(volume: np.ndarray, name: str) -> tuple[float, float]:
    if VIEW_WINDOWS[name] is None:
        lo, hi = np.percentile(volume, (1, 99))
        return float(lo), float(hi if hi > lo else lo + 1)
    c, w = VIEW_WINDOWS[name]
    return c - w / 2, c + w / 2


def oriented_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2D view of a RAS ``[X, Y, Z]`` volume in radiological display (patient right on the left):
    axis 2 axial (anterior up), 1 coronal and 0 sagittal (superior up)."""
    if axis == 2:
        return volume[::-1, ::-1, index].T
    if axis == 1:
        return volume[::-1, index, ::-1].T
    return volume[index, ::-1, ::-1].T


def slice_viewer(volume: np.ndarray, window: str = "auto", title: str = ""):
    """Interactive viewer of a RAS ``[X, Y, Z]`` volume: axis, slice slider and window preset.

    Returns the ipywidgets box (display it, or let the cell show it). In a batch run the box renders
    its initial image as a static figure, so nothing breaks without a live frontend.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ValueError(f"slice_viewer needs a 3D [X, Y, Z] volume, got shape {volume.shape}")
    if window not in VIEW_WINDOWS:
        raise ValueError(f"unknown window {window!r}; valid windows: {', '.join(VIEW_WINDOWS)}")
    axis_w = widgets.Dropdown(options=[("axial", 2), ("coronal", 1), ("sagittal", 0)], value=2, description="axis")
    slice_w = widgets.IntSlider(value=volume.shape[2] // 2, min=0, max=volume.shape[2] - 1, description="slice",
                                continuous_update=True)
    window_w = widgets.Dropdown(options=list(VIEW_WINDOWS), value=window, description="window")

    def on_axis(change):
        slice_w.max = volume.shape[change["new"]] - 1
        slice_w.value = volume.shape[change["new"]] // 2

    axis_w.observe(on_axis, names="value")

    def draw(axis, index, window_name):
        lo, hi = _window_limits(volume, window_name)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(oriented_slice(volume, axis, min(index, volume.shape[axis] - 1)), cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"{title} {['sagittal', 'coronal', 'axial'][axis]} {index}", fontsize=9)
        ax.axis("off")
        plt.show()

    out = widgets.interactive_output(draw, {"axis": axis_w, "index": slice_w, "window_name": window_w})
    return widgets.VBox([widgets.HBox([axis_w, slice_w, window_w]), out])
