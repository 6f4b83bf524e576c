"""Longitudinal radiograph pairs rendered from real chest CT: a prepared CT dataset -> a prepared CXR-pair dataset.

    python -m lib.data.convert ct_to_cxr_pairs --src <data root>/prepared/lidc_idri --out <data root>/prepared/ct_to_cxr_pairs

The approach of Longitudinal_MIM on real anatomy: ``--src`` is a *prepared* dataset (its ``dataset.json`` is
the marker; e.g. a converted LIDC-IDRI), and every CT image of it (modality CT) is one item, keeping its
subject and split (a test CT only makes test pairs). For each of ``--pairs-per-case`` pairs, as the built-in
cohort does on phantoms (:func:`lib.data.demo.cxr_pair`):

- the findings: with probability 0.3 one persistent finding (in both CTs); unless the pair is nuisance-only
  (``--nuisance-only-fraction``), one or two changes, each appeared (60 %, follow-up only) or resolved
  (baseline only), drawn from ``--findings`` (:data:`lib.data.findings.FINDINGS`) without repeating a kind
  while others are left; inserted into the CT's threshold lung mask (:mod:`lib.data.findings`);
- a nuisance pose per time point (a turn about the Superior axis and a tilt about the Right axis, each
  uniform in +-``--nuisance-deg``) and an exposure gain (0.95..1.05) with noise (sd 0.004), as the demo;
- ``baseline`` = DRR(baseline CT at the baseline pose), ``followup`` = DRR(follow-up CT at the follow-up pose)
  and ``change`` = DRR(follow-up CT) - DRR(baseline CT), both at the follow-up pose and without gain or
  noise, cleaned as :func:`lib.data.demo.clean_change` (positive = more attenuation appeared; note that a
  pneumothorax *removes* attenuation: its change is negative where it appears). A nuisance-only pair has
  an all-zero change map.

Written: ``images/<subject>/<n>/baseline.npy``, ``followup.npy`` (index rows, modality XR, square float32
DRRs of ``--image-size`` px, rows superior->inferior, the patient's right on the image's left) and
``change.npy`` (``pairs.csv`` ``target_path``), with ``n`` = the CT's rank among its subject's CTs x
pairs-per-case + k, so two CTs of one subject never share a folder. ``pairs.csv`` carries the demo's extras
(appeared, resolved, persistent (``;``-joined kinds), nuisance_only, pose_deg_baseline / _followup (about S),
gain_baseline / _followup, changed_px), the tilts (pose_tilt_deg_*), the findings' centres and sizes
(``findings``, JSON) and ``source_image`` (the CT's image_id). Each pair draws from its own generator, seeded
by (the CT's image_id, k): a re-run or a shard gives identical files. ``--spacing`` is ignored (the
outputs are 2D). :func:`project` is the only place a DRR is made (parallel beams today).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.data import drr
from lib.data import findings as fd
from lib.data.convert import Item, Output, Refused
from lib.data.prepared import write_array

NAME, VERSION, MARKER = "ct_to_cxr_pairs", "1", "dataset.json"
FROM_PREPARED = "lidc_idri"  # the default source (--src takes any prepared chest CT)
SPLIT_SEED, SPLIT_FRACTIONS = 0, (0.8, 0.1, 0.1)
SEED = 5  # mixed into every pair's seed (bump VERSION with it)
MIN_LUNG_ML = 300.0  # a CT with less lung than this is refused (not a chest CT, or no lungs in the field)
PERSISTENT_P, APPEARED_P, NOISE_SD, GAIN = 0.3, 0.6, 0.004, (0.95, 1.05)
INFO = {  # completed by items() from the source's dataset.json (where the CTs came from, their licence)
    "source": "prepared:<a chest CT dataset>",
    "licence": "that of the source CT dataset",
    "description": "frontal radiograph pairs (DRRs) of chest CTs with inserted findings and their signed change maps",
    "channels": {"XR": ["line integral"]},
    "labels": {"pairs.csv": {"target_path": "signed change map: + appeared (more attenuation), - resolved",
                             "appeared": "finding kinds", "resolved": "finding kinds", "persistent": "finding kinds"}},
    "findings": list(fd.FINDINGS),
    "drr": drr.parameters(),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs-per-case", type=int, default=4, help="pairs rendered from each CT (default 4)")
    parser.add_argument("--image-size", type=int, default=512, help="radiograph size in px (default 512)")
    parser.add_argument("--findings", default="nodule,consolidation,effusion",
                        help=f"comma-separated finding kinds to insert, of {', '.join(fd.FINDINGS)}")
    parser.add_argument("--nuisance-deg", type=float, default=5.0, help="largest nuisance rotation, degrees (default 5)")
    parser.add_argument("--nuisance-only-fraction", type=float, default=0.25,
                        help="fraction of pairs where nothing changes but pose and exposure (default 0.25)")
    parser.add_argument("--view-angle", type=float, default=0.0, help="view angle about S, degrees (0 frontal, 90 lateral)")


def _kinds(options: dict) -> list[str]:
    kinds = [k.strip() for k in str(options.get("findings", "")).split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(fd.FINDINGS))
    if unknown or not kinds:
        raise ValueError(f"--findings {options.get('findings')!r}: give some of {', '.join(fd.FINDINGS)}")
    return kinds


def info(src: Path, options: dict) -> dict:
    """``dataset.json``'s fields that depend on the source CT dataset and the options (merged into :data:`INFO`)."""
    from lib.data.prepared import open_dataset

    ds = open_dataset(src, check_files=False)
    name = ds.info.get("name", src.name)
    return {"source": f"prepared:{name} ({ds.info.get('source', '')})",
            "licence": f"derived from {name}; its licence applies: {ds.info.get('licence', 'unknown')}",
            "ct_source": {k: ds.info.get(k, "") for k in ("name", "source", "licence", "converter", "converter_version")},
            "drr": drr.parameters(), "findings": _kinds(options)}


def items(src: Path, options: dict) -> list[Item]:
    from lib.data.prepared import open_dataset

    _kinds(options)  # a bad --findings stops the run here, not in every item
    ds = open_dataset(src)
    cts = ds.images(modality="CT")
    rank: dict[str, int] = {}
    out = []
    for row in cts.itertuples():
        n = rank[row.subject] = rank.get(row.subject, -1) + 1
        out.append(Item(key=row.image_id, subject=row.subject, source=row.path, split=row.split,
                        payload={"image_id": row.image_id, "path": row.path, "rank": n}))
    return out


# --------------------------------------------------------------------------- one pair

@dataclass
class Plan:
    """What one pair shows: finding kinds per role, poses ``(about S, about R)`` degrees, gains."""

    persistent: list[str] = field(default_factory=list)
    appeared: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)
    nuisance_only: bool = False
    pose_baseline: tuple[float, float] = (0.0, 0.0)
    pose_followup: tuple[float, float] = (0.0, 0.0)
    gain_baseline: float = 1.0
    gain_followup: float = 1.0


def pair_rng(image_id: str, k: int) -> np.random.Generator:
    """The generator of pair ``k`` of a CT: from a stable hash of its image_id, not of the run or shard."""
    h = int(hashlib.sha256(image_id.encode()).hexdigest()[:15], 16)
    return np.random.default_rng(np.random.SeedSequence([SEED, h, k]))


def plan_pair(rng: np.random.Generator, kinds: list[str], nuisance_deg: float, nuisance_only_fraction: float) -> Plan:
    """Sample a pair's findings, poses and gains (the demo's recipe, :func:`lib.data.demo.cxr_pair`)."""
    plan = Plan(nuisance_only=bool(rng.random() < nuisance_only_fraction))
    order = [str(k) for k in rng.permutation(kinds)]
    drawn = iter(order * 3)
    if rng.random() < PERSISTENT_P:
        plan.persistent.append(next(drawn))
    if not plan.nuisance_only:
        for _ in range(int(rng.integers(1, 3))):
            (plan.appeared if rng.random() < APPEARED_P else plan.resolved).append(next(drawn))
    pose = rng.uniform(-nuisance_deg, nuisance_deg, 4) if nuisance_deg > 0 else np.zeros(4)
    plan.pose_baseline, plan.pose_followup = (float(pose[0]), float(pose[1])), (float(pose[2]), float(pose[3]))
    plan.gain_baseline, plan.gain_followup = (float(g) for g in rng.uniform(*GAIN, 2))
    return plan


def project(hu: np.ndarray, spacing, pose: tuple[float, float], view_deg: float, size: int) -> np.ndarray:
    """The radiograph of ``hu`` at a nuisance ``pose`` (degrees about S, about R) seen from ``view_deg``: the
    one place this converter makes a DRR (switch it here to another geometry)."""
    turned = fd.rotate(hu, spacing, about_s=pose[0], about_r=pose[1])
    return drr.radiograph(turned, spacing, view_deg, size)


def render_pair(hu: np.ndarray, spacing, lung: np.ndarray, plan: Plan, rng: np.random.Generator, size: int,
                view_deg: float = 0.0, affine=None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """``baseline``, ``followup`` and ``change`` images of a planned pair, and the inserted findings' records."""
    from lib.data.demo import clean_change

    records = []

    def add(volume, kinds, role):
        for kind in kinds:
            volume, rec = fd.insert(kind, volume, spacing, lung, rng, affine=affine)
            records.append({"role": role, **rec.__dict__})
        return volume

    common = add(hu, plan.persistent, "persistent")
    base = add(common, plan.resolved, "resolved")
    follow = add(common, plan.appeared, "appeared")
    baseline = project(base, spacing, plan.pose_baseline, view_deg, size)
    followup = project(follow, spacing, plan.pose_followup, view_deg, size)
    same = not plan.resolved and not plan.appeared
    change = np.zeros_like(followup) if same else clean_change(followup - project(base, spacing, plan.pose_followup, view_deg, size))
    images = {"baseline": plan.gain_baseline * baseline + rng.normal(0, NOISE_SD, baseline.shape),
              "followup": plan.gain_followup * followup + rng.normal(0, NOISE_SD, followup.shape),
              "change": change}
    return {k: np.round(np.asarray(v, np.float32), 5) for k, v in images.items()}, records


def pair_facts(plan: Plan, records: list[dict], change: np.ndarray) -> dict:
    """The pair's extras of ``pairs.csv`` (the demo's columns, then the tilts and the findings)."""
    return {"appeared": ";".join(plan.appeared), "resolved": ";".join(plan.resolved),
            "persistent": ";".join(plan.persistent), "nuisance_only": int(plan.nuisance_only),
            "pose_deg_baseline": round(plan.pose_baseline[0], 3), "pose_deg_followup": round(plan.pose_followup[0], 3),
            "gain_baseline": round(plan.gain_baseline, 4), "gain_followup": round(plan.gain_followup, 4),
            "changed_px": int((change != 0).sum()),
            "pose_tilt_deg_baseline": round(plan.pose_baseline[1], 3), "pose_tilt_deg_followup": round(plan.pose_followup[1], 3),
            "findings": json.dumps(records, separators=(",", ":"))}


# --------------------------------------------------------------------------- the item

def _load_ct(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    from lib.data.io import load_volume

    volume = load_volume(path, channels=(1,))
    spacing = tuple(float(v) for v in np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0)))
    return volume.array[0], spacing, volume.affine


def convert(item: Item, src: Path, out: Path, options: dict) -> Output:
    p = item.payload
    hu, spacing, affine = _load_ct(src / p["path"])
    lung = fd.lung_mask(hu, spacing)
    lung_ml = float(lung.sum()) * float(np.prod(spacing)) / 1000.0
    if lung_ml < MIN_LUNG_ML:
        raise Refused(f"no lungs found ({lung_ml:.0f} mL under {fd.LUNG_THRESHOLD_HU:g} HU inside the body; "
                      f"need {MIN_LUNG_ML:g}): not a chest CT?")
    kinds, per, size = _kinds(options), int(options["pairs_per_case"]), int(options["image_size"])
    subject = item.subject.replace("/", "_")
    images, pairs = [], []
    for k in range(per):
        rng = pair_rng(p["image_id"], k)
        plan = plan_pair(rng, kinds, float(options["nuisance_deg"]), float(options["nuisance_only_fraction"]))
        arrays, records = render_pair(hu, spacing, lung, plan, rng, size, float(options["view_angle"]), affine)
        n = p["rank"] * per + k
        folder = f"images/{subject}/{n}"
        ids = {name: f"{subject}/{n}/{name}" for name in ("baseline", "followup")}
        for name, image_id in ids.items():
            images.append({"image_id": image_id, "modality": "XR", "sequence": name,
                           **write_array(out, f"{folder}/{name}.npy", arrays[name]), "source_image": p["image_id"]})
        write_array(out, f"{folder}/change.npy", arrays["change"])
        pairs.append({"pair": f"{subject}-{n}", "a": ids["baseline"], "b": ids["followup"],
                      "target_path": f"{folder}/change.npy", **pair_facts(plan, records, arrays["change"]),
                      "source_image": p["image_id"]})
    return Output(images=images, pairs=pairs,
                  note=f"{per} pair(s), lungs {lung_ml:.0f} mL, CT {'x'.join(map(str, hu.shape))} at "
                       f"{'x'.join(f'{s:g}' for s in spacing)} mm")
