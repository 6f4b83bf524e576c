"""ct_to_cxr_pairs: radiograph pairs rendered from a prepared chest CT dataset (lib.data.fixtures.ct_to_cxr_pairs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lib.data import convert, prepared
from lib.data import findings as fd
from lib.data.convert import ct_to_cxr_pairs as ctx
from lib.data.fixtures.ct_to_cxr_pairs import GRID, chest_ct

SIZE = 48


@pytest.fixture(scope="module")
def converted(convert_fixture):
    return convert_fixture("ct_to_cxr_pairs", options={"image_size": SIZE, "pairs_per_case": 3})


def test_every_ct_becomes_pairs_in_its_own_split(converted):
    _, facts, summary, ds = converted
    report = ds.report.set_index("source")
    assert summary["converted"] == len(facts["cts"]) and summary["refused"] == 1
    assert "no lungs" in report.loc["images/sub-006/abdomen.nii.gz", "reason"]
    assert set(ds.pairs["source_image"]) == set(facts["cts"])  # the radiograph (XR) is no item
    assert len(ds.pairs) == 3 * len(facts["cts"]) and ds.pairs["pair"].is_unique
    for row in ds.pairs.itertuples():
        assert row.split == facts["cts"][row.source_image] == facts["splits"][row.subject]
    assert set(ds.index["modality"]) == {"XR"} and set(ds.index["shape"]) == {f"{SIZE} {SIZE}"}
    two = ds.pairs[ds.pairs["subject"] == "sub-001"]  # a subject with two CTs: six pairs, six folders
    assert len(two) == 6 and two["target_path"].is_unique
    assert ds.info["ct_source"]["name"] == "chest_fixture" and "CC0" in ds.info["licence"]
    assert ds.info["drr"] == ctx.drr.parameters() and ds.info["findings"] == ["nodule", "consolidation", "effusion"]


def test_the_05_reader_reads_them_like_the_demos(converted):
    from lib.data.datasets import CXRPairs

    _, _, _, ds = converted
    for split in ("train", "val", "test"):
        pairs = CXRPairs(ds.root, split, 32)
        item = pairs[0]
        assert pairs.has_change and {k: tuple(item[k].shape) for k in ("baseline", "followup", "change")} == {
            "baseline": (1, 32, 32), "followup": (1, 32, 32), "change": (1, 32, 32)}
    demo_extras = ["appeared", "resolved", "persistent", "nuisance_only", "pose_deg_baseline", "pose_deg_followup",
                   "gain_baseline", "gain_followup", "changed_px"]
    assert list(ds.pairs.columns[:6]) == ["pair", "subject", "split", "a", "b", "target_path"]
    assert list(ds.pairs.columns[6:15]) == demo_extras


def test_change_maps_have_the_sign_of_the_change(converted):
    _, _, _, ds = converted
    seen = set()
    for row in ds.pairs.itertuples():
        change = np.load(ds.root / row.target_path)
        assert change.dtype == np.float32 and int(row.changed_px) == int((change != 0).sum())
        if row.nuisance_only == "1":
            assert not row.appeared and not row.resolved and not change.any()
            seen.add("nuisance")
        elif row.appeared and not row.resolved and change.any():  # (a 5 mm nodule may vanish at 48 px)
            assert change.sum() > 0 and change.max() > -change.min()
            seen.add("appeared")
        elif row.resolved and not row.appeared and change.any():
            assert change.sum() < 0 and -change.min() > change.max()
            seen.add("resolved")
        roles = [f["role"] for f in json.loads(row.findings)]
        assert sorted(roles) == sorted(["persistent"] * bool(row.persistent) * len(row.persistent.split(";"))
                                       + ["appeared"] * len([k for k in row.appeared.split(";") if k])
                                       + ["resolved"] * len([k for k in row.resolved.split(";") if k]))
    assert seen == {"nuisance", "appeared", "resolved"}


def test_a_planned_pair_puts_its_change_where_the_finding_is():
    ct = chest_ct(4)
    hu, lung = ct["hu"], fd.lung_mask(ct["hu"], GRID.spacing)
    for role, sign in (("appeared", 1), ("resolved", -1)):
        plan = ctx.Plan(**{role: ["effusion"]})
        images, records = ctx.render_pair(hu, GRID.spacing, lung, plan, np.random.default_rng(0), 64)
        change = images["change"]
        assert sign * change.sum() > 0 and (sign * change >= 0).all()
        rows = np.flatnonzero(np.abs(change).sum(axis=1))
        assert rows.mean() > 32  # the effusion fills the lung base: the lower half of the image
        side = records[0]["side"]
        cols = np.flatnonzero(np.abs(change).sum(axis=0))
        assert (cols.mean() < 32) == (side == "right")  # the patient's right on the image's left
    same = ctx.render_pair(hu, GRID.spacing, lung, ctx.Plan(persistent=["nodule"], pose_baseline=(3, 1)),
                           np.random.default_rng(0), 64)[0]
    assert not same["change"].any() and not np.allclose(same["baseline"], same["followup"], atol=0.02)


def test_a_rerun_skips_and_a_fresh_run_gives_identical_files(converted, tmp_path):
    tmp, _facts, first, ds = converted
    options = {"image_size": SIZE, "pairs_per_case": 3}
    again = convert.run("ct_to_cxr_pairs", tmp / "raw", tmp / "prepared", options=options, progress=False)
    assert again["skipped"] == first["converted"] and again["converted"] == 0
    for shard in ("1/2", "2/2"):
        convert.run("ct_to_cxr_pairs", tmp / "raw", tmp_path / "p", shard=shard, options=options, progress=False)
    fresh = prepared.open_dataset(tmp_path / "p")
    key = ["image_id", "sha256"]
    assert sorted(map(tuple, fresh.index[key].values)) == sorted(map(tuple, ds.index[key].values))
    for rel in ds.pairs["target_path"]:
        assert (tmp_path / "p" / rel).read_bytes() == (ds.root / rel).read_bytes()


def test_cli_and_bad_findings(tmp_path, capsys):
    from lib.data.convert.__main__ import main
    from lib.data.fixtures.__main__ import main as fixture_main

    assert fixture_main(["ct_to_cxr_pairs", "--out", str(tmp_path / "raw")]) == 0
    capsys.readouterr()
    assert main(["ct_to_cxr_pairs", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "p"), "--quiet",
                 "--pairs-per-case", "1", "--image-size", "32", "--findings", "pneumothorax",
                 "--nuisance-only-fraction", "0", "--nuisance-deg", "0", "--limit", "2"]) == 0
    ds = prepared.open_dataset(tmp_path / "p")
    assert len(ds.pairs) == 2 and ds.info["options"]["findings"] == "pneumothorax"
    assert set(ds.pairs["pose_deg_baseline"].astype(float)) == {0.0}
    assert all(k == "pneumothorax" for row in ds.pairs.itertuples() for k in (row.appeared + ";" + row.resolved).split(";") if k)
    assert main(["ct_to_cxr_pairs", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "q"), "--quiet",
                 "--findings", "fracture"]) == 2
    assert "fracture" in capsys.readouterr().err
