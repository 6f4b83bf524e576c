"""Digitally reconstructed radiographs: Beer–Lambert line integrals through a CT volume in HU.

Model (recorded in every cohort's ``cohort.json``): linear attenuation ``mu = MU_WATER * (1 + HU/1000)``
(clipped at 0, so air attenuates nothing), parallel rays, and the log-transformed transmission
``p = -ln(I/I0) = sum(mu * dl)``. A radiograph is ``p / P_REF`` with a fixed ``P_REF`` for the whole
cohort, so intensities are comparable between images and a finding changes them physically (a plain
mean of HU would not). Bones and fluid are bright, air is dark, as on a film.

Geometry: the volume is RAS (axes Right, Anterior, Superior). ``angle_deg`` rotates the source about
the Superior axis: 0 is a frontal view (rays along the anterior–posterior axis), 90 a lateral view.
Image rows run from superior (top) to inferior; in the frontal view the patient's right is on the
image's left, the usual way to hang a chest film.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MU_WATER = 0.02  # 1/mm, water at an effective energy of about 60 keV
P_REF = 8.0      # normalisation of the line integral (about 400 mm of water)


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """Linear attenuation (1/mm) from Hounsfield units."""
    return np.clip(MU_WATER * (1.0 + np.asarray(hu, np.float32) / 1000.0), 0.0, None)


def line_integrals(hu: np.ndarray, spacing: tuple[float, float, float], angle_deg: float = 0.0) -> np.ndarray:
    """``p = sum(mu dl)`` for parallel rays at ``angle_deg`` about the S axis; shape ``[Z, X']`` (rows S→I)."""
    hu = np.asarray(hu, np.float32)
    if hu.ndim != 3:
        raise ValueError(f"line_integrals: need a 3D volume, got shape {hu.shape}")
    if not np.isclose(spacing[0], spacing[1]):
        raise ValueError(f"line_integrals: in-plane spacing must be isotropic to rotate about S, got {spacing}")
    mu = hu_to_mu(hu)
    if angle_deg % 360:
        # rotate the body (not the source) by -angle in the R–A plane; air (mu 0) fills the corners
        mu = ndimage.rotate(mu, -angle_deg, axes=(0, 1), reshape=False, order=1, mode="constant", cval=0.0)
    p = mu.sum(axis=1) * spacing[1]   # [X, Z]
    return p[::-1, ::-1].T.copy()     # rows superior→inferior, columns patient right→left


def radiograph(hu: np.ndarray, spacing: tuple[float, float, float], angle_deg: float = 0.0,
               size: int | None = None) -> np.ndarray:
    """A square DRR in [0, ~1] (``p / P_REF``), resampled to ``size``×``size`` px on a square field.

    The field of view is the larger of the volume's horizontal and vertical extents; the shorter one
    is padded with air, so pixels are square in millimetres.
    """
    p = line_integrals(hu, spacing, angle_deg)
    h_mm, w_mm = p.shape[0] * spacing[2], p.shape[1] * spacing[0]
    fov = max(h_mm, w_mm)
    pad_h = int(round((fov - h_mm) / spacing[2] / 2))
    pad_w = int(round((fov - w_mm) / spacing[0] / 2))
    p = np.pad(p, ((pad_h, pad_h), (pad_w, pad_w)))
    if size is not None:
        p = ndimage.zoom(p, (size / p.shape[0], size / p.shape[1]), order=1)
        p = p[:size, :size]
    return (p / P_REF).astype(np.float32)


def parameters() -> dict:
    return {"model": "parallel-beam Beer-Lambert", "mu_water_per_mm": MU_WATER, "p_ref": P_REF,
            "mu": "mu_water * (1 + HU/1000), clipped at 0", "image": "line integral / p_ref"}
