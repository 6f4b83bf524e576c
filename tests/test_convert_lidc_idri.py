"""LIDC-IDRI: the raw fixture (lib.data.fixtures.lidc_idri) converted at a small size, every quirk accounted for,
HU cross-checked against SimpleITK, nodule marks on the nodule, X2CT-GAN's test patients in ``test``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from references import sitk_series
from scipy import ndimage

from lib.data import convert, drr, prepared
from lib.data.convert import lidc_idri as lidc
from lib.data.fixtures import lidc_idri as FIX

OPTIONS = {"size": 48, "spacing": 8.0, "drr_size": 32}


@pytest.fixture(scope="module")
def converted(convert_fixture):
    return convert_fixture("lidc_idri", options=OPTIONS)


def test_every_patient_is_converted_or_refused_with_its_reason(converted):
    _, facts, summary, ds = converted
    report = ds.report.set_index("source")
    assert summary["items"] == len(FIX.PATIENTS) == len(report)
    for pid, f in facts["patients"].items():
        assert report.loc[f"LIDC-IDRI/{pid}", "status"] == f["status"], pid
    reason = {pid: report.loc[f"LIDC-IDRI/{pid}", "reason"] for pid in FIX.PATIENTS}
    assert reason["LIDC-IDRI-0002"] == "no CT series (CR (1 file(s)))"
    assert reason["LIDC-IDRI-0001"].startswith("ignored 1 other series: CR ")  # the CR study beside the CT
    assert "dropped 1 of 36 files: 1 damaged (pixel data not decodable; first: 000036.dcm" in reason["LIDC-IDRI-0004"]
    assert "resampled: uneven slice gaps from 5 to 7.5 mm" in reason["LIDC-IDRI-0004"]
    assert all("set to air" in reason[p] for p in facts["series"])  # the table
    assert not any("unreadable" in r for r in reason.values())  # the reader XML is not taken for a damaged image
    by_id = ds.index.set_index("image_id")
    assert float(by_id.loc["LIDC-IDRI-0004_ct", "dropped_images"]) == 1
    assert set(ds.index["subject"]) == set(facts["series"])


def test_geometry_and_hu_of_the_written_cube(converted):
    _, facts, _, ds = converted
    for pid in facts["series"]:
        img = nib.load(ds.file(f"{pid}_ct"))
        assert img.shape == (48, 48, 48) and img.get_data_dtype() == np.int16
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.header.get_zooms(), 8.0)
        data = np.asanyarray(img.dataobj)
        assert data.min() >= -1024 and data.max() <= 1476


_sitk = sitk_series  # SimpleITK: the independent reader


def _on_grid(ref, img, mode="nearest"):
    """``ref`` resampled (trilinear) onto ``img``'s voxels (``mode="constant"``: air outside ``ref``)."""
    ijk = np.indices(img.shape).reshape(3, -1)
    m = np.linalg.solve(ref.affine, img.affine)
    src = m[:3, :3] @ ijk + m[:3, 3:4]
    return ndimage.map_coordinates(ref.get_fdata(), src, order=1, mode=mode, cval=-1000.0).reshape(img.shape)


@pytest.mark.parametrize("pid", ["LIDC-IDRI-0003", "LIDC-IDRI-0007"])
def test_hu_match_simpleitk_inside_the_body_and_the_table_is_gone(converted, pid):
    """SimpleITK's volume resampled onto the written grid: within 1 HU (rounding) wherever every trilinear
    neighbour lies in the body (the body mask eroded by more than a native voxel); the table's voxels, dense
    in the DICOM, are air (-1024) in the written cube, and so is everything outside the body."""
    tmp, facts, _, ds = converted
    f = facts["patients"][pid]
    ref = _sitk(tmp / "raw" / f["ct_series"])
    img = nib.load(ds.file(f"{pid}_ct"))
    ours, theirs = img.get_fdata(), _on_grid(ref, img)
    inside = ndimage.binary_erosion(ours > -1024, iterations=2)  # 16 mm > 2 native voxels of 6.5 mm
    assert inside.sum() > 2000
    assert np.abs(ours[inside] - theirs[inside]).max() <= 1.0
    theirs = _on_grid(ref, img, mode="constant")
    table = (theirs > 0) & ~ndimage.binary_dilation(ours > -1024, iterations=1)
    lo, hi = f["table_lps_y"]
    y_ras = (img.affine @ np.vstack([np.indices(img.shape).reshape(3, -1), np.ones((1, ours.size))]))[1].reshape(img.shape)
    assert table.sum() > 50 and np.all((-y_ras[table] <= hi + 8) & (-y_ras[table] >= lo - 8))  # it is the table
    assert np.all(ours[table] == -1024)
    assert (ours > -500).sum() > 0.9 * ((theirs > -500) & ~table).sum()  # the body is kept


def test_nodule_marks_land_on_the_nodule(converted):
    _, facts, _, ds = converted
    points = ds.points
    expected = [(pid, n) for pid, f in facts["patients"].items() for n in f["nodules"]]
    assert len(points) == len(expected)
    for pid, n in expected:
        rows = points[(points["image_id"] == f"{pid}_ct") & (points["reader"] == n["reader"])
                      & (points["nodule_id"] == n["nodule_id"])]
        assert len(rows) == 1, (pid, n)
        p = rows.iloc[0]
        assert p["label"] == n["label"] and p["malignancy"] == n["malignancy"] and p["inside"] == "1"
        np.testing.assert_allclose([float(p["x"]), float(p["y"]), float(p["z"])], n["ras"], atol=0.5)
        img = nib.load(ds.file(f"{pid}_ct"))
        ijk = np.array([int(p["i"]), int(p["j"]), int(p["k"])])
        assert np.abs(img.affine @ [*ijk, 1] - [*n["ras"], 1]).max() <= 4.0 + 1e-6  # the nearest voxel
        if n["label"] == "nodule":
            assert img.get_fdata()[tuple(ijk)] > 300  # in the dense sphere (lung around it: -850 HU)
    assert {"nodule", "nodule<3mm", "non-nodule"} == set(points["label"])


def test_splits_follow_x2ct_gan(converted):
    _, facts, _, ds = converted
    split = ds.index.groupby("subject")["split"].agg(set)
    assert all(len(s) == 1 for s in split)  # no subject in two splits
    for pid in facts["series"]:
        assert split[pid] == ({"test"} if pid in lidc.X2CT_TEST else {"train", "val"} & split[pid]), pid
    assert {"LIDC-IDRI-0003", "LIDC-IDRI-0007"} <= lidc.X2CT_TEST and len(lidc.X2CT_TEST) == 102
    assert set(ds.index["split"]) == {"train", "val", "test"}
    assert lidc._splits([f"LIDC-IDRI-{n:04d}" for n in range(1, 1019)]) == lidc._splits(
        [f"LIDC-IDRI-{n:04d}" for n in range(1018, 0, -1)])  # order-free
    full = lidc._splits([f"LIDC-IDRI-{n:04d}" for n in range(1, 1019)])
    assert sum(v == "test" for v in full.values()) == 102 and sum(v == "val" for v in full.values()) == 92


def test_drrs_are_written_with_their_geometry(converted):
    _, facts, _, ds = converted
    g = drr.Geometry(**ds.info["drr"]["geometry"])
    assert g == drr.Geometry() and ds.info["drr"]["angles"] == [0.0, 90.0] and ds.info["drr"]["size"] == 32
    assert ds.info["preparation"]["spacing_mm"] == 8.0 and ds.info["preparation"]["hu_range"] == [-1024.0, 1476.0]
    xr = ds.images(modality="XR")
    assert set(xr["sequence"]) == {"drr_000", "drr_090"} and len(xr) == 2 * len(facts["series"])
    for pid in facts["series"]:
        ct = nib.load(ds.file(f"{pid}_ct"))
        for angle in (0, 90):
            image = np.load(ds.file(f"{pid}_drr_{angle:03d}"))
            assert image.shape == (32, 32) and image.dtype == np.float32 and image.max() > 0.1
            again = drr.radiograph(ct.get_fdata().astype(np.float32), (8.0, 8.0, 8.0), angle, size=32, geometry=g)
            np.testing.assert_array_equal(image, again)


def test_rerun_skips_everything(converted):
    tmp, facts, _, ds = converted
    again = convert.run("lidc_idri", tmp / "raw", tmp / "prepared", options=OPTIONS, progress=False)
    assert again["converted"] == 0 and again["skipped"] == len(facts["series"]) and again["refused"] == 1
    assert len(prepared.open_dataset(tmp / "prepared").index) == len(ds.index)


def test_xml_reader_accepts_any_namespace(tmp_path):
    for ns in (True, False):
        xml = FIX._xml([{"reader": "9", "nodules": [{"id": "N1", "malignancy": 3, "rois": [(1.5, "1.2", [(4, 5), (6, 7)])]},
                                                    {"id": "N2", "malignancy": None, "rois": [(2.5, "1.3", [(1, 2)])]}],
                         "non_nodules": [("NN1", 3.0, "1.4", (8, 9))]}], "1.9", namespace=ns)
        (tmp_path / "x.xml").write_text(xml)
        marks = lidc.read_marks(tmp_path / "x.xml")
        assert [(m["label"], m["malignancy"]) for m in marks] == [("nodule", "3"), ("nodule<3mm", ""), ("non-nodule", "")]
        assert marks[0]["marks"] == [(1.5, "1.2", [(4.0, 5.0), (6.0, 7.0)])] and marks[2]["reader"] == "9"


def test_fixture_cli(tmp_path, capsys):
    from lib.data.fixtures.__main__ import main

    assert main(["lidc_idri", "--out", str(tmp_path / "raw")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "lidc_idri" and out["series"] == sum(s == "converted" for _, _, s in FIX.PATIENTS.values())
    assert len(list((tmp_path / "raw" / "LIDC-IDRI").iterdir())) == len(FIX.PATIENTS)
    assert {p.name for p in (tmp_path / "raw").rglob("*.dcm")} >= {"1-001.dcm", "000001.dcm"}  # both namings
