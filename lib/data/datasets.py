"""Datasets and loaders over a prepared dataset folder (the built-in demo cohort is one: files and facts come from its index).

- :class:`VolumeDataset`: brain MRI (1 channel, intensity-normalised) or CT (3 windows from HU), with
  the research's augmentations (random flip, random 90° rotation, Gaussian noise 0.01, resize to the
  preset size). Preprocessing (reorientation, windows, isotropic resampling, crop/pad) runs once per
  file and parameter set and is cached (:class:`lib.data.cache.ArrayCache`).
- :class:`AlternatingLoader`: MRI and CT batches cannot share a batch (1 vs 3 channels); it alternates
  them, each with its own batch size.
- :class:`SeriesPairs` (CT series translation), :class:`CXRPairs` (longitudinal radiographs and their
  change maps), :class:`DRRVolumes` (radiographic views with their CT).

Randomness comes from torch's generator only, so a loader built with :func:`lib.runs.loader_seeding`
gives the same batches and augmentations for the same seed, with or without workers.

Orientation of 2D frames and radiographs: rows run anterior→posterior (axial frames) or
superior→inferior (radiographs), and the patient's right is on the image's left.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lib.data import drr
from lib.data.cache import ArrayCache
from lib.data.io import load_volume
from lib.data.prepared import PreparedDataset, open_dataset
from lib.data.transforms import WINDOWS, crop_or_pad, ct_windows, resample_isotropic, window

MODALITIES = ("MRI", "CT")


# --------------------------------------------------------------------------- the cohort, through the format

FACT_COLUMNS = ("aneurysm", "aneurysm_radius_mm", "aneurysm_voxel", "emboli", "enhancement_hu")
Cohort = str | os.PathLike | PreparedDataset  # a prepared dataset's folder, or the dataset itself


@functools.lru_cache(maxsize=16)
def _open(root: str, stamp: int) -> PreparedDataset:
    return open_dataset(root, check_files=False)


def cohort(root: Cohort) -> PreparedDataset:
    """The cohort as a :class:`~lib.data.prepared.PreparedDataset`: ``root`` itself if it is one, else its
    folder opened through the format (once per version of its ``index.csv``)."""
    if isinstance(root, PreparedDataset):
        return root
    index = Path(root) / "index.csv"
    if not index.is_file():
        raise FileNotFoundError(f"{root}: no prepared cohort here (no index.csv; build one: "
                                "python -m lib.data.demo --size demo --ensure)")
    return _open(str(Path(root)), index.stat().st_mtime_ns)


def image_file(root: Cohort, dataset: str, subject: str, sequence: str) -> Path:
    """The file of one image of the cohort (e.g. ``"chest_ct", "sub-000", "contrast"``), from its index."""
    ds = cohort(root)
    return ds.file(ds.image_id(dataset, subject, sequence))


def subjects(root: Cohort, dataset: str | None = None, split: str | None = None) -> pd.DataFrame:
    """One row per subject of the cohort (optionally one dataset and one split), in index order: ``dataset,
    subject, split`` and the subject's facts from ``labels.csv`` (aneurysm, its voxel, emboli, ...)."""
    ds = cohort(root)
    images = ds.images(split=split, dataset=dataset)
    table = images.drop_duplicates(["dataset", "subject"])[["dataset", "subject", "split"]]
    facts = ds.label_table()
    if len(facts):
        facts = facts[["dataset", "subject", *[c for c in FACT_COLUMNS if c in facts.columns]]]
        table = table.merge(facts.drop_duplicates(["dataset", "subject"]), on=["dataset", "subject"], how="left")
    return table.fillna("").reset_index(drop=True)


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """Columns whose every value is a number as numbers (the format's tables are read as strings), as
    pandas would have read the CSV itself."""
    out = table.copy()
    for c in out.columns:
        with contextlib.suppress(ValueError, TypeError):
            out[c] = pd.to_numeric(out[c])
    return out


def volume_files(root: Cohort, modality: str, split: str | None = None) -> list[Path]:
    """Volumes of one modality for pre-training: MRI = every contrast of ``brain_mri``, CT = ``head_ct``."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return cohort(root).files(modality, split, dataset="brain_mri" if modality == "MRI" else "head_ct")


# --------------------------------------------------------------------------- volume preprocessing

def normalise_mri(array: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Per-volume percentile scaling of the foreground to [0, 1] (MRI has no physical unit)."""
    fg = array[array > array.max() * 0.02] if array.max() > 0 else array
    lo, hi = np.percentile(fg, [lower, upper]) if fg.size else (0.0, 1.0)
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def prepare_volume(path: str | os.PathLike, modality: str, spacing: float | None, size: Sequence[int]) -> np.ndarray:
    """File → model-ready array ``[C, *size]``: RAS, MRI normalised or CT windowed (brain, subdural,
    bone), resampled to ``spacing`` mm (``None`` keeps the grid), centre-cropped or padded to ``size``."""
    volume = load_volume(path, channels=(1,) if modality == "MRI" else (1, 3))
    if spacing is not None:
        volume = resample_isotropic(volume, spacing)
    if modality == "MRI":
        array = normalise_mri(volume.array)
    elif modality == "CT":
        array = volume.array if volume.n_channels == 3 else ct_windows(volume.array)
    else:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return crop_or_pad(np.asarray(array, np.float32), tuple(size), value=0.0)


def augment_volume(x: torch.Tensor, noise_std: float = 0.01) -> torch.Tensor:
    """Random flips (each axis, p=0.5), a random 90° rotation in a random plane, Gaussian noise."""
    for axis in (1, 2, 3):
        if torch.rand(()) < 0.5:
            x = x.flip(axis)
    k = int(torch.randint(0, 4, ()))
    if k:
        planes = ((1, 2), (1, 3), (2, 3))
        x = torch.rot90(x, k, planes[int(torch.randint(0, 3, ()))])
    return x + noise_std * torch.randn_like(x)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear (3D) or bilinear (2D) resize of a channel-first tensor to ``size``."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[1:]) == size:
        return x
    mode = "trilinear" if len(size) == 3 else "bilinear"
    return F.interpolate(x[None], size=size, mode=mode, align_corners=False)[0]


class VolumeDataset(Dataset):
    """Preprocessed (cached) volumes of one modality; items are ``[C, S, S, S]`` float32 tensors.

    ``prep_size``/``spacing``: the prepared grid (02_prepare_data; :meth:`array`); ``size``: the model's
    input size (:meth:`model_array`: the prepared array resized). Both are deterministic and cached, each
    as its own entry, so an item is a read of what the model takes; the random augmentations (flips,
    90° rotations, noise) come after, at the model's size. Flips and rotations commute with the resize
    (a cube resized by the same factor on every axis), so only where the noise is added differs from
    augmenting the prepared grid first: its standard deviation is ``noise_std`` at the model's input.
    """

    def __init__(self, files: Sequence[str | os.PathLike], modality: str, size: int, *, prep_size: Sequence[int] = (64, 64, 64),
                 spacing: float | None = None, augment: bool = False, noise_std: float = 0.01,
                 cache: ArrayCache | None = None):
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if not files:
            raise ValueError(f"no {modality} files given")
        self.files, self.modality, self.size = [Path(f) for f in files], modality, (int(size),) * 3
        self.params = {"modality": modality, "spacing": spacing, "prep_size": list(prep_size), "windows":
                       list(("brain", "subdural", "bone")) if modality == "CT" else None}
        self.augment, self.noise_std, self.cache = augment, noise_std, cache

    def __len__(self) -> int:
        return len(self.files)

    def array(self, i: int) -> np.ndarray:
        """Volume ``i`` on the prepared grid ``[C, *prep_size]`` (a read-only memory map when cached)."""
        path = self.files[i]
        compute = lambda: prepare_volume(path, self.modality, self.params["spacing"], self.params["prep_size"])  # noqa: E731
        return compute() if self.cache is None else self.cache.get(path, self.params, compute)

    def model_array(self, i: int) -> np.ndarray:
        """Volume ``i`` resized to the model's input ``[C, *size]`` (a read-only memory map when cached)."""
        if list(self.size) == self.params["prep_size"]:
            return self.array(i)
        compute = lambda: resize(torch.from_numpy(np.array(self.array(i), dtype=np.float32)), self.size).numpy()  # noqa: E731
        if self.cache is None:
            return compute()
        return self.cache.get(self.files[i], {**self.params, "size": list(self.size)}, compute)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.model_array(i), dtype=np.float32))
        return augment_volume(x, self.noise_std) if self.augment else x


class AlternatingLoader:
    """Alternates batches of named loaders: ``("MRI", batch), ("CT", batch), ...``.

    When one is exhausted the others finish their epoch, so an epoch sees every sample of each. The
    order is fixed (it starts with the first loader), so seeded loaders give a seeded sequence. One
    loader (a dataset of one modality, e.g. OpenMind alone) simply yields its batches, named.
    """

    def __init__(self, loaders: dict[str, DataLoader]):
        if not loaders:
            raise ValueError("AlternatingLoader needs at least one named loader")
        self.loaders = loaders

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders.values())

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        iterators = {name: iter(loader) for name, loader in self.loaders.items()}
        while iterators:
            for name in list(iterators):
                try:
                    yield name, next(iterators[name])
                except StopIteration:
                    del iterators[name]


# --------------------------------------------------------------------------- paired data for the other families

def axial_frames(array: np.ndarray) -> np.ndarray:
    """``[X, Y, Z]`` RAS volume → ``[Z, Y, X]`` frames, superior first, anterior up, patient right on the left."""
    return np.ascontiguousarray(array[::-1, ::-1, ::-1].transpose(2, 1, 0))


class SeriesPairs(Dataset):
    """Paired chest CT series as frame stacks: ``{"baseline", "target"}`` each ``[1, T, H, W]`` in [-1, 1].

    Frames are axial slices under the diffusion window (centre 200, width 1800 HU). Training draws a
    random run of ``frames`` consecutive slices; evaluation takes the central run. ``frames=None``: the
    whole series.
    """

    def __init__(self, root: Cohort, split: str, frames: int | None, size: int, *, random_start: bool = False,
                 cache: ArrayCache | None = None, source: str = "noncontrast", target: str = "contrast"):
        self.cohort, self.frames, self.size, self.random_start, self.cache = cohort(root), frames, size, random_start, cache
        self.subjects = list(subjects(self.cohort, "chest_ct", split)["subject"])
        self.names = (source, target)
        if not self.subjects:
            raise ValueError(f"no chest_ct subjects in split {split!r} of {self.cohort.root}")

    def __len__(self) -> int:
        return len(self.subjects)

    def _stack(self, subject: str, name: str) -> np.ndarray:
        path = image_file(self.cohort, "chest_ct", subject, name)

        def compute():
            v = load_volume(path, channels=(1,))
            frames = axial_frames(window(v.array[0], *WINDOWS["diffusion"], out_range=(-1.0, 1.0)))
            return resize(torch.from_numpy(frames), (self.size, self.size)).numpy()

        params = {"frames": "axial", "window": "diffusion", "size": self.size}
        return compute() if self.cache is None else self.cache.get(path, params, compute)

    def __getitem__(self, i: int) -> dict:
        subject = self.subjects[i]
        a, b = (self._stack(subject, n) for n in self.names)
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
        v = load_volume(image_file(self.cohort, "chest_ct", subject, self.names[0]), channels=(1,))
        nx, ny, nz = v.spatial_shape
        sx, sy = nx / self.size, ny / self.size
        # frame f, row r, column c <- source voxel (nx-1-c', ny-1-r', nz-1-start-f), c' = (c + 0.5) sx - 0.5
        m = np.array([[0.0, 0.0, -sx, nx - 0.5 - 0.5 * sx],
                      [0.0, -sy, 0.0, ny - 0.5 - 0.5 * sy],
                      [-1.0, 0.0, 0.0, nz - 1.0 - start],
                      [0.0, 0.0, 0.0, 1.0]])
        return v.affine @ m


class CXRPairs(Dataset):
    """Longitudinal radiograph pairs: ``baseline``, ``followup``, ``change`` each ``[1, S, S]``."""

    def __init__(self, root: Cohort, split: str, size: int | None = None):
        self.cohort, self.size = cohort(root), size
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        ds = self.cohort
        self.pairs = _typed(ds.pairs[ds.pairs["split"] == split].reset_index(drop=True))
        if self.pairs.empty:
            raise ValueError(f"no CXR pairs in split {split!r} of {self.cohort.root}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        row = self.pairs.iloc[i]
        item = {"pair": row["pair"], "nuisance_only": bool(int(row["nuisance_only"]))}
        ds = self.cohort
        for name, path in (("baseline", ds.file(row["a"])), ("followup", ds.file(row["b"])),
                           ("change", ds.root / row["target_path"])):
            x = torch.from_numpy(np.load(path))[None]
            item[name] = x if self.size is None else resize(x, (self.size, self.size))
        return item


class DRRVolumes(Dataset):
    """Radiographic views of a chest CT and the CT itself, for X-ray → CT.

    ``views``: ``[V, 1, S, S]`` DRRs at ``angles`` (0 frontal, 90 lateral from the cohort's files; other
    angles rendered from the CT with the cohort's Beer–Lambert model and cached). ``ct``:
    ``[1, D, D, D]`` with HU mapped linearly from ``hu_range`` to [0, 1] (clipped).
    """

    def __init__(self, root: Cohort, split: str, angles: Sequence[float] = (0.0, 90.0), image_size: int = 64,
                 volume_size: int = 32, hu_range: tuple[float, float] = (-1000.0, 1000.0), cache: ArrayCache | None = None):
        if not angles:
            raise ValueError("DRRVolumes needs at least one view angle")
        self.cohort, self.angles, self.image_size, self.volume_size = cohort(root), tuple(float(a) for a in angles), image_size, volume_size
        self.hu_range, self.cache = hu_range, cache
        self.subjects = list(subjects(self.cohort, "chest_ct", split)["subject"])
        if not self.subjects:
            raise ValueError(f"no chest_ct subjects in split {split!r} of {self.cohort.root}")

    def __len__(self) -> int:
        return len(self.subjects)

    def ct_path(self, subject: str) -> Path:
        return image_file(self.cohort, "chest_ct", subject, "noncontrast")

    def drr_path(self, subject: str, view: str) -> Path:
        return image_file(self.cohort, "drr", subject, view)

    def _view(self, subject: str, angle: float) -> np.ndarray:
        stored = {0.0: "frontal", 90.0: "lateral"}.get(angle % 360)
        if stored is not None:
            return np.load(self.drr_path(subject, stored))
        path = self.ct_path(subject)

        def compute():
            v = load_volume(path, channels=(1,))
            return drr.radiograph(v.array[0], v.spacing, angle, size=np.load(self.drr_path(subject, "frontal")).shape[0])

        return compute() if self.cache is None else self.cache.get(path, {"drr_angle": angle, **drr.parameters()}, compute)

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
        ``-e_S z``. Follows :func:`lib.data.drr.radiograph`: square field of the larger of the R and S
        extents, the shorter padded with air, resampled corner-aligned to the stored image size.
        """
        subject = self.subjects[0]
        v = load_volume(self.ct_path(subject), channels=(1,))
        (nx, ny, nz), (sx, sy, sz) = v.spatial_shape, v.spacing
        size = np.load(self.drr_path(subject, "frontal"), mmap_mode="r").shape[0]
        h_mm, w_mm = nz * sz, nx * sx
        fov = max(h_mm, w_mm)
        rows = nz + 2 * int(round((fov - h_mm) / sz / 2))
        cols = nx + 2 * int(round((fov - w_mm) / sx / 2))
        e_r = nx * (size - 1) / (size * (cols - 1))
        return (float(e_r), float(e_r * ny * sy / (nx * sx)), float(nz * (size - 1) / (size * (rows - 1))))


# --------------------------------------------------------------------------- preparation and throughput

def prepare_all(root: Cohort, cache: ArrayCache, spacing: float | None, prep_size: int) -> pd.DataFrame:
    """Preprocess every MRI and CT volume of a cohort into the cache; one row per modality and split."""
    import time

    rows = []
    for modality in MODALITIES:
        for split in ("train", "val", "test"):
            files = volume_files(root, modality, split)
            if not files:
                continue
            data = VolumeDataset(files, modality, prep_size, prep_size=(prep_size,) * 3, spacing=spacing, cache=cache)
            hits, misses, t0 = cache.hits, cache.misses, time.monotonic()
            shapes = {tuple(data.array(i).shape) for i in range(len(data))}
            rows.append({"modality": modality, "split": split, "volumes": len(files), "shape": ", ".join(map(str, shapes)),
                         "prepared": cache.misses - misses, "from_cache": cache.hits - hits,
                         "seconds": round(time.monotonic() - t0, 2)})
    return pd.DataFrame(rows)


def throughput(files: Sequence[str | os.PathLike], modality: str, cache: ArrayCache, spacing: float | None,
               prep_size: int) -> dict:
    """Volumes per second: decoding the ``.nii.gz`` (and preprocessing) every time, against reading the cache.

    Measured side by side in one call, on the same files, after the cache has been filled. Each volume is
    read whole into memory and released before the next, as a training loop consumes them.
    """
    import time

    data = VolumeDataset(files, modality, prep_size, prep_size=(prep_size,) * 3, spacing=spacing, cache=cache)
    for i in range(len(data)):
        data.array(i)  # fill the cache (and warm the file system) before timing

    def best_of(read, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(len(data)):
                read(i)
            times.append(time.perf_counter() - t0)
        return min(times)

    t_decode = best_of(lambda i: load_volume(data.files[i]))
    t_prepare = best_of(lambda i: prepare_volume(data.files[i], modality, spacing, (prep_size,) * 3))
    t_cache = best_of(lambda i: np.array(data.array(i)))  # reads the whole map
    n = len(data)
    return {"modality": modality, "volumes": n, "decode_nii_gz_per_s": round(n / t_decode, 1),
            "decode_and_prepare_per_s": round(n / t_prepare, 1), "cache_per_s": round(n / t_cache, 1),
            "speedup_cache_vs_decode_and_prepare": round(t_prepare / t_cache, 1)}
