"""LIDC-IDRI (TCIA) -> chest CT volumes and cone-beam DRRs, prepared as X2CT-GAN prepared them.

Raw layout (NBIA Data Retriever): ``LIDC-IDRI/LIDC-IDRI-NNNN/<study>/<series>/*.dcm``, the readers' XML in the
CT series folder; file and folder names depend on the tool's version (``1-001.dcm`` under
``01-01-2000-NA-...`` folders, or ``000001.dcm`` under UID folders): nothing here relies on them. One item
per patient folder (subject = patient id). Per patient:

1. the CT series: of the series folders whose first readable header says Modality CT, the one with the most
   ``.dcm`` files; every other series (CR/DX radiograph studies, smaller CT series) is dropped and noted. No
   CT series, or one that cannot become a volume, refuses the patient with the reason.
2. assembled leniently (:func:`lib.data.dicom_lenient.assemble` on the ``.dcm`` files: positions from
   ImagePositionPatient, whatever SliceThickness says; damaged files dropped; uneven gaps resampled; all
   noted), in HU, RAS.
3. the table removed by a body mask: voxels above ``BODY_HU`` (-500), their largest 3D connected component,
   holes filled per axial slice; everything outside is set to -1024.
4. resampled to cubic ``--spacing`` mm (default here 1.0), cropped/padded (-1024) to a ``--size`` cube (320)
   centred on the body's bounding box, clipped to ``--hu-min``..``--hu-max`` (-1024..1476), written
   ``images/<patient>_ct.nii.gz`` (int16 HU, RAS; modality CT, sequence ``ct``).
5. DRRs of the written volume at ``--angles`` (0,90: PA and lateral) with the cone beam of
   :class:`lib.data.drr.Geometry` (``--source-axis-mm`` 541, ``--source-detector-mm`` 949, ``--detector-mm``
   default :data:`lib.data.drr.DETECTOR_MM`, ``--drr-size`` 320 px): ``images/<patient>_drr_<angle:03d>.npy``,
   float32 ``line integral / P_REF`` (modality XR, sequence ``drr_<angle:03d>``). The geometry and the
   preparation are in ``dataset.json`` (``drr``, ``preparation``).

``points.csv``: one row per reader mark: every ``unblindedReadNodule`` (label ``nodule``, or ``nodule<3mm``
when it has no ``characteristics``) at the centroid of the edge points of its included ROIs, and every
``nonNodule`` (``non-nodule``) at its locus; each point mapped through its annotated image's own geometry
(matched by imageSOP_UID, else by imageZposition) to RAS mm and to the voxel of the written image. Extras:
``reader`` (servicingRadiologistID), ``nodule_id``, ``malignancy`` (1-5, empty without characteristics),
``inside`` (0: outside the written cube). Any XML namespace is accepted.

Split: X2CT-GAN's 102 test patients (its ``3DGAN/data/test.txt``, :data:`X2CT_TEST`) are ``test``; every other
patient is ``train`` or ``val`` (about 90/10), seeded by patient (:data:`SPLIT_SEED`; at least one ``val``).
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from lib.data import drr
from lib.data.convert import Item, Output, Refused
from lib.data.prepared import write_array, write_image

NAME, VERSION, MARKER = "lidc_idri", "1", "LIDC-IDRI"
SPLIT_SEED, SPLIT_FRACTIONS, VAL_FRACTION = 0, (0.9, 0.1, 0.0), 0.1
BODY_HU, AIR_HU = -500.0, -1024
X2CT_TEST = frozenset(f"LIDC-IDRI-{n}" for n in (
    "0256 0861 0088 0804 0155 0396 0506 0040 0496 0298 0056 0776 0739 0959 0740 0720 0461 0145 0722 0794 0302 0146 "
    "0293 0611 0078 0026 0758 0535 0710 0998 0339 0558 0662 0586 0900 0316 0291 0249 0170 0541 0832 0049 0947 0462 "
    "0976 0080 0798 0648 1007 0961 0211 0225 0960 0129 0184 0899 0864 0375 0742 0209 0606 0711 0634 0353 0513 0590 "
    "0113 0325 0095 0990 0561 0595 0003 0346 0757 0234 0271 0486 0551 0706 0684 0007 0400 0442 0874 0373 0694 0627 "
    "0021 0650 0842 0103 0949 0537 0983 0782 0250 0260 0826 0912 0096 0239").split())
INFO = {
    "source": "url:https://www.cancerimagingarchive.net/collection/lidc-idri/",
    "licence": "CC BY 3.0 (TCIA; cite the LIDC-IDRI data citation and Armato et al. 2011)",
    "description": "chest CT of 1,018 patients with 4 readers' lung nodule marks; table removed, cubic voxels, "
                   "a cube around the body, and cone-beam DRRs (X2CT-GAN's preparation)",
    "channels": {"CT": ["lung", "mediastinum", "bone"], "XR": ["intensity"]},
    "labels": {"points.csv": {"label": ["nodule", "nodule<3mm", "non-nodule"]}},
    "split": "X2CT-GAN's 102 test patients -> test; the others train/val (about 90/10, seeded by patient)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=320, help="voxels per side of the written CT cube")
    parser.add_argument("--hu-min", type=float, default=-1024.0, help="HU clip, low")
    parser.add_argument("--hu-max", type=float, default=1476.0, help="HU clip, high")
    parser.add_argument("--angles", default="0,90", help="DRR angles (degrees about S: 0 PA, 90 lateral)")
    parser.add_argument("--drr-size", type=int, default=320, help="DRR pixels per side")
    parser.add_argument("--source-axis-mm", type=float, default=541.0, help="source to rotation axis")
    parser.add_argument("--source-detector-mm", type=float, default=949.0, help="source to detector")
    parser.add_argument("--detector-mm", type=float, default=drr.DETECTOR_MM,
                        help="detector width (default: a 320 mm field at the axis)")


def geometry(options: dict) -> drr.Geometry:
    return drr.Geometry(float(options.get("source_axis_mm") or 541.0), float(options.get("source_detector_mm") or 949.0),
                        float(options.get("detector_mm") or drr.DETECTOR_MM))


def angles(options: dict) -> list[float]:
    return [float(a) for a in str(options.get("angles") or "0,90").split(",") if a.strip()]


def info(src: Path, options: dict) -> dict:
    """``dataset.json``'s fields that depend on the options (the engine merges them into :data:`INFO`)."""
    return preparation(options)


def preparation(options: dict) -> dict:
    """``dataset.json``'s ``drr`` and ``preparation`` for these options."""
    return {"drr": {**drr.parameters(geometry(options)), "angles": angles(options), "size": int(options.get("drr_size") or 320)},
            "preparation": {"spacing_mm": _spacing(options), "size": int(options.get("size") or 320),
                            "hu_range": [float(options.get("hu_min", -1024.0)), float(options.get("hu_max", 1476.0))],
                            "body_mask": f"> {BODY_HU:g} HU, largest 3D component, holes filled per axial slice; "
                                         f"outside -> {AIR_HU}", "crop": "cube centred on the body's bounding box"}}


def _spacing(options: dict) -> float:
    return float(options.get("spacing") or 1.0)


def _splits(patients: list[str]) -> dict[str, str]:
    rest = sorted(p for p in patients if p not in X2CT_TEST)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rest))
    n_val = max(1, round(VAL_FRACTION * len(rest))) if len(rest) >= 2 else 0
    out = {rest[i]: ("val" if rank < n_val else "train") for rank, i in enumerate(order)}
    return {**out, **{p: "test" for p in patients if p in X2CT_TEST}}


def items(src: Path, options: dict) -> list[Item]:
    root = src / MARKER
    patients = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("LIDC-IDRI-"))
    if not patients:
        raise FileNotFoundError(f"{root}: no LIDC-IDRI-NNNN patient folders")
    splits = _splits(patients)
    return [Item(key=p, subject=p, source=f"{MARKER}/{p}", split=splits[p]) for p in patients]


# --------------------------------------------------------------------------- series

def _series(patient: Path) -> list[tuple[Path, str, int]]:
    """``(folder, modality, number of .dcm files)`` of every series folder of the patient."""
    import pydicom

    out = []
    for folder in sorted({f.parent for f in patient.rglob("*.dcm")}):
        files = sorted(folder.glob("*.dcm"))
        modality = "?"
        for f in files:
            try:
                modality = str(pydicom.dcmread(f, stop_before_pixels=True).get("Modality", "?"))
                break
            except Exception:  # noqa: BLE001 (a damaged file: try the next)
                continue
        out.append((folder, modality, len(files)))
    return out


def _assemble(folder: Path):
    """:func:`assemble` on the folder's ``.dcm`` files only (the reader XML beside them is not an image)."""
    from lib.data.dicom_lenient import DicomSeriesError, assemble

    try:
        return assemble(folder, files=list(folder.glob("*.dcm")))
    except DicomSeriesError as e:
        raise Refused(f"CT series {folder.name}: {e}") from None


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The body: voxels above ``BODY_HU``, their largest 3D connected component (the table and anything else
    apart from the body drop out), holes filled on each axial slice (the lungs)."""
    from scipy import ndimage

    labels, n = ndimage.label(hu > BODY_HU)
    if n == 0:
        raise Refused(f"no voxel above {BODY_HU:g} HU: no body")
    largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))))
    mask = labels == largest
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def _cube(array: np.ndarray, affine: np.ndarray, options: dict):
    """Resampled to cubic voxels, then cropped/padded to the cube around the body's bounding box."""
    from lib.data.io import Volume
    from lib.data.transforms import crop_or_pad, resample_isotropic, shift_affine

    v = resample_isotropic(Volume(array[None].astype(np.float32), affine), _spacing(options), order=1)
    body = np.argwhere(v.array[0] > BODY_HU)
    lo, hi = body.min(0), body.max(0) + 1
    shifted = shift_affine(v.affine, lo)
    sub = Volume(v.array[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], shifted)
    size = int(options.get("size") or 320)
    return crop_or_pad(sub, (size, size, size), value=float(AIR_HU))


# --------------------------------------------------------------------------- reader XML

def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _find(node, name: str):
    return [c for c in node if _local(c.tag) == name]


def _text(node, name: str) -> str:
    found = _find(node, name)
    return (found[0].text or "").strip() if found else ""


def _points_xy(node, name: str) -> list[tuple[float, float]]:
    return [(float(_text(e, "xCoord")), float(_text(e, "yCoord"))) for e in _find(node, name)]


def read_marks(path: Path) -> list[dict]:
    """Every reader mark of an LIDC XML: ``{reader, nodule_id, label, malignancy, marks: [(z, sop, [(x, y)])]}``
    (x: column, y: row; only the included ROIs of a nodule)."""
    root = ET.parse(path).getroot()
    out = []
    for r, session in enumerate(s for s in root.iter() if _local(s.tag) == "readingSession"):
        reader = _text(session, "servicingRadiologistID") or f"session{r + 1}"
        for nod in _find(session, "unblindedReadNodule"):
            chars = _find(nod, "characteristics")
            rois = [(float(_text(roi, "imageZposition") or "nan"), _text(roi, "imageSOP_UID"), _points_xy(roi, "edgeMap"))
                    for roi in _find(nod, "roi") if _text(roi, "inclusion").upper() != "FALSE"]
            out.append({"reader": reader, "nodule_id": _text(nod, "noduleID"), "label": "nodule" if chars else "nodule<3mm",
                        "malignancy": _text(chars[0], "malignancy") if chars else "", "marks": rois})
        for nn in _find(session, "nonNodule"):
            out.append({"reader": reader, "nodule_id": _text(nn, "nonNoduleID"), "label": "non-nodule", "malignancy": "",
                        "marks": [(float(_text(nn, "imageZposition") or "nan"), _text(nn, "imageSOP_UID"),
                                   _points_xy(nn, "locus"))]})
    return out


def _frame_for(frames: list, by_sop: dict, z: float, sop: str):
    if sop in by_sop:
        return by_sop[sop]
    near = min(frames, key=lambda f: abs(f.position[2] - z)) if np.isfinite(z) else None
    return near if near is not None and abs(near.position[2] - z) < 0.5 else None


def _points(marks: list[dict], frames: list, image_id: str, affine: np.ndarray, shape) -> tuple[list[dict], list[str]]:
    by_sop = {f.sop: f for f in frames if f.frame is None}
    points, notes = [], []
    for m in marks:
        world = [f.world(y, x) for z, sop, pts in m["marks"] if (f := _frame_for(frames, by_sop, z, sop)) for x, y in pts]
        if not world:
            notes.append(f"{m['reader']} {m['nodule_id']}: no mark on an image of the series: left out")
            continue
        lps = np.mean(world, axis=0)
        ras = np.array([-lps[0], -lps[1], lps[2]])
        ijk = np.round(np.linalg.solve(affine, [*ras, 1.0])[:3]).astype(int)
        points.append({"image_id": image_id, "label": m["label"], "x": round(float(ras[0]), 3), "y": round(float(ras[1]), 3),
                       "z": round(float(ras[2]), 3), "i": int(ijk[0]), "j": int(ijk[1]), "k": int(ijk[2]),
                       "reader": m["reader"], "nodule_id": m["nodule_id"], "malignancy": m["malignancy"],
                       "inside": int(bool(np.all(ijk >= 0) and np.all(ijk < np.array(shape[:3]))))})
    return points, notes


# --------------------------------------------------------------------------- convert

def _pick_ct(patient: Path) -> tuple[Path, list[str]]:
    series = _series(patient)
    ct = [s for s in series if s[1] == "CT"]
    if not ct:
        found = ", ".join(f"{m} ({n} file(s))" for _, m, n in series) or "no .dcm file"
        raise Refused(f"no CT series ({found})")
    best = max(ct, key=lambda s: s[2])
    other = [f"{m} {f.relative_to(patient).as_posix()} ({n} file(s))" for f, m, n in series if f != best[0]]
    return best[0], ([f"ignored {len(other)} other series: " + "; ".join(other)] if other else [])


def _write_drrs(out: Path, patient: str, hu: np.ndarray, spacing, options: dict) -> list[dict]:
    rows = []
    for a in angles(options):
        name = f"drr_{int(a):03d}" if float(a).is_integer() else f"drr_{a:g}"
        image = drr.radiograph(hu, spacing, a, size=int(options.get("drr_size") or 320), geometry=geometry(options))
        rows.append({"image_id": f"{patient}_{name}", "modality": "XR", "sequence": name,
                     **write_array(out, f"images/{patient}_{name}.npy", image), "dropped_images": 0})
    return rows


def convert(item: Item, src: Path, out: Path, options: dict) -> Output:
    patient = src / item.source
    folder, notes = _pick_ct(patient)
    series = _assemble(folder)
    array = series.array[0]
    mask = body_mask(array)
    removed = int(((array > BODY_HU) & ~mask).sum())
    array = np.where(mask, array, AIR_HU).astype(np.float32)
    cube = _cube(array, series.affine, options)
    hu = np.clip(np.round(cube.array[0]), float(options.get("hu_min", -1024.0)), float(options.get("hu_max", 1476.0)))
    fields = write_image(out, f"images/{item.key}_ct.nii.gz", hu.astype(np.int16), cube.affine, dtype=np.int16)
    image_id = f"{item.key}_ct"
    images = [{"image_id": image_id, "modality": "CT", "sequence": "ct", **fields,
               "series": folder.relative_to(src).as_posix(), "dropped_images": sum(series.dropped.values())}]
    images += _write_drrs(out, item.key, hu.astype(np.float32), cube.spacing, options)
    xml = sorted(folder.glob("*.xml"))
    points = []
    if xml:
        points, more = _points([m for x in xml for m in read_marks(x)], series.frames, image_id, cube.affine, hu.shape)
        notes += more
    else:
        notes.append("no reader XML in the CT series folder: no points")
    notes = series.notes + notes + [f"body mask: {removed} voxel(s) above {BODY_HU:g} HU outside the body "
                                    "(table, clothing) set to air"]
    return Output(images=images, points=points, note="; ".join(notes))
