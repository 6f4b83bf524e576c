"""Datasets and loaders over a prepared dataset folder (the built-in demo cohort is one: files and facts come from its index).

- :class:`VolumeDataset`: brain MRI (1 channel, intensity-normalised) or CT (3 windows from HU), with
  the research's augmentations (random flip, random 90° rotation, Gaussian noise 0.01, resize to the
  preset size). Preprocessing (reorientation, windows, isotropic resampling, crop/pad) runs once per
  file and parameter set and is cached (:class:`lib.data.cache.ArrayCache`). A dataset given a cache
  takes its files' digests when it is built, so its DataLoader workers never hash a file.
- :class:`AlternatingLoader`: MRI and CT batches cannot share a batch (1 vs 3 channels); it alternates
  them, each with its own batch size.
- :class:`SeriesPairs` (CT series translation), :class:`CXRPairs` (longitudinal radiographs and their
  change maps), :class:`DRRVolumes` (radiographic views with their CT): in :mod:`lib.data.paired`, also
  importable from here.

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

from lib.data.cache import ArrayCache
from lib.data.io import load_volume
from lib.data.prepared import PreparedDataset, open_dataset
from lib.data.transforms import crop_or_pad, ct_windows, resample_isotropic

MODALITIES = ("MRI", "CT")
PAIRED = ("SeriesPairs", "CXRPairs", "DRRVolumes")  # in lib.data.paired, importable from here


def __getattr__(name: str):
    if name in PAIRED:
        from lib.data import paired

        return getattr(paired, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        if cache is not None:
            cache.digests(self.files)  # hashed here (or read from the index) once: workers get them pickled

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
