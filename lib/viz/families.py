"""Figures of the model families (one function per figure a training notebook shows and saves)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lib.viz.core import oriented_slice, slice_grid  # noqa: F401


def xray_to_ct_reconstruction(test: dict, per_patient, angles: Sequence[float], hu_scale: float, i: int = 0,
                              baseline: str = "mean training volume", error_max_hu: float = 300.0):
    """06_xray_to_ct's figure for test patient ``i``: row 1 the radiographs the model saw (``test["views"]``
    at ``angles``); rows 2-4 the predicted, target and absolute-error volumes (``test["pred"]``,
    ``test["ct"]`` on the [0, 1] scale, ``hu_scale`` HU per unit) in axial, coronal and sagittal slices
    through the centre (radiological display). The title quotes the patient's PSNR and SSIM and the PSNR of
    ``baseline`` from ``per_patient`` (columns subject, method, psnr, ssim)."""
    import matplotlib.pyplot as plt

    volumes = {"predicted": test["pred"][i, 0], "target": test["ct"][i, 0]}
    volumes["|error| (HU)"] = (volumes["predicted"] - volumes["target"]).abs() * hu_scale
    cols = max(3, len(angles))
    fig, axes = plt.subplots(4, cols, figsize=(2.6 * cols, 10.4), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for v, angle in enumerate(angles):
        axes[0, v].imshow(test["views"][i, v, 0], cmap="gray")
        axes[0, v].set_title(f"X-ray {angle:g}°", fontsize=9)
    d = volumes["target"].shape[-1] // 2
    for row, (name, vol) in enumerate(volumes.items(), start=1):
        error = name.startswith("|")
        for col, (axis, plane) in enumerate(((2, "axial"), (1, "coronal"), (0, "sagittal"))):
            img = axes[row, col].imshow(oriented_slice(vol.numpy(), axis, d), cmap="magma" if error else "gray",
                                        vmin=0, vmax=error_max_hu if error else 1)
            axes[row, col].set_title(f"{name} {plane}", fontsize=9)
        if error:
            fig.colorbar(img, ax=axes[row, col], shrink=0.8)
    subject = test["subject"][i]
    scores = per_patient[per_patient["subject"] == subject].set_index("method")
    fig.suptitle(f"{subject}: PSNR {scores.loc['model', 'psnr']:.2f} dB, SSIM {scores.loc['model', 'ssim']:.3f} "
                 f"(mean volume: {scores.loc[baseline, 'psnr']:.2f} dB)", fontsize=10)
    return fig


def cxr_masked_reconstruction(panels: dict):
    """05_cxr_change's masked-reconstruction figure: one row of ``{title: [1, 1, S, S]}`` images (a radiograph,
    its mask, what the encoder saw, the reconstruction), on the first image's grey scale."""
    import matplotlib.pyplot as plt

    vmax = float(next(iter(panels.values())).max())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.5 * len(panels), 2.8))
    for ax, (name, img) in zip(axes, panels.items()):
        ax.imshow(img[0, 0].cpu(), cmap="gray", vmin=0, vmax=vmax)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    return fig


def cxr_change_pairs(test: dict, signed: dict, thresholds, pairs: int = 4):
    """05_cxr_change's test pairs: ``pairs - 1`` pairs with change and one nuisance-only pair, each as baseline,
    follow-up, then the follow-up overlaid with the true change (scaled to its largest value) and the
    ``model`` and ``subtraction`` maps of ``signed`` where they pass ``thresholds[name]`` (red = appeared, blue =
    resolved); the black outline is the true changed region. ``test``: the family's ``predict`` output."""
    import matplotlib.pyplot as plt

    changed = [i for i in range(len(test["pair"])) if (test["change"][i] != 0).any()]
    quiet = [i for i in range(len(test["pair"])) if test["nuisance_only"][i]]
    show = changed[: max(1, pairs - 1)] + quiet[:1]
    fig, axes = plt.subplots(len(show), 5, figsize=(13, 2.8 * len(show)), squeeze=False)
    for row, i in zip(axes, show):
        true = test["change"][i, 0]
        maps = [("true change", true / max(float(true.abs().max()), 1e-6), 0.0),
                ("model", signed["model"][i, 0], thresholds["model"]),
                ("subtraction", signed["subtraction"][i, 0], thresholds["subtraction"])]
        row[0].imshow(test["baseline"][i, 0], cmap="gray")
        row[0].set_title(f"{test['pair'][i]} baseline", fontsize=8)
        row[1].imshow(test["followup"][i, 0], cmap="gray")
        row[1].set_title("follow-up", fontsize=8)
        for ax, (name, change, threshold) in zip(row[2:], maps):
            limit = float(change.abs().max()) or 1.0
            ax.imshow(test["followup"][i, 0], cmap="gray")
            ax.imshow(np.ma.masked_where(change.abs() <= threshold, change), cmap="bwr", vmin=-limit, vmax=limit,
                      alpha=0.7)
            if (true != 0).any():
                ax.contour(true != 0, levels=[0.5], colors="k", linewidths=0.7)
            ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def cxr_real_radiograph(xr, change, name: str = "RG1_UNCR"):
    """05_cxr_change's real radiograph ``name`` (a ``lib.data.radiograph.Radiograph``) beside the change map
    the model gives it as its own follow-up (``[1, 1, S, S]``, -1 blue to +1 red)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(6.5, 3.2))
    axes[0].imshow(xr.image, cmap="gray")
    axes[0].set_title(f"{name} ({xr.meta['Modality']}, {xr.meta['ViewPosition']})", fontsize=8)
    axes[1].imshow(change[0, 0], cmap="bwr", vmin=-1, vmax=1)
    axes[1].set_title("model(x, x)", fontsize=8)
    for ax in axes:
        ax.axis("off")
    return fig


# --------------------------------------------------------------------------- 03_pretrain

def step_curves(run_dir, panels: dict):
    """One panel per logged quantity of a ``lib.train`` run folder, ``{column: title}``: the training rows
    of ``steps.csv`` as a line, the validation epochs of ``epochs.csv`` (``val_<column>``) as points."""
    import matplotlib.pyplot as plt
    import pandas as pd
    from pathlib import Path

    steps, epochs = pd.read_csv(Path(run_dir) / "steps.csv"), pd.read_csv(Path(run_dir) / "epochs.csv")
    fig, axes = plt.subplots(1, len(panels), figsize=(13 / 3 * len(panels), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels.items()):
        ax.plot(steps["step"], steps[key], lw=0.8, label="train")
        ax.plot(epochs["step"], epochs[f"val_{key}"], "o-", ms=3, label="validation")
        ax.set(title=title, xlabel="optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    return fig


def reconstruction_figure(examples: dict, ncols: int = 4):
    """Masked reconstruction, one row per ``{label: example}`` (``lib.families.pretrain.reconstruction_example``:
    ``input``, ``mask``, ``reconstruction`` [1, C, D, H, W]): the input, its mask (white: hidden from the
    encoder), what the encoder saw and the reconstruction, middle slice along the last axis, channel 0."""
    images, titles = [], []
    for label, ex in examples.items():
        seen = ex["input"] * (1 - ex["mask"])
        for name, vol in (("input", ex["input"]), ("mask", ex["mask"]), ("encoder input", seen),
                          ("reconstruction", ex["reconstruction"])):
            volume = vol[0, 0].detach().cpu().numpy()
            images.append(oriented_slice(volume, 2, volume.shape[2] // 2))
            titles.append(f"{label} {name}")
    return slice_grid(images, titles=titles, ncols=ncols)


def frame_strips(input_hu, target_hu, generated_hu, title: str = "", window: tuple[float, float] = (200.0, 1800.0),
                 diff_limit: float = 500.0):
    """One CT series translation, frame by frame (04_ct_diffusion): the input, the target and the generated
    series in grey under ``window`` (centre, width in HU; the diffusion window −700 … 1100 HU), then the true
    enhancement (target − input) and the generated one (generated − input) on a ±``diff_limit`` HU scale.
    Stacks ``[T, H, W]`` in HU; one column per frame."""
    import matplotlib.pyplot as plt

    panels = {"input": np.asarray(input_hu), "target": np.asarray(target_hu), "generated": np.asarray(generated_hu)}
    panels |= {"target - input": panels["target"] - panels["input"],
               "generated - input": panels["generated"] - panels["input"]}
    lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    frames = panels["input"].shape[0]
    fig, axes = plt.subplots(len(panels), frames, figsize=(1.4 * frames, 1.5 * len(panels)), squeeze=False)
    for r, (name, stack) in enumerate(panels.items()):
        diff = "-" in name
        for f, ax in enumerate(axes[r]):
            ax.imshow(stack[f], cmap="RdBu_r" if diff else "gray", vmin=-diff_limit if diff else lo,
                      vmax=diff_limit if diff else hi)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def label_efficiency(summary, title: str = "RSNA 2025 aneurysm detection: label efficiency"):
    """09_rsna_aneurysm's curve: test weighted AUC (mean ± std over seeds) against the fraction of training
    labels, one line per arm (``summary``: columns label_fraction, arm, mean, std, count)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    for arm, sub in summary.groupby("arm", sort=False):
        sub = sub.sort_values("label_fraction")
        ax.errorbar(sub["label_fraction"], sub["mean"], yerr=sub["std"].fillna(0), marker="o", capsize=3, label=arm)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="fraction of the training series (labels)", ylabel="test weighted AUC (competition)", title=title)
    ax.legend()
    return fig
