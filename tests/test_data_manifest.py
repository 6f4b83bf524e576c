import shutil
from pathlib import Path

import nibabel
import pandas as pd
import pytest

from lib import paths
from lib.data import manifest, survey

HEADER = ",".join(manifest.COLUMNS)


def test_the_committed_manifest_is_valid_and_lists_the_real_datasets():
    df = manifest.load_manifest()
    assert list(df.columns) == manifest.COLUMNS
    assert {"openmind", "rsna2025_aneurysm", "deeplesion", "lidc_idri", "ms_cxr_t"} <= set(df["dataset"])
    assert (df["source"] != "").all() and (df["licence"] != "").all() and (df["fetch"] != "").all()


def _write(tmp_path, *lines, header=HEADER):
    p = tmp_path / "m.csv"
    p.write_text("\n".join([header, *lines]) + "\n")
    return p


@pytest.mark.parametrize("line,message", [
    ("d,c1,training,CT,1,raw/a.nii,,,builtin:demo,x,,", "line 2: split 'training'"),
    ("d,c1,train,CT,1,raw/a.nii,,,ftp:host,x,,", "line 2: source 'ftp:host'"),
    ("d,c1,train,CT,1,/abs/a.nii,,,builtin:demo,x,,", "line 2: path '/abs/a.nii' must be relative"),
    ("d,c1,train,CT,1,../a.nii,,,builtin:demo,x,,", "must be relative"),
    ("d,c1,train,CT,three,raw/a.nii,,,builtin:demo,x,,", "line 2: channels 'three'"),
])
def test_bad_rows_are_reported_with_file_and_line(tmp_path, line, message):
    p = _write(tmp_path, line)
    with pytest.raises(ValueError) as e:
        manifest.load_manifest(p)
    assert str(p) in str(e.value) and message in str(e.value)


def test_missing_columns_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['licence'"):
        manifest.load_manifest(_write(tmp_path, header=HEADER.replace("licence,", "")))
    with pytest.raises(ValueError, match="manifest not found"):
        manifest.load_manifest(tmp_path / "nope.csv")


def test_summary_counts_listed_and_present_files(tmp_path):
    p = _write(tmp_path,
               "demo,c1,train,CT,1,raw/demo/c1.nii,,10,builtin:demo,x,,",
               "demo,c2,test,CT,1,raw/demo/c2.nii,,20,builtin:demo,x,,",
               "big,,,MRI;CT,1,raw/big/,,,hf:x/y,y,5,download")
    root = tmp_path / "data"
    (root / "raw/demo").mkdir(parents=True)
    (root / "raw/demo/c1.nii").write_bytes(b"x")
    (root / "raw/big/sub").mkdir(parents=True)
    (root / "raw/big/sub/a.nii").write_bytes(b"x")
    (root / "raw/big/b.nii").write_bytes(b"x")
    s = manifest.summarize(manifest.load_manifest(p), root).set_index("dataset")
    assert s.loc["demo", "listed_files"] == 2 and s.loc["demo", "present_files"] == 1
    assert s.loc["demo", "listed_bytes"] == 30 and s.loc["demo", "splits"] == "train=1, test=1"
    assert s.loc["big", "present_files"] == 2 and s.loc["big", "expected_files"] == 5
    assert s.loc["big", "modality"] == "CT, MRI"


NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


def test_survey_reads_headers_and_reports_unreadable_files(tmp_path):
    shutil.copy(NIBABEL_DATA / "anatomical.nii", tmp_path / "anatomical.nii")
    shutil.copy(NIBABEL_DATA / "example4d.nii.gz", tmp_path / "example4d.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip at all")
    (tmp_path / "notes.txt").write_text("ignored")
    df = survey.survey(tmp_path).set_index("file")
    assert list(df.index) == ["anatomical.nii", "broken.nii.gz", "example4d.nii.gz"]
    ref = nibabel.load(NIBABEL_DATA / "anatomical.nii")
    assert df.loc["anatomical.nii", "shape"] == ref.shape
    assert df.loc["anatomical.nii", "orientation"] == "".join(nibabel.aff2axcodes(ref.affine)) == "LAS"
    assert df.loc["example4d.nii.gz", "shape"] == (128, 96, 24, 2)
    assert "not a gzip file" in df.loc["broken.nii.gz", "error"] and pd.isna(df.loc["anatomical.nii", "error"])
    assert len(survey.survey(tmp_path, limit=1)) == 1
    assert survey.survey(tmp_path / "missing").empty


def test_middle_slice_is_the_ras_axial_middle(tmp_path):
    img = nibabel.load(NIBABEL_DATA / "anatomical.nii")
    canonical = nibabel.as_closest_canonical(img).get_fdata()
    sl = survey.middle_slice(NIBABEL_DATA / "anatomical.nii")
    import numpy as np

    np.testing.assert_allclose(sl, np.rot90(canonical[:, :, canonical.shape[2] // 2]))


def test_survey_reads_dicom_headers():
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm"))
    info = survey.header_info(ct)
    assert info["format"] == "dicom" and info["modality"] == "CT" and info["shape"] == (128, 128)
    assert survey.middle_slice(ct).min() < -500  # rescale intercept applied: air is negative HU


# --------------------------------------------------------------------------- verify and fetch

def _row(**kw):
    base = dict.fromkeys(manifest.COLUMNS, "")
    base.update(split="train", modality="CT", channels="1", source="builtin:test", licence="x", fetch="x")
    base.update(kw)
    return base


def test_verify_reports_missing_size_and_checksum_problems_per_file(tmp_path):
    import numpy as np

    root = tmp_path / "data"
    (root / "d").mkdir(parents=True)
    np.save(root / "d" / "a.npy", np.arange(4, dtype=np.float32))
    (root / "d" / "b.csv").write_text("x\n1\n")
    rows = [_row(dataset="d", case_id="a", path="d/a.npy", checksum=manifest.checksum(root / "d" / "a.npy")),
            _row(dataset="d", case_id="b", path="d/b.csv", checksum=manifest.checksum(root / "d" / "b.csv"),
                 bytes=str((root / "d" / "b.csv").stat().st_size)),
            _row(dataset="d", case_id="c", path="d/c.npy", checksum="array-sha256:00")]
    path = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=manifest.COLUMNS).to_csv(path, index=False)
    assert manifest.verify(data_root=root, manifest_path=path) == ["d/c.npy: missing (" + str(root / "d" / "c.npy") + ")"]
    np.save(root / "d" / "a.npy", np.arange(4, dtype=np.float32) + 1)   # same size, other values
    (root / "d" / "b.csv").write_text("x\n12\n")                         # other size
    problems = manifest.verify(data_root=root, manifest_path=path)
    assert any(p.startswith("d/a.npy: checksum") for p in problems)
    assert any(p.startswith("d/b.csv: size 5 bytes, manifest says 4") for p in problems)
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        manifest.verify("nope", data_root=root, manifest_path=path)


def test_verify_cli_exit_status(tmp_path, monkeypatch, capsys):
    from lib.data import demo

    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path))
    assert manifest.main(["verify", "--dataset", "smoke_cohort"]) == 1   # nothing built yet
    assert "missing" in capsys.readouterr().out
    demo.build(tmp_path / "smoke", "smoke", progress=False)
    for part in ("smoke_cohort", "smoke_cxr_pairs"):
        assert manifest.main(["verify", "--dataset", part]) == 0
    # the prepared-dataset tables are there but not checksummed (index.csv holds gzip bytes' sha256)
    assert all((tmp_path / "smoke" / name).is_file() for name in manifest.FORMAT_TABLES)
    listed = {r["path"].split("/", 1)[1] for r in manifest.rows_for_cohort(tmp_path / "smoke", "smoke")}
    assert not listed & set(manifest.FORMAT_TABLES) and {"subjects.csv", "cxr_pairs/pairs.csv"} <= listed


def _fake_kaggle(tmp_path):
    """A stand-in for the kaggle CLI that 'downloads' a zip into the -p folder and logs its arguments."""
    import stat
    import sys
    import zipfile

    payload = tmp_path / "payload.zip"
    with zipfile.ZipFile(payload, "w") as z:
        z.writestr("series/a.dcm", b"DICM-bytes")
    script = tmp_path / "kaggle"
    script.write_text(f"""#!{sys.executable}
import shutil, sys
args = sys.argv[1:]
open({str(tmp_path / 'args.txt')!r}, 'w').write(' '.join(args))
shutil.copy({str(payload)!r}, args[args.index('-p') + 1] + '/download.zip')
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_fetch_from_kaggle_with_and_without_credentials(tmp_path, monkeypatch):
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-config"))
    with pytest.raises(RuntimeError, match=r"kaggle.json in ~/.kaggle/.*accept the competition rules"):
        manifest.fetch("rsna2025_aneurysm", data_root=tmp_path / "data")
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    target = manifest.fetch("rsna2025_aneurysm", data_root=tmp_path / "data", kaggle=str(_fake_kaggle(tmp_path)))
    assert target == tmp_path / "data" / "raw" / "rsna2025_aneurysm"
    assert (target / "series" / "a.dcm").read_bytes() == b"DICM-bytes" and not list(target.glob("*.zip"))
    assert (tmp_path / "args.txt").read_text().startswith("competitions download -c rsna-intracranial-aneurysm-detection -p ")


def test_fetch_explains_manual_and_builtin_sources(tmp_path):
    with pytest.raises(RuntimeError, match="fetched by hand: TCIA collection LIDC-IDRI.*verify --dataset lidc_idri"):
        manifest.fetch("lidc_idri", data_root=tmp_path)
    with pytest.raises(RuntimeError, match="built, not fetched: python -m lib.data.demo --size demo"):
        manifest.fetch("demo_cohort", data_root=tmp_path)
