"""Figures shared by every notebook: slices, grids, histograms, viewers, curves, GIFs, the results table."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lib.data.transforms import oriented_slice  # noqa: F401  (re-exported: notebooks call viz.oriented_slice)


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
                "CT lung": (-600, 1500), "CT mediastinum": (50, 350)}


def _window_limits(volume: np.ndarray, name: str) -> tuple[float, float]:
    if VIEW_WINDOWS[name] is None:
        lo, hi = np.percentile(volume, (1, 99))
        return float(lo), float(hi if hi > lo else lo + 1)
    c, w = VIEW_WINDOWS[name]
    return c - w / 2, c + w / 2


def slice_viewer(volume: np.ndarray, window: str = "auto", title: str = "", overlay: np.ndarray | None = None,
                 opacity: float = 0.4):
    """Interactive viewer of a RAS ``[X, Y, Z]`` volume: axis, slice slider, window preset, and an optional
    ``overlay`` (mask or prediction of the same shape) drawn in colour with an opacity slider.

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
    if overlay is not None:
        overlay = np.asarray(overlay, np.float32)
        if overlay.shape != volume.shape:
            raise ValueError(f"slice_viewer: overlay shape {overlay.shape} differs from the volume's {volume.shape}")
    axis_w = widgets.Dropdown(options=[("axial", 2), ("coronal", 1), ("sagittal", 0)], value=2, description="axis")
    slice_w = widgets.IntSlider(value=volume.shape[2] // 2, min=0, max=volume.shape[2] - 1, description="slice",
                                continuous_update=True)
    window_w = widgets.Dropdown(options=list(VIEW_WINDOWS), value=window, description="window")
    opacity_w = widgets.FloatSlider(value=opacity, min=0.0, max=1.0, step=0.05, description="overlay",
                                    layout=widgets.Layout(display=None if overlay is not None else "none"))

    def on_axis(change):
        slice_w.max = volume.shape[change["new"]] - 1
        slice_w.value = volume.shape[change["new"]] // 2

    axis_w.observe(on_axis, names="value")

    def draw(axis, index, window_name, alpha):
        lo, hi = _window_limits(volume, window_name)
        index = min(index, volume.shape[axis] - 1)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(oriented_slice(volume, axis, index), cmap="gray", vmin=lo, vmax=hi)
        if overlay is not None and alpha > 0:
            o = oriented_slice(overlay, axis, index)
            ax.imshow(np.ma.masked_equal(o, 0), cmap="autumn", alpha=alpha, vmin=0, vmax=max(float(overlay.max()), 1e-6))
        ax.set_title(f"{title} {['sagittal', 'coronal', 'axial'][axis]} {index}", fontsize=9)
        ax.axis("off")
        plt.show()

    out = widgets.interactive_output(draw, {"axis": axis_w, "index": slice_w, "window_name": window_w, "alpha": opacity_w})
    return widgets.VBox([widgets.HBox([axis_w, slice_w, window_w, opacity_w]), out])


# --------------------------------------------------------------------------- runs and comparisons

def loss_curves(run_dirs: dict, ncols: int = 3, size: float = 3.2):
    """Training (and validation) loss of several runs on one page: ``{label: run folder}``.

    Every folder holding a ``steps.csv`` or an ``epochs.csv`` (what lib.train writes) under a run folder
    is one panel (a two-stage run such as 04_ct_diffusion has one per stage): the training loss from
    ``steps.csv`` (from ``epochs.csv`` when a short run logged no step), the validation loss from
    ``epochs.csv``.
    """
    import matplotlib.pyplot as plt
    import pandas as pd
    from pathlib import Path

    panels = []
    for label, folder in run_dirs.items():
        logs = sorted({f.parent for name in ("steps.csv", "epochs.csv") for f in Path(folder).rglob(name)})
        for stage_dir in logs:
            stage = stage_dir.relative_to(folder).as_posix()
            panels.append((label if stage == "." else f"{label} / {stage}", stage_dir / "steps.csv"))
    if not panels:
        raise ValueError("loss_curves: no steps.csv or epochs.csv under the given run folders")
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * 0.75 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, steps) in zip(axes.flat, panels):
        epochs = steps.with_name("epochs.csv")
        e = pd.read_csv(epochs) if epochs.exists() else None
        s = pd.read_csv(steps) if steps.exists() else e
        ax.plot(s["step"], s["loss"], "-" if steps.exists() else "o-", lw=1, ms=3, label="train")
        if e is not None and "val_loss" in e and e["val_loss"].notna().any() and "step" in e:
            ax.plot(e["step"], e["val_loss"], "o-", ms=3, label="val")
        ax.set_title(title, fontsize=8)
        ax.set_yscale("log" if (s["loss"] > 0).all() else "linear")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_gif(frames, path, fps: int = 4, vmin: float | None = None, vmax: float | None = None, titles=None) -> "Path":
    """An animated GIF of 2D frames (e.g. the slices of a series), written atomically."""
    from pathlib import Path

    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    from lib.atomic import atomic_path

    frames = [np.asarray(f, np.float32) for f in frames]
    if not frames:
        raise ValueError("save_gif: no frames")
    lo = float(np.min(frames)) if vmin is None else vmin
    hi = float(np.max(frames)) if vmax is None else vmax
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.axis("off")
    image = ax.imshow(frames[0], cmap="gray", vmin=lo, vmax=hi)

    def update(i):
        image.set_data(frames[i])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        return (image,)

    animation = FuncAnimation(fig, update, frames=len(frames), blit=False)
    path = Path(path)
    with atomic_path(path) as tmp:
        gif = tmp.with_name(tmp.name + ".gif")  # Pillow picks the format from the suffix
        try:
            animation.save(str(gif), writer=PillowWriter(fps=fps))
            gif.replace(tmp)
        finally:
            gif.unlink(missing_ok=True)
    plt.close(fig)
    return path


def _compare_arrays(volumes: dict, caller: str) -> dict:
    arrays = {k: np.asarray(v, np.float32) for k, v in volumes.items()}
    shapes = {a.shape for a in arrays.values()}
    if not arrays or len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"{caller} needs 3D volumes of one shape, got {[a.shape for a in arrays.values()]}")
    return arrays


def _compare_row(axes, arrays: dict, axis: int, index: int, limits: tuple[float, float]) -> None:
    """One slice of every volume side by side: grey within ``limits``; names with error/diff in magma."""
    for ax, (name, volume) in zip(axes, arrays.items()):
        is_error = "error" in name.lower() or "diff" in name.lower()
        img = oriented_slice(volume, axis, min(index, volume.shape[axis] - 1))
        ax.imshow(img, cmap="magma" if is_error else "gray", vmin=None if is_error else limits[0],
                  vmax=None if is_error else limits[1])
        ax.set_title(name, fontsize=9)
        ax.axis("off")


def compare_figure(volumes: dict, window: str = "auto", title: str = ""):
    """Static counterpart of :func:`compare_viewer` for batch runs and PNGs: the middle axial, coronal and
    sagittal slice (rows) of every volume (columns), in the window of the first volume."""
    import matplotlib.pyplot as plt

    arrays = _compare_arrays(volumes, "compare_figure")
    reference = next(iter(arrays.values()))
    limits = _window_limits(reference, window)
    fig, axes = plt.subplots(3, len(arrays), figsize=(2.6 * len(arrays), 7.8), squeeze=False)
    for row, axis in enumerate((2, 1, 0)):
        _compare_row(axes[row], arrays, axis, reference.shape[axis] // 2, limits)
        axes[row][0].text(-0.08, 0.5, ["sagittal", "coronal", "axial"][axis], transform=axes[row][0].transAxes,
                          rotation=90, va="center", ha="right", fontsize=9)
    fig.suptitle(f"{title} (middle slices, window {window})".strip(), fontsize=10)
    fig.tight_layout()
    return fig


def results_table_figure(table, columns=("family", "metric", "value", "baseline", "baseline_value", "verdict")):
    """The results table (``results/summary.csv`` with a ``verdict`` column) drawn as a figure: headline
    rows in bold, a verdict cell green when the model beats its baseline and red when it is WORSE."""
    import textwrap

    import matplotlib.pyplot as plt

    cells = [[textwrap.shorten(_cell(r[c]), 72) for c in columns] for _, r in table.iterrows()]
    fig, ax = plt.subplots(figsize=(16, 0.24 * (len(cells) + 1)))
    ax.axis("off")
    t = ax.table(cellText=cells, colLabels=list(columns), loc="upper center", cellLoc="left")
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.auto_set_column_width(list(range(len(columns))))
    for i, (_, r) in enumerate(table.iterrows(), start=1):
        if str(r.get("headline")) in ("True", "true"):
            for j in range(len(columns)):
                t[i, j].set_text_props(fontweight="bold")
        verdict = str(r.get("verdict", ""))
        if "verdict" in columns:
            j = list(columns).index("verdict")
            t[i, j].set_facecolor("#f4c7c3" if "WORSE" in verdict else "#c8e6c9" if "better" in verdict else "white")
    fig.tight_layout()
    return fig


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def compare_viewer(volumes: dict, window: str = "auto", title: str = ""):
    """Side-by-side viewer of same-shaped RAS volumes (e.g. input / target / prediction / error) with one
    shared axis, slice and window control. Returns the ipywidgets box; a batch run shows its first image."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    arrays = _compare_arrays(volumes, "compare_viewer")
    shape = next(iter(arrays.values())).shape
    axis_w = widgets.Dropdown(options=[("axial", 2), ("coronal", 1), ("sagittal", 0)], value=2, description="axis")
    slice_w = widgets.IntSlider(value=shape[2] // 2, min=0, max=shape[2] - 1, description="slice")
    window_w = widgets.Dropdown(options=list(VIEW_WINDOWS), value=window, description="window")

    def on_axis(change):
        slice_w.max = shape[change["new"]] - 1
        slice_w.value = shape[change["new"]] // 2

    axis_w.observe(on_axis, names="value")
    reference = next(iter(arrays.values()))

    def draw(axis, index, window_name):
        fig, axes = plt.subplots(1, len(arrays), figsize=(3 * len(arrays), 3), squeeze=False)
        _compare_row(axes[0], arrays, axis, index, _window_limits(reference, window_name))
        fig.suptitle(f"{title} {['sagittal', 'coronal', 'axial'][axis]} {index}", fontsize=9)
        plt.show()

    out = widgets.interactive_output(draw, {"axis": axis_w, "index": slice_w, "window_name": window_w})
    return widgets.VBox([widgets.HBox([axis_w, slice_w, window_w]), out])


def run_browser(run_dirs: dict):
    """Pick a run (``{label: folder}``) and see its figures: loss curves, samples, everything PNG.

    Returns the ipywidgets box; a batch run shows the first run's figures."""
    import ipywidgets as widgets
    from pathlib import Path

    if not run_dirs:
        raise ValueError("run_browser: no runs given")
    pick = widgets.Dropdown(options=list(run_dirs), description="run")

    def show(label):
        from IPython.display import Image, Markdown, display

        folder = Path(run_dirs[label])
        pngs = sorted(folder.rglob("*.png"))
        display(Markdown(f"**{label}**: `{folder}` ({len(pngs)} figure(s))"))
        for png in pngs:
            display(Markdown(f"`{png.relative_to(folder)}`"), Image(filename=str(png), width=520))

    out = widgets.interactive_output(show, {"label": pick})
    return widgets.VBox([pick, out])
