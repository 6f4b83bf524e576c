"""Coltea-Lung-CT-100W: the raw fixture (lib.data.fixtures.coltea_lung_ct_100w) converted: every quirk
accounted for, the splits, the registered phases on the native grid with their transforms in pairs.csv."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lib.data import convert, prepared
from lib.data import registration as reg
from lib.data.convert import coltea_lung_ct_100w as coltea

ANGLE_TOL_DEG, SHIFT_TOL_MM = 0.5, 1.0


@pytest.fixture(scope="module")
def converted(convert_fixture):
    return convert_fixture("coltea_lung_ct_100w")


def _floats(text: str) -> np.ndarray:
    return np.array(prepared.parse_tuple(text))


def test_every_patient_is_converted_or_refused_with_its_reason(converted):
    _, facts, summary, ds = converted
    report = ds.report.set_index("source")
    assert len(report) == len(facts["patients"]) == summary["items"]
    for patient, f in facts["patients"].items():
        assert report.loc[f"{facts['root']}/{patient}", "status"] == f["status"], patient
    reason = {f["quirk"]: report.loc[f"{facts['root']}/{p}", "reason"] for p, f in facts["patients"].items() if f["quirk"]}
    assert reason["no_native"].startswith("no NATIVE series")
    assert reason["no_folder"] == "listed in test_data.csv but the patient folder Coltea-Lung-CT-100W/MN07022021 is missing"
    assert "no VENOUS series: no venous pair" in reason["no_venous"] and "arterial registered" in reason["no_venous"]
    damaged = next(f for f in facts["patients"].values() if f["quirk"] == "damaged")["phases"]["arterial"]
    n = damaged["slices"]
    assert f"arterial: dropped 1 of {n} files: 1 damaged (pixel data not decodable; first: I{n - 1}: " in reason["damaged"]
    assert reason["not_in_csv"].startswith("in no split list (train_data.csv, test_data.csv): split seeded")
    for p, f in facts["patients"].items():
        if f["status"] == "converted":
            text = report.loc[f"{facts['root']}/{p}", "reason"]
            assert text.count(" registered: rotation ") == len(f["phases"]) - 1 and "CHECK" not in text, p


def test_splits_follow_the_csvs_with_a_seeded_val_from_train(converted):
    _, facts, _, ds = converted
    split = ds.index.drop_duplicates("subject").set_index("subject")["split"]
    assert (ds.index.groupby("subject")["split"].nunique() == 1).all()
    items = {it.key: it.split for it in coltea.items(converted[0] / "raw", {"phases": "arterial,venous"})}
    for patient in facts["csv"]["test"]:
        assert items[patient] == "test"
        assert patient not in split or split[patient] == "test"
    train = facts["csv"]["train"]
    assert sorted(items[p] for p in train) == ["train"] * (len(train) - 1) + ["val"]  # 10%, at least one
    val = next(p for p in train if items[p] == "val")
    assert split[val] == "val"  # the fixture's val patient is a converted one
    assert "val: one of the seeded 10% of the train_data.csv patients" in ds.report.set_index("source").loc[
        f"{facts['root']}/{val}", "reason"]
    assert items["KL06022021"] == "" and split["KL06022021"] in prepared.SPLITS  # seeded by the engine


def test_pairs_carry_the_registration_and_recover_the_known_motion(converted):
    _, facts, _, ds = converted
    pairs = ds.pairs.set_index("pair")
    expected = {f"{p}/{ph}" for p, f in facts["patients"].items() if f["status"] == "converted"
                for ph in f["phases"] if ph != "native"}
    assert set(pairs.index) == expected
    for column in ("target", "rotation_deg", "translation_mm", "center_mm", "metric", "mae_hu_before",
                   "mae_hu_after", "overlap"):
        assert column in pairs.columns
    for name, row in pairs.iterrows():
        patient, phase = name.split("/")
        assert (row["subject"], row["a"], row["b"], row["target"]) == (patient, f"{patient}_native", f"{patient}_{phase}", phase)
        true = np.asarray(facts["patients"][patient]["phases"][phase]["matrix"])
        center = _floats(row["center_mm"])
        shift = true[:3, :3] @ center + true[:3, 3] - center
        assert np.abs(_floats(row["rotation_deg"]) - reg.euler_angles(true)).max() < ANGLE_TOL_DEG, name
        assert np.abs(_floats(row["translation_mm"]) - shift).max() < SHIFT_TOL_MM, name
        assert float(row["mae_hu_after"]) < 0.6 * float(row["mae_hu_before"]), name
        assert 0.7 < float(row["overlap"]) <= 1.0 and float(row["metric"]) < 0, name


def test_registered_phases_lie_on_the_native_grid(converted):
    _, facts, _, ds = converted
    index = ds.index.set_index("image_id")
    for row in ds.pairs.itertuples():
        a, b = nib.load(ds.file(row.a)), nib.load(ds.file(row.b))
        assert a.shape == b.shape and np.array_equal(a.affine, b.affine), row.pair
        assert a.get_data_dtype() == np.int16 and b.get_data_dtype() == np.int16
        assert nib.aff2axcodes(a.affine) == ("R", "A", "S")
        assert index.loc[row.b, "sequence"] == row.target and index.loc[row.b, "modality"] == "CT"
        assert index.loc[row.b, "registered_to"] == row.a and index.loc[row.a, "sequence"] == "native"
        fixed, moving = np.asarray(a.dataobj, np.float32), np.asarray(b.dataobj, np.float32)
        inside = moving > -1024  # the resampled phase is -1024 only where it has no data
        assert reg.residual(fixed, moving, inside) == pytest.approx(float(row.mae_hu_after), rel=0.05, abs=2.0)
    patient = next(p for p, f in facts["patients"].items() if f["quirk"] == "damaged")
    assert index.loc[f"{patient}_arterial", "dropped_images"] == "1"


def test_a_rerun_skips_everything(converted):
    tmp, _, first, _ = converted
    again = convert.run("coltea_lung_ct_100w", tmp / "raw", tmp / "prepared", progress=False)
    assert (again["converted"], again["skipped"], again["refused"]) == (0, first["converted"], first["refused"])
    assert len(prepared.open_dataset(tmp / "prepared").pairs) == first["tables"]["pairs"]


def test_the_csv_reader_is_tolerant(tmp_path):
    for p in ("P1", "P2", "P3", "P4"):
        (tmp_path / p / "NATIVE").mkdir(parents=True)
    pd.DataFrame({"patient": ["P1", "P2", "P9"]}).to_csv(tmp_path / "train_data.csv", index=False)  # no index column
    pd.DataFrame({"x": [7], "test": ["P3"]}).to_csv(tmp_path / "test_data.csv")
    pd.DataFrame({"eval": ["P4"]}).to_csv(tmp_path / "eval_data.csv")  # an evaluation list: the val split
    items = {it.key: it for it in coltea.items(tmp_path, {"phases": "arterial"})}
    assert {k: it.split for k, it in items.items()} == {"P1": "train", "P2": "train", "P3": "test", "P4": "val", "P9": "train"}
    assert items["P1"].source == "P1"  # patients directly under --src
    with pytest.raises(ValueError, match="--phases"):
        coltea.items(tmp_path, {"phases": "delayed"})
