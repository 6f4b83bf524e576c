"""Datasets of paired images over a prepared dataset (``lib/data/dataset_format.md``): the built-in cohort or a
converted real one, found through the index and ``pairs.csv``.

- :class:`SeriesPairs` (04, CT series translation): non-contrast and contrast series of one subject. The
  built-in cohort pairs ``chest_ct`` ``noncontrast`` with ``contrast``; a real dataset lists its pairs in
  ``pairs.csv`` with a ``target`` column (Coltea-Lung-CT-100W: ``arterial`` / ``venous`` registered onto
  the native series' grid), chosen with ``target=``.
- :class:`CXRPairs` (05): a baseline and a follow-up radiograph and, where the dataset has one, the signed
  change map (``target_path``); the built-in pairs, pairs rendered from chest CT (``ct_to_cxr_pairs``) and
  MS-CXR-T (no maps: progression labels only) alike.
- :class:`DRRVolumes` (06): radiographs of a chest CT and the CT. The built-in cohort stores frontal and
  lateral parallel-beam DRRs beside ``chest_ct`` ``noncontrast``; a real dataset (``lidc_idri``) stores
  one CT per subject and ``drr_<angle>`` views rendered with the geometry in its ``dataset.json["drr"]``.
  Other angles are rendered from the CT with the same geometry and cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lib.data import drr
from lib.data.cache import ArrayCache
from lib.data.datasets import Cohort, _typed, axial_frames, cohort, resize, subjects
from lib.data.io import load_volume
from lib.data.transforms import WINDOWS, window

SPLITS = ("train", "val", "test")


def _load_npy(path: Path, what: str, **kwargs) -> np.ndarray:
    """``np.load`` (no pickles) raising a ``ValueError`` that names the file and what is wrong with it."""
    try:
        return np.load(path, allow_pickle=False, **kwargs)
    except MemoryError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file ({what})") from None
    except Exception as e:  # EOFError (empty), ValueError (short header or data), OSError...
        raise ValueError(f"{path}: unreadable {what}: a truncated or damaged .npy file "
                         f"({type(e).__name__}: {e})") from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


# --------------------------------------------------------------------------- CT series pairs

def series_pairs(ds, split: str, source: str = "noncontrast", target: str = "contrast") -> list[tuple[str, str, str]]:
    """``(subject, a, b)`` image ids of the paired series of one split: ``pairs.csv`` rows whose ``target``
    is ``target`` where the dataset has such rows, else the cohort's ``chest_ct`` ``source``/``target``."""
    _check_split(split)
    pairs = ds.pairs
    if len(pairs) and "target" in pairs.columns and (pairs["target"] != "").any():
        if target not in set(pairs["target"]):
            raise ValueError(f"{ds.root}: no pairs with target {target!r}; pairs.csv has targets "
                             f"{', '.join(sorted(set(pairs['target']) - {''}))}")
        rows = pairs[(pairs["target"] == target) & (pairs["split"] == split)]
        return [(r.subject, r.a, r.b) for r in rows.itertuples()]
    subs = subjects(ds, "chest_ct", split)["subject"]
    return [(s, ds.image_id("chest_ct", s, source), ds.image_id("chest_ct", s, target)) for s in subs]


class SeriesPairs(Dataset):
    """Paired chest CT series as frame stacks: ``{"baseline", "target"}`` each ``[1, T, H, W]`` in [-1, 1].

    Frames are axial slices under the diffusion window (centre 200, width 1800 HU). Training draws a
    random run of ``frames`` consecutive slices; evaluation takes the central run. ``frames=None``: the
    whole series.
    """

    def __init__(self, root: Cohort, split: str, frames: int | None, size: int, *, random_start: bool = False,
                 cache: ArrayCache | None = None, source: str = "noncontrast", target: str = "contrast"):
        self.cohort, self.frames, self.size, self.random_start, self.cache = cohort(root), frames, size, random_start, cache
        self.names = (source, target)
        self.items = series_pairs(self.cohort, split, source, target)
        self.subjects = [s for s, _, _ in self.items]
        if not self.items:
            raise ValueError(f"no paired series ({source} -> {target}) in split {split!r} of {self.cohort.root}")
        if cache is not None:  # digests taken once, here: the DataLoader's workers receive them pickled
            cache.digests(self.cohort.file(i) for _, a, b in self.items for i in (a, b))

    def __len__(self) -> int:
        return len(self.items)

    def _stack(self, image_id: str) -> np.ndarray:
        path = self.cohort.file(image_id)

        def compute():
            v = load_volume(path, channels=(1,))
            frames = axial_frames(window(v.array[0], *WINDOWS["diffusion"], out_range=(-1.0, 1.0)))
            return resize(torch.from_numpy(frames), (self.size, self.size)).numpy()

        params = {"frames": "axial", "window": "diffusion", "size": self.size}
        return compute() if self.cache is None else self.cache.get(path, params, compute)

    def __getitem__(self, i: int) -> dict:
        subject, a_id, b_id = self.items[i]
        a, b = self._stack(a_id), self._stack(b_id)
        if a.shape != b.shape:
            raise ValueError(f"{subject}: series {a_id} {a.shape} and {b_id} {b.shape} are not on one grid "
                             "(a converter registers and resamples the target onto the source)")
        frames = a.shape[0] if self.frames is None else self.frames
        if frames > a.shape[0]:
            raise ValueError(f"{subject}: {frames} frames asked, the series has {a.shape[0]}")
        start = int(torch.randint(0, a.shape[0] - frames + 1, ())) if self.random_start else (a.shape[0] - frames) // 2
        sl = slice(start, start + frames)
        return {"baseline": torch.from_numpy(np.array(a[sl]))[None], "target": torch.from_numpy(np.array(b[sl]))[None],
                "subject": subject, "start": start}

    def series_affine(self, subject: str, start: int = 0) -> np.ndarray:
        """Voxel -> RAS mm affine of a frame stack ``[T, H, W]`` of ``subject`` whose first frame is ``start``
        (as ``__getitem__`` returns it; index order frame, row, column), for NIfTI export with
        :func:`lib.data.io.save_volume`. Inverts :func:`axial_frames` and the in-plane resize (pixel
        centres, ``align_corners=False``)."""
        a_id = next(a for s, a, _ in self.items if s == subject)
        v = load_volume(self.cohort.file(a_id), channels=(1,))
        nx, ny, nz = v.spatial_shape
        sx, sy = nx / self.size, ny / self.size
        # frame f, row r, column c <- source voxel (nx-1-c', ny-1-r', nz-1-start-f), c' = (c + 0.5) sx - 0.5
        m = np.array([[0.0, 0.0, -sx, nx - 0.5 - 0.5 * sx],
                      [0.0, -sy, 0.0, ny - 0.5 - 0.5 * sy],
                      [-1.0, 0.0, 0.0, nz - 1.0 - start],
                      [0.0, 0.0, 0.0, 1.0]])
        return v.affine @ m


# --------------------------------------------------------------------------- radiograph pairs

FINDINGS = ("nodule", "consolidation", "effusion", "pneumothorax", "cardiomegaly")  # lib.data.phantoms.FINDINGS


def finding_vector(*kinds: str) -> torch.Tensor:
    """Multi-hot ``[len(FINDINGS)]`` of the findings named in ``kinds`` (each a ``;``-joined list, as pairs.csv)."""
    named = {k for text in kinds if isinstance(text, str) for k in text.split(";") if k}  # NaN: none
    unknown = named - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown finding(s) {sorted(unknown)}; known: {', '.join(FINDINGS)}")
    return torch.tensor([float(k in named) for k in FINDINGS])


class CXRPairs(Dataset):
    """Longitudinal radiograph pairs: ``baseline``, ``followup`` and (where the dataset has change maps)
    ``change``, each ``[1, S, S]``; ``nuisance_only`` from ``pairs.csv`` (0 where it has no such column);
    where pairs.csv says which findings each image carries (``persistent``, ``resolved``, ``appeared``),
    ``findings_baseline`` and ``findings_followup`` (multi-hot over :data:`FINDINGS`)."""

    def __init__(self, root: Cohort, split: str, size: int | None = None):
        self.cohort, self.size = cohort(root), size
        _check_split(split)
        ds = self.cohort
        raw = ds.pairs[ds.pairs["split"] == split].reset_index(drop=True) if len(ds.pairs) else ds.pairs
        self.pairs = _typed(raw)
        if self.pairs.empty:
            raise ValueError(f"no CXR pairs in split {split!r} of {self.cohort.root}")
        # from the text, where '' is "no map" (typed, an empty column becomes NaN)
        self.has_change = "target_path" in raw.columns and bool((raw["target_path"] != "").all())

    def __len__(self) -> int:
        return len(self.pairs)

    def _image(self, path: Path) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(_load_npy(path, "radiograph"), np.float32))[None]
        return x if self.size is None else resize(x, (self.size, self.size))

    def __getitem__(self, i: int) -> dict:
        row = self.pairs.iloc[i]
        nuisance = row["nuisance_only"] if "nuisance_only" in row.index else 0
        item = {"pair": str(row["pair"]), "nuisance_only": bool(int(nuisance or 0))}
        ds = self.cohort
        item["baseline"], item["followup"] = self._image(ds.file(row["a"])), self._image(ds.file(row["b"]))
        if self.has_change:
            item["change"] = self._image(ds.root / row["target_path"])
        if {"persistent", "resolved", "appeared"} <= set(row.index):
            item["findings_baseline"] = finding_vector(row["persistent"], row["resolved"])
            item["findings_followup"] = finding_vector(row["persistent"], row["appeared"])
        return item


# --------------------------------------------------------------------------- radiographs and their CT

def _angle_of(sequence: str) -> float | None:
    """``frontal`` -> 0, ``lateral`` -> 90, ``drr_045`` -> 45; None for anything else."""
    named = {"frontal": 0.0, "lateral": 90.0}
    if sequence in named:
        return named[sequence]
    if sequence.startswith("drr_"):
        try:
            return float(sequence[4:])
        except ValueError:
            return None
    return None


def geometry_of(info: dict) -> drr.Geometry | None:
    """The cone-beam geometry a dataset's DRRs were rendered with (``dataset.json["drr"]["geometry"]``);
    None: parallel beams (the built-in cohort)."""
    g = (info.get("drr") or {}).get("geometry")
    return drr.Geometry(**g) if g else None


class DRRVolumes(Dataset):
    """Radiographic views of a chest CT and the CT itself, for X-ray → CT.

    ``views``: ``[V, 1, S, S]`` DRRs at ``angles`` (stored ones from the dataset's files, other angles
    rendered from the CT with the dataset's Beer–Lambert geometry and cached). ``ct``: ``[1, D, D, D]``
    with HU mapped linearly from ``hu_range`` to [0, 1] (clipped).
    """

    def __init__(self, root: Cohort, split: str, angles: Sequence[float] = (0.0, 90.0), image_size: int = 64,
                 volume_size: int = 32, hu_range: tuple[float, float] = (-1000.0, 1000.0), cache: ArrayCache | None = None):
        if not angles:
            raise ValueError("DRRVolumes needs at least one view angle")
        _check_split(split)
        self.cohort, self.angles, self.image_size, self.volume_size = cohort(root), tuple(float(a) for a in angles), image_size, volume_size
        self.hu_range, self.cache = hu_range, cache
        self.geometry = geometry_of(self.cohort.info)
        self._ct, self._views = self._layout(split)
        self.subjects = list(self._ct)
        if not self.subjects:
            raise ValueError(f"no chest CT with radiographs in split {split!r} of {self.cohort.root}")
        if cache is not None:  # digests taken once, here: the DataLoader's workers receive them pickled
            cache.digests(self.ct_path(s) for s in self.subjects)

    def _layout(self, split: str) -> tuple[dict[str, str], dict[str, dict[float, str]]]:
        """Subject -> CT image id, and subject -> {angle: stored view's image id}."""
        ds = self.cohort
        if self.geometry is None and "chest_ct" in set(ds.index["dataset"]):  # the built-in cohort
            subs = list(subjects(ds, "chest_ct", split)["subject"])
            ct = {s: ds.image_id("chest_ct", s, "noncontrast") for s in subs}
            views = {s: {_angle_of(v): ds.image_id("drr", s, v) for v in ("frontal", "lateral")} for s in subs}
            return ct, views
        images = ds.images(split=split)
        ct = {r.subject: r.image_id for r in images[images["modality"] == "CT"].itertuples()}
        views: dict[str, dict[float, str]] = {s: {} for s in ct}
        for r in images[images["modality"] == "XR"].itertuples():
            angle = _angle_of(r.sequence)
            if r.subject in views and angle is not None:
                views[r.subject][angle] = r.image_id
        return {s: i for s, i in ct.items() if views[s]}, {s: v for s, v in views.items() if v}

    def __len__(self) -> int:
        return len(self.subjects)

    def ct_path(self, subject: str) -> Path:
        return self.cohort.file(self._ct[subject])

    def drr_path(self, subject: str, view: str | float) -> Path:
        """The stored view of ``subject`` named ``view`` (``frontal``, ``lateral``, ``drr_045``) or at that angle."""
        angle = _angle_of(view) if isinstance(view, str) else float(view)
        if angle not in self._views[subject]:
            raise KeyError(f"{subject}: no stored view {view!r}; stored angles {sorted(self._views[subject])}")
        return self.cohort.file(self._views[subject][angle])

    def _stored(self, subject: str) -> Path:
        """Any stored view of ``subject`` (its size is the size of every rendered one)."""
        views = self._views[subject]
        return self.cohort.file(views[min(views)])

    def _view(self, subject: str, angle: float) -> np.ndarray:
        stored = self._views[subject].get(angle % 360)
        if stored is not None:
            return _load_npy(self.cohort.file(stored), "radiograph")
        path = self.ct_path(subject)

        def compute():
            v = load_volume(path, channels=(1,))
            size = _load_npy(self._stored(subject), "radiograph", mmap_mode="r").shape[0]
            if self.geometry is None:
                return drr.radiograph(v.array[0], v.spacing, angle, size=size)
            return drr.radiograph(v.array[0], v.spacing, angle, size=size, geometry=self.geometry)

        model = drr.parameters() if self.geometry is None else drr.parameters(self.geometry)
        return compute() if self.cache is None else self.cache.get(path, {"drr_angle": angle, **model}, compute)

    def __getitem__(self, i: int) -> dict:
        subject = self.subjects[i]
        views = torch.stack([resize(torch.from_numpy(np.array(self._view(subject, a), np.float32))[None],
                                    (self.image_size, self.image_size)) for a in self.angles])
        path = self.ct_path(subject)

        def compute():
            v = load_volume(path, channels=(1,))
            lo, hi = self.hu_range
            x = np.clip((v.array - lo) / (hi - lo), 0.0, 1.0)
            return resize(torch.from_numpy(x), (self.volume_size,) * 3).numpy()

        params = {"ct": "hu01", "hu_range": list(self.hu_range), "size": self.volume_size}
        ct = compute() if self.cache is None else self.cache.get(path, params, compute)
        return {"views": views, "ct": torch.from_numpy(np.array(ct, np.float32)), "subject": subject}

    def volume_affine(self, subject: str) -> np.ndarray:
        """Voxel -> RAS mm affine of the ``volume_size``^3 ``ct`` of ``subject``: the CT's field of view,
        resampled as ``resize`` does it (voxel centres, ``align_corners=False``), for NIfTI export."""
        v = load_volume(self.ct_path(subject), channels=(1,))
        scale = np.asarray(v.spatial_shape, np.float64) / self.volume_size
        m = np.eye(4)
        m[:3, :3] = np.diag(scale)
        m[:3, 3] = scale / 2 - 0.5
        return v.affine @ m

    def volume_extent(self) -> tuple[float, float, float]:
        """Half-extent of the CT along R, A, S in units of a radiograph's half-width.

        With normalised coordinates (voxel and pixel centres, ``align_corners=False``), a voxel at
        ``(x, y, z)`` appears in the view at angle ``a`` at column ``-(e_R x cos a + e_A y sin a)`` and row
        ``-e_S z``. Parallel beams follow :func:`lib.data.drr.radiograph`: square field of the larger of the
        R and S extents, the shorter padded with air, resampled corner-aligned to the stored image size. A
        cone beam's field at the rotation axis is the detector divided by the magnification there; the
        model's unprojection stays parallel (the magnification's change with depth is left to the network).
        """
        subject = self.subjects[0]
        v = load_volume(self.ct_path(subject), channels=(1,))
        (nx, ny, nz), (sx, sy, sz) = v.spatial_shape, v.spacing
        if self.geometry is not None:
            half = drr.field_at_axis_mm(self.geometry) / 2
            return (float(nx * sx / 2 / half), float(ny * sy / 2 / half), float(nz * sz / 2 / half))
        size = _load_npy(self._stored(subject), "radiograph", mmap_mode="r").shape[0]
        h_mm, w_mm = nz * sz, nx * sx
        fov = max(h_mm, w_mm)
        rows = nz + 2 * int(round((fov - h_mm) / sz / 2))
        cols = nx + 2 * int(round((fov - w_mm) / sx / 2))
        e_r = nx * (size - 1) / (size * (cols - 1))
        return (float(e_r), float(e_r * ny * sy / (nx * sx)), float(nz * (size - 1) / (size * (rows - 1))))
