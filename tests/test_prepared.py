"""The prepared-dataset format (lib.data.prepared), the conversion engine (lib.data.convert) on a toy
converter, and where prepared and raw data are found (lib.data.locate)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from lib.data import convert as engine
from lib.data import locate, prepared
from lib.data.cache import sha256_of
from lib.data.convert import Item, Output, Refused

# --------------------------------------------------------------------------- a toy converter (this module is one)

NAME, VERSION, MARKER = "toy", "1", "list.csv"
INFO = {"source": "test", "licence": "none", "channels": {"MRI": ["intensity"]}, "labels": {"labels.csv": ["value"]}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-value", type=float, default=None)


def items(src: Path, options: dict) -> list[Item]:
    table = pd.read_csv(src / MARKER, dtype=str)
    return [Item(key=r.name, subject=r.subject, source=f"raw/{r.name}", payload=r.value) for r in table.itertuples()]


def convert(item: Item, src: Path, out: Path, options: dict) -> Output:
    if item.payload == "refuse":
        raise Refused("told to refuse")
    value = float(item.payload)  # "bad" raises ValueError: refused with its reason by the engine
    if options["min_value"] is not None and value < options["min_value"]:
        raise Refused(f"filtered: value {value} < {options['min_value']}")
    fields = prepared.write_image(out, f"images/{item.key}.nii.gz", np.full((4, 5, 6), value, np.float32),
                                  np.diag([-2.0, 2.0, 3.0, 1.0]))
    return Output(images=[{"image_id": item.key, "modality": "MRI", "sequence": "T1w", **fields}],
                  labels=[{"image_id": item.key, "value": value}],
                  points=[{"image_id": item.key, "label": "c", "x": 0, "y": 0, "z": 0, "i": 1, "j": 0, "k": 0}],
                  note="ok")


TOY = sys.modules[__name__]


@pytest.fixture
def raw(tmp_path):
    rows = [{"name": f"img{i:02d}", "subject": f"s{i // 2}", "value": str(i)} for i in range(20)]
    rows[3]["value"], rows[7]["value"] = "bad", "refuse"
    src = tmp_path / "raw"
    src.mkdir()
    pd.DataFrame(rows).to_csv(src / MARKER, index=False)
    return src


def _index(out: Path) -> pd.DataFrame:
    return prepared.open_dataset(out).index.sort_values("image_id").reset_index(drop=True)


# --------------------------------------------------------------------------- the engine

def test_conversion_refuses_bad_items_and_goes_on(raw, tmp_path):
    summary = engine.run(TOY, raw, tmp_path / "out", progress=False)
    assert (summary["converted"], summary["refused"], summary["skipped"]) == (18, 2, 0)
    ds = prepared.open_dataset(tmp_path / "out")
    assert len(ds.index) == 18 and ds.info["converter_version"] == "1" and ds.info["format"] == prepared.FORMAT
    report = ds.report.set_index("source")
    assert report.loc["raw/img07", "reason"] == "told to refuse"
    assert report.loc["raw/img03", "reason"].startswith("ValueError: could not convert string to float")
    assert (report.drop(["raw/img03", "raw/img07"])["status"] == "converted").all()
    assert ds.index.groupby("subject")["split"].nunique().max() == 1
    assert set(ds.index["split"]) == {"train", "val", "test"}
    assert len(ds.labels) == 18 and len(ds.points) == 18


def test_rerun_skips_by_checksum_and_redoes_damaged_outputs(raw, tmp_path):
    out = tmp_path / "out"
    engine.run(TOY, raw, out, progress=False)
    before = _index(out)
    again = engine.run(TOY, raw, out, progress=False)
    assert (again["converted"], again["skipped"], again["refused"]) == (0, 18, 2)  # refused items are retried
    pd.testing.assert_frame_equal(_index(out), before)
    (out / "images" / "img05.nii.gz").write_bytes(b"damaged")
    third = engine.run(TOY, raw, out, progress=False)
    assert (third["converted"], third["skipped"]) == (1, 17)
    pd.testing.assert_frame_equal(_index(out), before)
    assert prepared.open_dataset(out).verify_checksums() == []


def test_a_new_converter_version_converts_again(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"
    engine.run(TOY, raw, out, progress=False)
    monkeypatch.setattr(TOY, "VERSION", "2")
    summary = engine.run(TOY, raw, out, progress=False)
    assert summary["converted"] == 18
    assert set(prepared.open_dataset(out).index["converter_version"]) == {"2"}


def test_shards_together_equal_one_run_and_workers_change_nothing(raw, tmp_path):
    engine.run(TOY, raw, tmp_path / "one", progress=False)
    a = engine.run(TOY, raw, tmp_path / "sharded", shard="1/2", progress=False)
    b = engine.run(TOY, raw, tmp_path / "sharded", shard="2/2", progress=False)
    assert 0 < a["items"] < 20 and a["items"] + b["items"] == 20
    cols = ["image_id", "subject", "split", "path", "sha256"]
    pd.testing.assert_frame_equal(_index(tmp_path / "sharded")[cols], _index(tmp_path / "one")[cols])
    engine.run(TOY, raw, tmp_path / "workers", workers=2, progress=False)
    pd.testing.assert_frame_equal(_index(tmp_path / "workers")[cols], _index(tmp_path / "one")[cols])


def test_limit_options_and_bad_arguments(raw, tmp_path):
    summary = engine.run(TOY, raw, tmp_path / "out", limit=5, options={"min_value": 2.0}, progress=False)
    assert summary["items"] == 5
    report = prepared.open_dataset(tmp_path / "out").report
    assert report["reason"].str.startswith("filtered: value 0.0").sum() == 1
    for shard in ("3/2", "0/2", "x"):
        with pytest.raises(ValueError, match="--shard"):
            engine.parse_shard(shard)
    with pytest.raises(FileNotFoundError, match="no list.csv"):
        engine.run(TOY, tmp_path, tmp_path / "o2", progress=False)
    with pytest.raises(ValueError, match="unknown dataset 'nope'; converters: .*openmind"):
        engine.get("nope")


def test_cli_needs_a_raw_download(tmp_path, monkeypatch, capsys):
    from lib.data.convert.__main__ import main

    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(tmp_path / "input"))
    assert main(["openmind", "--quiet"]) == 2
    assert "python -m lib.data.manifest fetch openmind" in capsys.readouterr().err


# --------------------------------------------------------------------------- the format's checks

def test_write_image_is_ras_and_keeps_world_positions(tmp_path):
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    lps_like = np.array([[-1.5, 0, 0, 10], [0, 0, 2.0, -5], [0, -1.0, 0, 3], [0, 0, 0, 1]])  # axes to L, I, A
    fields = prepared.write_image(tmp_path, "a.nii.gz", array, lps_like)
    img = nib.load(tmp_path / "a.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert fields["shape"] == "5 7 6" and fields["spacing_mm"] == "1.5 2 1"
    data = img.get_fdata()
    for ijk in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:  # the same world point holds the same value
        world = lps_like @ [*ijk, 1]
        i, j, k = np.round(np.linalg.inv(img.affine) @ world)[:3].astype(int)
        assert data[i, j, k] == pytest.approx(array[ijk])
    assert fields["sha256"] == sha256_of(tmp_path / "a.nii.gz")
    assert prepared.write_image(tmp_path, "a.nii.gz", array, lps_like) == fields  # same voxels, same bytes


@pytest.fixture
def dataset(raw, tmp_path):
    out = tmp_path / "out"
    engine.run(TOY, raw, out, progress=False)
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.drop(columns="sha256"), "index.csv: missing column"),
    (lambda d: d.assign(modality="PET"), "column modality: 'PET' not one of MRI, CT, XR"),
    (None, "more than one split"),
    (lambda d: d.assign(path="/etc/passwd"), "must be relative"),
    (lambda d: d.assign(path="images/missing.nii.gz"), "does not exist"),
    (lambda d: pd.concat([d, d.iloc[:1]]), "image_id not unique"),
])
def test_open_dataset_names_what_is_wrong(dataset, damage, message):
    index = pd.read_csv(dataset / "index.csv", dtype=str, keep_default_na=False)
    if "more than one split" in message:  # two images of one subject in different splits
        first = index["subject"].iloc[0]
        index.loc[index.index[index["subject"] == first][0], "split"] = "test" if index["split"].iloc[0] != "test" else "val"
        damaged = index
    else:
        damaged = damage(index)
    damaged.to_csv(dataset / "index.csv", index=False)
    with pytest.raises(prepared.DatasetFormatError, match=message):
        prepared.open_dataset(dataset)


def test_open_dataset_checks_tables_and_header(dataset):
    pd.DataFrame([{"image_id": "nope", "value": 1}]).to_csv(dataset / "labels.csv", index=False)
    with pytest.raises(prepared.DatasetFormatError, match="labels.csv: column image_id: image_id.*nope"):
        prepared.open_dataset(dataset)
    (dataset / "labels.csv").unlink()
    (dataset / "dataset.json").write_text('{"format": "other/9"}')
    with pytest.raises(prepared.DatasetFormatError, match="dataset.json: missing key"):
        prepared.open_dataset(dataset)
    (dataset / "dataset.json").unlink()
    with pytest.raises(prepared.DatasetFormatError, match="not a prepared dataset"):
        prepared.open_dataset(dataset)


def test_accessors(dataset):
    ds = prepared.open_dataset(dataset)
    train = ds.files("MRI", "train")
    assert train and all(p.is_file() for p in train)
    assert len(ds.files("CT")) == 0
    assert ds.counts()["total"].sum() == 18
    assert set(ds.label_table()["value"].astype(float)) == set(ds.labels["value"].astype(float))
    assert len(ds.refused()) == 2
    with pytest.raises(ValueError, match="modality must be one of"):
        ds.images("PET")


def test_assign_splits_is_seeded_and_fills_every_split():
    subjects = [f"s{i}" for i in range(30)]
    a, b = prepared.assign_splits(subjects, 3), prepared.assign_splits(list(reversed(subjects)), 3)
    assert a == b and prepared.assign_splits(subjects, 4) != a
    assert pd.Series(a).value_counts().to_dict() == {"train": 24, "val": 3, "test": 3}
    assert set(prepared.assign_splits(["a", "b", "c"]).values()) == {"train", "val", "test"}


# --------------------------------------------------------------------------- finding data

def test_require_prepared_says_what_to_fetch_and_convert(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(tmp_path / "input"))
    with pytest.raises(FileNotFoundError) as e:
        locate.require_prepared("openmind,rsna2025_aneurysm")
    for name in ("openmind", "rsna2025_aneurysm"):
        assert f"python -m lib.data.manifest fetch {name}" in str(e.value)
        assert f"python -m lib.data.convert {name} --src" in str(e.value)
    raw = tmp_path / "input" / "competitions" / "rsna-intracranial-aneurysm-detection"
    (raw / "series").mkdir(parents=True)
    (raw / "train.csv").write_text("SeriesInstanceUID\n")
    with pytest.raises(FileNotFoundError, match=f"raw download is at {raw}. Convert it with: python -m lib.data.convert "
                                                f"rsna2025_aneurysm --src {raw}"):
        locate.require_prepared(["rsna2025_aneurysm"])
    with pytest.raises(ValueError, match="neither a prepared dataset folder nor a dataset name"):
        locate.require_prepared("nonsense")


def test_prepared_datasets_are_found_by_path_name_and_attachment(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(tmp_path / "input"))
    assert locate.require_prepared(str(dataset)) == [dataset.resolve()]
    attached = tmp_path / "input" / "datasets" / "me" / "prepared-data" / "openmind"
    attached.parent.mkdir(parents=True)
    dataset.rename(attached)
    assert locate.require_prepared("openmind") == [attached]
    local = tmp_path / "data" / "prepared" / "openmind"
    local.parent.mkdir(parents=True)
    attached.rename(local)
    assert locate.require_prepared(["openmind"]) == [local]


def test_survey_of_a_prepared_dataset(dataset):
    from lib.data import survey

    tables = survey.prepared_tables(dataset, refused_rows=5)
    assert tables["counts"]["total"].sum() == 18
    geometry = tables["geometry"].reset_index()
    assert len(geometry) == 1 and geometry.loc[0, "images"] == 18
    assert [geometry.loc[0, f"median spacing {a} (mm)"] for a in "xyz"] == [2.0, 2.0, 3.0]
    assert geometry.loc[0, "smallest shape"] == geometry.loc[0, "largest shape"] == "4 5 6"
    assert tables["report"].loc["refused", "items"] == 2 and tables["report"].loc["converted", "items"] == 18
    assert set(tables["refused"]["source"]) == {"raw/img03", "raw/img07"}


def test_the_readmes_conversion_commands_parse():
    import shlex

    from lib import paths
    from lib.data.convert.__main__ import _parser

    lines = [line.strip() for line in (paths.ROOT / "README.md").read_text().splitlines()
             if line.strip().startswith("python -m lib.data.convert ")]
    assert len(lines) >= 3
    for line in lines:
        argv = shlex.split(line.split("#")[0])[3:]
        args = _parser(argv[0]).parse_args(argv)
        assert args.dataset in engine.names()


def test_merge_takes_an_images_rows_from_the_part_that_converted_it_last(tmp_path):
    def part(name, index, points):
        prepared.write_table(tmp_path / "parts" / name, "index.csv", index, prepared.INDEX_COLUMNS)
        prepared.write_table(tmp_path / "parts" / name, "points.csv", points, prepared.POINT_COLUMNS)

    row = {"subject": "s", "dataset": "d", "modality": "CT", "sequence": "CT", "split": "train", "shape": "1 1 1",
           "spacing_mm": "1 1 1", "sha256": "x", "source": "raw"}
    point = {"label": "lesion", "x": 0, "y": 0, "z": 0, "i": 0, "j": 0, "k": 0}
    part("1-of-2", [{"image_id": "a", "path": "old.nii.gz", **row}, {"image_id": "b", "path": "b.nii.gz", **row}],
         [{"image_id": "a", **point, "x": 9}, {"image_id": "b", **point}])
    part("2-of-2", [{"image_id": "a", "path": "new.nii.gz", **row}],
         [{"image_id": "a", **point}, {"image_id": "a", **point}])  # two lesions, identical rows: both kept
    counts = engine.merge(tmp_path)
    index = pd.read_csv(tmp_path / "index.csv").set_index("image_id")
    points = pd.read_csv(tmp_path / "points.csv")
    assert counts["index"] == 2 and index.loc["a", "path"] == "new.nii.gz"
    assert list(points["image_id"]) == ["b", "a", "a"] and set(points["x"]) == {0}


def test_a_subject_in_two_of_the_datasets_own_splits_is_warned_about():
    items_ = [Item("1", "p1", "s1", split="train"), Item("2", "p1", "s2", split="test"), Item("3", "p2", "s3", split="val")]
    with pytest.warns(UserWarning, match="1 subject.*p1"):
        splits = engine.split_of(items_, TOY)
    assert splits == {"p1": "train", "p2": "val"}


def test_reruns_do_not_grow_the_part_report(raw, tmp_path):
    for _ in range(3):
        engine.run(TOY, raw, tmp_path / "out", progress=False)
    part = pd.read_csv(tmp_path / "out" / "parts" / "1-of-1" / "report.csv")
    assert len(part) == 20 and part["source"].is_unique
