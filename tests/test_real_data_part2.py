"""Real data, part 2: 04, 05 and 06 each from a raw fixture, through the command-line fixture writer and
converters, to a smoke run with ``-p real_data``; 07's summary says which data every row came from. And the
prod presets, which name these datasets, stop at once without them, saying how to get them."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from lib import config, paths
from lib.families import common
from references import execute_notebook, only_run

SMALL = {  # converter options that keep the fixtures' conversions to seconds
    "lidc_idri": ["--size", "48", "--spacing", "8", "--drr-size", "32"],
    "coltea_lung_ct_100w": [],
    "ms_cxr_t": ["--image-size", "64"],
}


def _cli(*args):
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=paths.ROOT)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


_execute, _run_record = execute_notebook, only_run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Raw fixtures written and converted by the commands a user types; ``{name: prepared folder}``."""
    tmp = tmp_path_factory.mktemp("part2")
    out = {}
    for name, options in SMALL.items():
        _cli("lib.data.fixtures", name, "--out", str(tmp / "raw" / name))
        out[name] = tmp / "prepared" / name
        summary = json.loads(_cli("lib.data.convert", name, "--src", str(tmp / "raw" / name), "--out", str(out[name]),
                                  *options).strip().splitlines()[-1])
        assert summary["converted"] > 0, summary
    out["ct_to_cxr_pairs"] = tmp / "prepared" / "ct_to_cxr_pairs"
    _cli("lib.data.convert", "ct_to_cxr_pairs", "--src", str(out["lidc_idri"]), "--out", str(out["ct_to_cxr_pairs"]),
         "--pairs-per-case", "4", "--image-size", "64")
    return tmp, out


@pytest.mark.slow
def test_04_05_06_train_on_real_data_and_07_says_which(prepared, monkeypatch):
    tmp, data = prepared
    results = tmp / "results"
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(results))
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp / "data"))  # the built-in cohort is never needed
    runs = {"04_ct_diffusion": {"real_data": str(data["coltea_lung_ct_100w"]), "target_phase": "arterial"},
            "05_cxr_change": {"real_data": str(data["ct_to_cxr_pairs"]), "external": str(data["ms_cxr_t"])},
            "06_xray_to_ct": {"real_data": str(data["lidc_idri"])}}
    for notebook, params in runs.items():
        _execute(notebook, tmp / f"{notebook}.ipynb", preset="smoke", **params)
        run_dir, record = _run_record(results, notebook)
        assert record["status"] == "completed" and record["config"]["real_data"] == params["real_data"], notebook
    assert not (tmp / "data" / "smoke").exists()  # trained on the real data only

    run_05, _ = _run_record(results, "05_cxr_change")
    external = pd.read_csv(run_05 / "external_ms_cxr_t.csv")
    assert (external["finding"] == "all").any() and external[["auc_model", "auc_subtraction"]].stack().between(0, 1).all()
    assert list(pd.read_csv(run_05 / "aux" / "aux_ablation.csv")["arm"]) == ["without", "adversarial", "classification"]

    _execute("07_evaluate", tmp / "07.ipynb", preset="smoke")
    summary = pd.read_csv(results / "summary.csv", dtype=str, keep_default_na=False)
    data_of = summary.groupby("family")["data"].agg(set).to_dict()
    assert data_of["ct_diffusion"] == {"coltea_lung_ct_100w"} and data_of["xray_to_ct"] == {"lidc_idri"}
    assert data_of["cxr_change"] == {"ct_to_cxr_pairs", "ms_cxr_t"}
    ms = summary[summary["data"] == "ms_cxr_t"]
    assert len(ms) == 1 and ms["split"].item() == "ms_cxr_t test"
    assert "| lidc_idri |" in (results / "summary.md").read_text()


@pytest.mark.parametrize("notebook,name", [("04_ct_diffusion", "coltea_lung_ct_100w"),
                                           ("05_cxr_change", "ct_to_cxr_pairs"), ("06_xray_to_ct", "lidc_idri")])
def test_prod_stops_at_once_without_its_real_data(tmp_path, monkeypatch, notebook, name):
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(tmp_path / "no-kaggle"))
    cfg = config.resolve(notebook, "prod")
    assert cfg["real_data"] == name
    with pytest.raises(FileNotFoundError) as e:
        common.data_root(cfg)
    assert name in str(e.value) and f"python -m lib.data.convert {name}" in str(e.value)
    assert not (tmp_path / "data" / "demo").exists()  # nothing was built instead
