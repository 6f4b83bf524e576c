"""Kaggle bundles, offline: metadata through the kaggle package's own checks, a simulated kernel run."""

import json
import os
import shutil
import stat
import sys
import zipfile

import nbformat
import pytest

from lib import kaggle, paths


def _dummy_wheel(folder):
    """A real, installable wheel of a tiny package (stands in for monai & co. without the network)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "medimg_probe-1.0-py3-none-any.whl"
    files = {"medimg_probe/__init__.py": "VALUE = 42\n",
             "medimg_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: medimg-probe\nVersion: 1.0\n",
             "medimg_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("medimg_probe-1.0.dist-info/RECORD", "".join(f"{n},,\n" for n in files) + "medimg_probe-1.0.dist-info/RECORD,,\n")
    return folder


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kaggle")
    b = kaggle.Bundle("03_pretrain", "smoke", "tester", gpu="t4x2", internet=False, datasets=["tester/medimg-demo-smoke"],
                      wheels_from=_dummy_wheel(tmp / "wheels"))
    return kaggle.build(b, tmp / "build")


def test_bundle_layout_and_metadata(bundle_dir):
    meta = json.loads((bundle_dir / "kernel-metadata.json").read_text())
    assert meta["id"] == "tester/medimg-03-pretrain-smoke" and meta["code_file"] == "03_pretrain.ipynb"
    assert meta["machine_shape"] == "NvidiaTeslaT4" and meta["enable_gpu"] is True
    assert meta["enable_internet"] is False and meta["is_private"] is True
    assert meta["dataset_sources"] == ["tester/medimg-lib-code", "tester/medimg-demo-smoke"]
    code = bundle_dir / "code"
    assert (code / "lib" / "config.py").is_file() and (code / "lib" / "data" / "io.py").is_file()
    assert not list(code.rglob("__pycache__"))
    assert (code / "requirements-kaggle.txt").read_text().split() == ["medimg-probe==1.0"]
    assert json.loads((code / "dataset-metadata.json").read_text())["id"] == "tester/medimg-lib-code"
    nb = nbformat.read(bundle_dir / "03_pretrain.ipynb", as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert ["kaggle-bootstrap"] in tags and ["injected-parameters"] in tags
    assert tags.index(["kaggle-bootstrap"]) < tags.index(["parameters"])
    injected = nb.cells[tags.index(["injected-parameters"])].source
    assert 'preset = "smoke"' in injected
    assert "gpus = 0" in injected  # a T4 x2 kernel trains on both GPUs (lib.multigpu)
    assert "gpus" not in kaggle.Bundle("07_evaluate", "smoke", "tester", gpu="t4x2").params  # it trains nothing
    assert kaggle.Bundle("03_pretrain", "smoke", "tester", gpu="t4x2", params={"gpus": 1}).params["gpus"] == 1
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def _offline_api():
    """The kaggle package's KaggleApi with its network client replaced by a recorder."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    api, calls = KaggleApi(), {}

    class Recorder:
        def __getattr__(self, name):
            return self

        def __call__(self, request):
            calls["request"] = request
            return type("Response", (), {"error": None, "url": "", "versionNumber": 1})()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    api.build_kaggle_client = lambda: Recorder()
    return api, calls


def test_kernel_metadata_passes_kaggles_own_push_checks(bundle_dir):
    api, calls = _offline_api()
    api.kernels_push(str(bundle_dir))
    request = calls["request"]
    assert request.slug == "tester/medimg-03-pretrain-smoke" and request.machine_shape == "NvidiaTeslaT4"
    assert request.enable_internet is False and request.enable_gpu is True
    assert request.dataset_data_sources == ["tester/medimg-lib-code", "tester/medimg-demo-smoke"]
    assert json.loads(request.text)["cells"][0]["cell_type"] == "markdown"


def test_code_dataset_metadata_passes_kaggles_own_checks(bundle_dir, monkeypatch):
    from requests.exceptions import HTTPError

    api, calls = _offline_api()

    def not_found(ref):
        raise HTTPError("404")

    monkeypatch.setattr(api, "dataset_status", not_found)
    monkeypatch.setattr(api, "upload_files", lambda *a, **k: None)
    api.config_values[api.CONFIG_NAME_USER] = "tester"  # what authenticate() would have read
    api.dataset_create_new(str(bundle_dir / "code"), dir_mode="zip")
    request = calls["request"]
    assert (request.owner_slug, request.slug, request.license_name) == ("tester", "medimg-lib-code", "apache-2.0")


def test_a_kernels_output_is_attached_as_a_kernel_source():
    b = kaggle.Bundle("03_pretrain", "prod", "tester", params={"real_data": "rsna2025_aneurysm"},
                      competition="rsna-intracranial-aneurysm-detection", kernels=["tester/medimg-02-prepare-data-prod"])
    meta = b.metadata()
    assert meta["kernel_sources"] == ["tester/medimg-02-prepare-data-prod"]
    assert meta["competition_sources"] == ["rsna-intracranial-aneurysm-detection"]


@pytest.mark.parametrize("kwargs,message", [
    ({"notebook": "99_nothing"}, "unknown notebook '99_nothing'; notebooks: 01_explore_data"),
    ({"title": "abc"}, "title of 5 to 50 characters"),
    ({"datasets": ["not a slug"]}, "--dataset 'not a slug' is not a Kaggle dataset slug"),
    ({"kernels": ["no-owner"]}, "--kernel 'no-owner' is not a Kaggle kernel slug"),
    ({"preset": "bogus"}, "valid presets: smoke, demo, subset, prod"),
    ({"params": {"epcohs": 3}}, "unknown parameter(s) epcohs"),
    ({"user": ""}, "is not a Kaggle user name"),
])
def test_bad_arguments_fail_before_anything_is_written(tmp_path, kwargs, message):
    args = {"notebook": "03_pretrain", "preset": "smoke", "user": "tester", **kwargs}
    with pytest.raises(ValueError) as e:
        kaggle.build(kaggle.Bundle(**args), tmp_path / "build")
    assert message in str(e.value)
    assert not (tmp_path / "build").exists()


def _read_only(folder):
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.mark.slow
def test_bundle_runs_in_a_simulated_kaggle_layout(bundle_dir, smoke_cohort, tmp_path, monkeypatch):
    import papermill

    inputs, working = tmp_path / "input", tmp_path / "working"
    shutil.copytree(bundle_dir / "code", inputs / "datasets" / "tester" / "medimg-lib-code")
    shutil.copytree(smoke_cohort, inputs / "medimg-demo-smoke" / "smoke")
    _read_only(inputs)
    working.mkdir()
    before = sorted(str(p) for p in inputs.rglob("*"))
    for var in ("MEDIMG_RESULTS_DIR", "MEDIMG_DATA_DIR", "MEDIMG_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(inputs))
    monkeypatch.setenv("MEDIMG_KAGGLE_WORKING", str(working))
    monkeypatch.chdir(working)
    try:
        out = papermill.execute_notebook(str(bundle_dir / "03_pretrain.ipynb"), str(tmp_path / "out.ipynb"),
                                         kernel_name="python3", progress_bar=False)
    finally:
        for p in [inputs, *inputs.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    printed = "".join(o.get("text", "") for c in out.cells for o in c.get("outputs", []))
    assert f"lib from {inputs / 'datasets' / 'tester' / 'medimg-lib-code'}" in printed   # the shipped lib, not the repo's
    assert (working / ".medimg-site" / "medimg_probe" / "__init__.py").is_file()           # offline wheel install
    (run_dir,) = (working / "results" / "03_pretrain").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert sorted(str(p) for p in inputs.rglob("*")) == before                             # input root untouched


def test_cli_commands_without_credentials_say_how_and_print_no_secret(tmp_path, monkeypatch, capsys):
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "none"))
    monkeypatch.setattr(paths, "ROOT", paths.ROOT)
    assert kaggle.main(["status", "03_pretrain", "--preset", "smoke", "--user", "tester"]) == 2
    err = capsys.readouterr().err
    assert "kaggle.json in ~/.kaggle/" in err and "KAGGLE_USERNAME and KAGGLE_KEY" in err
    assert kaggle.main(["build", "03_pretrain", "--preset", "smoke"]) == 2
    assert "pass --user NAME" in capsys.readouterr().err


def _fake_cli(tmp_path):
    log = tmp_path / "calls.txt"
    script = tmp_path / "kaggle"
    script.write_text(f"""#!{sys.executable}
import sys
args = sys.argv[1:]
open({str(log)!r}, "a").write(" ".join(args) + "\\n")
if args[:2] == ["datasets", "status"]:
    sys.exit(1)   # not created yet
if args[:2] == ["kernels", "output"]:
    open(args[args.index("-p") + 1] + "/run.json", "w").write("{{}}")
print("ok")
""")
    script.chmod(0o755)
    return script, log


def test_push_status_output_drive_the_cli(bundle_dir, tmp_path, monkeypatch, capsys):
    exe, log = _fake_cli(tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", "tester")
    monkeypatch.setenv("KAGGLE_KEY", "very-secret-key-value")
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(tmp_path / "results"))
    report = kaggle.push(bundle_dir, exe=str(exe))
    assert "created" in report
    calls = log.read_text().splitlines()
    assert calls[1] == f"datasets create -p {bundle_dir / 'code'} -r zip"
    assert calls[2] == f"kernels push -p {bundle_dir}"
    target = kaggle.output("tester/medimg-03-pretrain-smoke", "03_pretrain", exe=str(exe))
    assert target == tmp_path / "results" / "03_pretrain" / "kaggle-medimg-03-pretrain-smoke" and (target / "run.json").exists()
    assert kaggle.status("tester/medimg-03-pretrain-smoke", exe=str(exe)) == "ok"
    printed = capsys.readouterr()
    assert "very-secret-key-value" not in printed.out + printed.err + report + log.read_text()


def test_roots_follow_kaggle_and_can_be_pointed_elsewhere(tmp_path, monkeypatch):
    for var in ("MEDIMG_RESULTS_DIR", "MEDIMG_DATA_DIR", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(var, raising=False)
    assert paths.results_dir() == paths.ROOT / "results" and not paths.on_kaggle()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("MEDIMG_KAGGLE_WORKING", str(tmp_path / "w"))
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(tmp_path / "in"))
    assert paths.results_dir() == tmp_path / "w" / "results" and paths.data_dir() == tmp_path / "w" / "data"
    (tmp_path / "in" / "datasets" / "owner" / "slug" / "smoke").mkdir(parents=True)
    (tmp_path / "in" / "datasets" / "owner" / "slug" / "smoke" / "cohort.json").write_text("{}")
    assert paths.find_inputs("smoke/cohort.json") == [tmp_path / "in/datasets/owner/slug/smoke/cohort.json"]
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(tmp_path / "elsewhere"))
    assert paths.results_dir() == tmp_path / "elsewhere"


# --------------------------------------------------------------------------- code-competition submission (09)

COMPETITION = "rsna-intracranial-aneurysm-detection"


@pytest.fixture
def notebook_09(tmp_path, monkeypatch):
    """A stand-in for notebooks/09_rsna_aneurysm.ipynb (its parameters cell only), in a notebooks folder of its
    own: the injection of 09's parameters is tested whether or not the real notebook exists yet."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"},
                                            "language_info": {"name": "python"}})
    params = nbformat.v4.new_code_cell('preset = "smoke"\nmode = "train"\nweights = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# 09 RSNA aneurysm (stand-in)"), params,
                nbformat.v4.new_code_cell("print(mode, weights)")]
    nbformat.write(nb, folder / "09_rsna_aneurysm.ipynb")
    monkeypatch.setattr(paths, "NOTEBOOKS_DIR", folder)
    return folder / "09_rsna_aneurysm.ipynb"


def test_submission_bundle_is_a_code_competition_kernel(notebook_09, tmp_path):
    b = kaggle.Bundle("09_rsna_aneurysm", "prod", "tester", internet=False, competition=COMPETITION,
                      submission="tester/medimg-09-weights", wheels_from=_dummy_wheel(tmp_path / "wheels"))
    folder = kaggle.build(b, tmp_path / "build")
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    assert meta["id"] == "tester/medimg-09-rsna-aneurysm-prod-submit"  # not the training kernel's id
    assert meta["enable_internet"] is False and meta["competition_sources"] == [COMPETITION]
    assert meta["dataset_sources"] == ["tester/medimg-lib-code", "tester/medimg-09-weights"]
    assert (folder / "code" / "requirements-kaggle.txt").read_text().split() == ["medimg-probe==1.0"]  # offline wheels
    assert json.loads((folder / "code" / "BUILD_INFO.json").read_text())["params"] == {
        "mode": "submit", "weights": "/kaggle/input/medimg-09-weights"}
    nb = nbformat.read(folder / "09_rsna_aneurysm.ipynb", as_version=4)
    injected = next(c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert 'preset = "prod"' in injected and 'mode = "submit"' in injected
    assert 'weights = "/kaggle/input/medimg-09-weights"' in injected

    api, calls = _offline_api()
    api.kernels_push(str(folder))  # the kaggle package's own checks
    request = calls["request"]
    assert request.slug == "tester/medimg-09-rsna-aneurysm-prod-submit" and request.enable_internet is False
    assert request.competition_data_sources == [COMPETITION]
    assert request.dataset_data_sources == ["tester/medimg-lib-code", "tester/medimg-09-weights"]


def test_submission_weights_can_point_inside_the_dataset(notebook_09):
    b = kaggle.Bundle("09_rsna_aneurysm", "prod", "tester", {"weights": "/kaggle/input/medimg-09-weights/run-3"},
                      internet=False, competition=COMPETITION, submission="tester/medimg-09-weights",
                      datasets=["tester/medimg-09-weights"])
    assert b.params == {"weights": "/kaggle/input/medimg-09-weights/run-3", "mode": "submit"}
    assert b.metadata()["dataset_sources"] == ["tester/medimg-lib-code", "tester/medimg-09-weights"]  # once


@pytest.mark.parametrize("kwargs,message", [
    ({"competition": None}, "name the code competition with --competition"),
    ({"internet": True}, "runs without internet: pass --internet off"),
    ({"submission": "no-owner"}, "--submission 'no-owner' is not a Kaggle dataset slug"),
    ({"params": {"mode": "train"}}, "with mode 'submit', not -p mode 'train'"),
    ({"notebook": "03_pretrain"}, "--submission needs a notebook with the parameters mode (submit) and weights"),
])
def test_bad_submission_arguments_fail_before_anything_is_written(notebook_09, tmp_path, kwargs, message):
    shutil.copy2(paths.ROOT / "notebooks" / "03_pretrain.ipynb",
                 notebook_09.parent / "03_pretrain.ipynb")
    args = {"notebook": "09_rsna_aneurysm", "preset": "prod", "user": "tester", "internet": False,
            "competition": COMPETITION, "submission": "tester/medimg-09-weights", **kwargs}
    with pytest.raises(ValueError) as e:
        kaggle.build(kaggle.Bundle(**args), tmp_path / "build")
    assert message in str(e.value)
    assert not (tmp_path / "build").exists()


def test_cli_submission_flags_reach_the_bundle(notebook_09, tmp_path, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(kaggle, "build", lambda bundle: built.append(bundle) or tmp_path)
    argv = ["09_rsna_aneurysm", "--preset", "prod", "--user", "tester", "--submission", "tester/medimg-09-weights"]
    assert kaggle.main(["build", *argv, "--competition", COMPETITION, "--internet", "off"]) == 0
    (b,) = built
    assert b.submission == "tester/medimg-09-weights" and b.params == {"mode": "submit",
                                                                       "weights": "/kaggle/input/medimg-09-weights"}
    assert b.metadata()["competition_sources"] == [COMPETITION] and b.internet is False
    capsys.readouterr()
    assert kaggle.main(["push", *argv]) == 2  # push finds the submission kernel's own folder (not built here)
    assert "build/kaggle/medimg-09-rsna-aneurysm-prod-submit does not exist" in capsys.readouterr().err
