"""MS-CXR-T over MIMIC-CXR-JPG: the raw fixture (lib.data.fixtures.ms_cxr_t) converted to radiograph pairs with labels."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from lib.data import convert, prepared
from lib.data.convert import ms_cxr_t as mct
from lib.data.fixtures import ms_cxr_t as fx

SIZE = 64


@pytest.fixture(scope="module")
def converted(convert_fixture):
    return convert_fixture("ms_cxr_t", options={"image_size": SIZE})


def test_pairs_labels_and_refusals(converted):
    _, facts, summary, ds = converted
    status = {s.split("/")[-1][:-4]: st for s, st in zip(ds.report["source"], ds.report["status"])}
    assert status == facts["pairs"] and summary["refused"] == 1
    report = ds.report.set_index("status")
    assert "prior image" in report.loc["refused", "reason"] and "not found" in report.loc["refused", "reason"]
    pairs = ds.pairs.set_index("dicom_id")
    for dicom, labels in facts["labels"].items():
        if facts["pairs"][dicom] == "converted":
            for f in fx.FINDINGS:
                assert pairs.loc[dicom, f"{f}_progression"] == labels.get(f, ""), (dicom, f)
    assert set(ds.pairs["target_path"]) == {""} and set(ds.pairs["split"]) == {"test"}
    assert set(ds.index["split"]) == {"test"} and set(ds.index["modality"]) == {"XR"}
    assert set(ds.pairs["subject"]) == {"10000032", "10000764", "12000022"}
    assert {"previous_dicom_id", "study_id", "previous_study_id", "pneumonia_label_quality"} <= set(ds.pairs.columns)
    assert set(ds.index["jpeg_mode"]) == {"L", "RGB"} and "Credentialed" in ds.info["licence"]


def test_images_are_letterboxed_squares_in_0_1(converted):
    _, facts, _, ds = converted
    for path in ds.files():
        x = np.load(path)
        assert x.shape == (SIZE, SIZE) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    g = facts["geometry"]  # a white 100 x 200 (w x h) prior: 32 px wide, centred, 16 px of padding each side
    prior = np.load(ds.file(ds.pairs.set_index("dicom_id").loc[g["prior_of"], "a"]))
    width = round(g["width"] * SIZE / g["height"])
    left = (SIZE - width) // 2
    assert np.all(prior[:, left:left + width] > 0.99) and not prior[:, :left].any() and not prior[:, left + width:].any()
    current = np.load(ds.file(ds.pairs.set_index("dicom_id").loc[g["prior_of"], "b"]))  # 160 x 120: rows 8..55
    rows = np.flatnonzero(current.sum(axis=1))
    assert rows[0] == 8 and rows[-1] == 55


def test_letterbox_geometry():
    wide = np.zeros((30, 90), np.float32)
    wide[:, :45] = 1.0  # the left half bright
    out = mct.letterbox(wide, 60)
    assert out.shape == (60, 60) and not out[:20].any() and not out[40:].any()
    assert out[20:40, :28].min() > 0.99 and out[20:40, 32:].max() < 0.01


def test_the_05_reader_and_the_dicom_paths(converted):
    from lib.data.datasets import CXRPairs

    _, _, _, ds = converted
    pairs = CXRPairs(ds.root, "test", 32)
    assert len(pairs) == 4
    with pytest.raises(ValueError, match="no CXR pairs"):
        CXRPairs(ds.root, "train", 32)
    assert not pairs.has_change  # no maps: target_path is empty
    item = pairs[0]
    assert "change" not in item and tuple(item["baseline"].shape) == tuple(item["followup"].shape) == (1, 32, 32)


def test_image_path_accepts_the_id_spellings():
    path = "p10/p10000032/s50414267/abc.jpg"
    for dicom in ("p10/p10000032/s50414267/abc", "files/p10/p10000032/s50414267/abc.jpg", "abc"):
        assert mct.image_path(dicom, "10000032", "50414267") == path
    with pytest.raises(ValueError):
        mct.image_path("abc", "", "")


def test_images_elsewhere_and_rerun(converted, tmp_path):
    tmp, _facts, first, ds = converted
    again = convert.run("ms_cxr_t", tmp / "raw", tmp / "prepared", options={"image_size": SIZE}, progress=False)
    assert again["skipped"] == first["converted"] and again["converted"] == 0
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(tmp / "raw" / fx.MARKER, raw / fx.MARKER)
    shutil.copytree(tmp / "raw" / "mimic-cxr-jpg", tmp_path / "physionet.org" / "files" / "mimic-cxr-jpg" / "2.0.0")
    with pytest.raises(FileNotFoundError, match="--images"):
        convert.run("ms_cxr_t", raw, tmp_path / "p", progress=False)
    convert.run("ms_cxr_t", raw, tmp_path / "p", progress=False,
                options={"image_size": SIZE, "images": str(tmp_path / "physionet.org" / "files" / "mimic-cxr-jpg" / "2.0.0")})
    other = prepared.open_dataset(tmp_path / "p")
    assert sorted(other.index["sha256"]) == sorted(ds.index["sha256"])
    # a files/ tree a few levels down is found without --images
    shutil.move(str(tmp_path / "physionet.org"), str(raw / "physionet.org"))
    assert mct.find_images(raw) == raw / "physionet.org" / "files" / "mimic-cxr-jpg" / "2.0.0" / "files"


def test_rgb_and_greyscale_jpegs_read_alike(tmp_path):
    grey = (np.arange(64 * 48).reshape(64, 48) % 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "l.jpg", quality=95)
    Image.fromarray(grey).convert("RGB").save(tmp_path / "rgb.jpg", quality=95)
    a, mode_a = mct.read_jpeg(tmp_path / "l.jpg")
    b, mode_b = mct.read_jpeg(tmp_path / "rgb.jpg")
    assert (mode_a, mode_b) == ("L", "RGB") and a.shape == b.shape == (64, 48) and np.abs(a - b).mean() < 0.02
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(convert.Refused, match="unreadable"):
        mct.read_jpeg(tmp_path / "bad.jpg")
