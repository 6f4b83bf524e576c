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
