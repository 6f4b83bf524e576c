"""lib.families.rsna_submission: rows, the local gateway, and Kaggle's kaggle_evaluation (a stand-in written here)."""

import math
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.data.convert.rsna2025_aneurysm import LABELS
from lib.families import rsna_submission as rs

UIDS = ["1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.55"]


def _series(root, uids=UIDS, files=3):
    folders = []
    for uid in uids:
        folder = root / "series" / uid
        folder.mkdir(parents=True)
        for i in range(files):
            (folder / f"{uid}.{i}.dcm").write_bytes(b"DICM" + bytes([i]))
        folders.append(folder)
    return folders


def _probs(uid):
    """A distinct, valid row per series (so the order of the written rows can be checked)."""
    base = (int(uid.rsplit(".", 1)[1]) % 97) / 100
    return [round(base + j / 1000, 6) for j in range(14)]


def _frame(uid, with_id=False):
    row = dict(zip(LABELS, _probs(uid)))
    return pd.DataFrame([{rs.ID_COL: uid, **row} if with_id else row])


def test_submission_row_checks_values():
    row = rs.submission_row("u", np.linspace(0, 1, 14))
    assert list(row) == [rs.ID_COL, *LABELS] and row[LABELS[-1]] == 1.0
    assert rs.submission_row("u", dict(zip(LABELS, [0.5] * 14)))["Basilar Tip"] == 0.5
    for bad, message in [([0.5] * 13, "13 values, need 14"), ([0.5] * 13 + [float("nan")], "'Aneurysm Present' is nan"),
                         ([1.5] + [0.5] * 13, "is 1.5, not a probability"), ({"x": 1}, "label columns missing"),
                         ([0.5] * 13 + ["high"], "is 'high', not a number")]:
        with pytest.raises(ValueError, match=f"series u: .*{message}"):
            rs.submission_row("u", bad)


@pytest.mark.parametrize("kind", ["pandas", "pandas-with-id", "dict", "list", "array"])
def test_local_gateway_writes_one_row_per_series_in_order(tmp_path, kind):
    folders = _series(tmp_path)

    def predict(series_path):
        uid = os.path.basename(series_path)
        return {"pandas": lambda: _frame(uid), "pandas-with-id": lambda: _frame(uid, True),
                "dict": lambda: dict(zip(LABELS, _probs(uid))), "list": lambda: _probs(uid),
                "array": lambda: np.array(_probs(uid), dtype=np.float32)}[kind]()

    timing = rs.LocalGateway(predict).run(folders, tmp_path / "out" / "submission.parquet")
    sub = pd.read_parquet(tmp_path / "out" / "submission.parquet")
    assert list(sub.columns) == [rs.ID_COL, *LABELS] and list(sub[rs.ID_COL]) == UIDS
    for uid, (_, row) in zip(UIDS, sub.iterrows()):
        assert np.allclose(row[LABELS].to_numpy(float), _probs(uid), atol=1e-6)
    assert list(timing[rs.ID_COL]) == UIDS and (timing["files"] == 3).all() and not timing["over_limit"].any()
    assert (timing["seconds"] >= 0).all()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["submission.parquet"]  # no temp file left


def test_predict_sees_a_copy_not_the_original(tmp_path):
    folders = _series(tmp_path)
    seen = []

    def predict(series_path):
        path = Path(series_path)
        seen.append((path, sorted(p.name for p in path.iterdir())))
        for f in path.iterdir():
            f.unlink()  # whatever predict does to its copy, the original stays
        return _probs(path.name)

    rs.LocalGateway(predict, share_root=tmp_path / "shared").run(folders, tmp_path / "submission.parquet")
    for folder, (path, names) in zip(folders, seen):
        assert path != folder and path.name == folder.name and path.is_relative_to(tmp_path / "shared")
        assert names == sorted(p.name for p in folder.iterdir()) and len(names) == 3
        assert not path.exists()  # the copy is gone after the call
    assert list((tmp_path / "shared").iterdir()) == []


@pytest.mark.parametrize("previous", [False, True])
def test_a_failure_half_way_leaves_no_file_or_the_previous_one(tmp_path, previous):
    folders = _series(tmp_path)
    out = tmp_path / "submission.parquet"
    if previous:
        out.write_bytes(b"the previous submission")

    def predict(series_path):
        if os.path.basename(series_path) == UIDS[1]:
            raise RuntimeError("model crashed")
        return _probs(os.path.basename(series_path))

    with pytest.raises(RuntimeError, match="model crashed"):
        rs.LocalGateway(predict).run(folders, out)
    assert (out.read_bytes() == b"the previous submission") if previous else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["series"] + (["submission.parquet"] if previous else []))


@pytest.mark.parametrize("bad,message", [
    (lambda uid: _probs(uid)[:13], "13 values, need 14"),
    (lambda uid: _probs(uid)[:13] + [math.nan], "'Aneurysm Present' is nan"),
    (lambda uid: [1.2] + _probs(uid)[1:], "is 1.2, not a probability"),
    (lambda uid: pd.concat([_frame(uid), _frame(uid)]), "2 rows, need exactly 1"),
    (lambda uid: _frame(uid).drop(columns=["Basilar Tip"]), "missing \\['Basilar Tip'\\]"),
    (lambda uid: _frame(uid).assign(**{rs.ID_COL: "another"}), "the row names series another"),
])
def test_bad_rows_raise_naming_the_series(tmp_path, bad, message):
    folders = _series(tmp_path)

    def predict(series_path):
        uid = os.path.basename(series_path)
        return bad(uid) if uid == UIDS[2] else _probs(uid)

    with pytest.raises(ValueError, match=f"series {UIDS[2]}: .*{message}"):
        rs.LocalGateway(predict).run(folders, tmp_path / "submission.parquet")
    assert not (tmp_path / "submission.parquet").exists()


def test_slow_series_are_reported(tmp_path):
    folders = _series(tmp_path, UIDS[:2])
    with pytest.warns(RuntimeWarning, match="predict took .* over the 0 s the gateway allows") as caught:
        timing = rs.LocalGateway(lambda p: _probs(os.path.basename(p)), limit_s=0.0).run(folders, tmp_path / "s.parquet")
    assert [str(w.message).split(":")[0] for w in caught] == [f"series {u}" for u in UIDS[:2]]
    assert timing["over_limit"].all()
    with pytest.raises(TimeoutError):
        rs.LocalGateway(lambda p: _probs(os.path.basename(p)), limit_s=0.0, strict=True).run(folders, tmp_path / "t.parquet")


def test_bad_series_lists_raise(tmp_path):
    folders = _series(tmp_path)
    with pytest.raises(ValueError, match="given twice"):
        rs.LocalGateway(_probs).run([folders[0], folders[0]], tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="not series folders"):
        rs.LocalGateway(_probs).run([tmp_path / "nothing"], tmp_path / "s.parquet")


# --------------------------------------------------------------------------- kaggle_evaluation

# A stand-in for the competition's package, after its real API (kaggle_evaluation/rsna_inference_server.py,
# rsna_gateway.py, core/templates.py, core/relay.py, core/base_gateway.py): endpoints registered by function
# name; serve(); run_local_gateway(data_paths=(test.csv, series dir), file_share_dir) shares each series
# under file_share_dir + its absolute path, calls predict(path), needs a one-row frame, and writes
# submission.parquet (row IDs first) into the working directory.
FAKE_SERVER = '''
import csv, os, pathlib
import pandas as pd

CALLS = []
SUBMISSION_ID_COL = "SeriesInstanceUID"


class RSNAInferenceServer:
    def __init__(self, *endpoint_listeners):
        for func in endpoint_listeners:
            if func.__name__ == "<lambda>":
                raise ValueError("Functions passed as endpoint listeners must be named")
        self.listeners = {f.__name__: f for f in endpoint_listeners}

    def serve(self):
        CALLS.append(("serve",))

    def run_local_gateway(self, data_paths=None, file_share_dir=None, *args, **kwargs):
        base = os.path.dirname(__file__)
        csv_path, dicom_dir = data_paths or (os.path.join(base, "test.csv"), os.path.join(base, "series"))
        uids = [r[SUBMISSION_ID_COL] for r in csv.DictReader(open(csv_path))]
        CALLS.append(("run_local_gateway", data_paths, file_share_dir, os.getcwd()))
        predictions = []
        for uid in uids:
            series_dir = pathlib.Path(dicom_dir).absolute() / uid
            shared = pathlib.Path(file_share_dir or "/kaggle/shared") / series_dir.relative_to(series_dir.anchor)
            shared.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(series_dir, shared)
            prediction = self.listeners["predict"](str(shared))
            if not isinstance(prediction, (pd.DataFrame, pd.Series)) or len(prediction) != 1:
                raise RuntimeError(f"Invalid predictions: {prediction!r}")
            predictions.append(prediction)
        submission = pd.concat(predictions, ignore_index=True)
        submission.insert(0, SUBMISSION_ID_COL, uids)
        submission.to_parquet("submission.parquet", index=False)
'''


@pytest.fixture
def fake_kaggle_evaluation(tmp_path, monkeypatch):
    """Writes the stand-in package under ``tmp_path/comp``; yields that folder. sys.path and the imported
    modules are restored afterwards."""
    comp = tmp_path / "comp"
    pkg = comp / "kaggle_evaluation"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rsna_inference_server.py").write_text(textwrap.dedent(FAKE_SERVER))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    yield comp
    for name in [m for m in sys.modules if m == "kaggle_evaluation" or m.startswith("kaggle_evaluation.")]:
        del sys.modules[name]


def test_without_kaggle_evaluation_serve_uses_the_local_gateway(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(tmp_path / "no-input"))
    assert rs.find_kaggle_evaluation() is None
    served = rs.serve(lambda p: _probs(os.path.basename(p)), _series(tmp_path), tmp_path / "out")
    assert served.mode == "local-gateway" and served.submission == tmp_path / "out" / "submission.parquet"
    assert list(pd.read_parquet(served.submission)[rs.ID_COL]) == UIDS and len(served.timing) == 3
    with pytest.raises(ValueError, match="give series_folders"):
        rs.serve(_probs)


def test_in_a_kaggle_kernel_the_file_is_also_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(tmp_path / "no-input"))
    monkeypatch.setenv("MEDIMG_KAGGLE_WORKING", str(tmp_path / "working"))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    served = rs.serve(lambda p: _probs(os.path.basename(p)), _series(tmp_path), tmp_path / "working" / "results" / "run")
    assert served.submission == tmp_path / "working" / "results" / "run" / "submission.parquet"
    assert (tmp_path / "working" / "submission.parquet").read_bytes() == served.submission.read_bytes()


def test_kaggle_evaluation_on_sys_path_runs_its_local_gateway(tmp_path, monkeypatch, fake_kaggle_evaluation):
    monkeypatch.syspath_prepend(str(fake_kaggle_evaluation))
    folders = _series(tmp_path)
    seen = []

    def predict(series_path):
        seen.append(series_path)
        assert sorted(os.listdir(series_path)) == sorted(os.listdir(folders[UIDS.index(os.path.basename(series_path))]))
        return _frame(os.path.basename(series_path), with_id=True)

    share = tmp_path / "shared"
    served = rs.serve(predict, folders, tmp_path / "work", share_dir=share)
    module = sys.modules["kaggle_evaluation.rsna_inference_server"]
    assert served.mode == "kaggle-local-gateway" and served.submission == tmp_path / "work" / "submission.parquet"
    (call,) = module.CALLS
    assert call[0] == "run_local_gateway" and call[2] == str(share) and call[3] == str(tmp_path / "work")
    assert call[1][1] == str(folders[0].parent.resolve())
    sub = pd.read_parquet(served.submission)
    assert list(sub.columns) == [rs.ID_COL, *LABELS] and list(sub[rs.ID_COL]) == UIDS
    assert np.allclose(sub[LABELS].to_numpy(float), [_probs(u) for u in UIDS])
    assert all(p.startswith(str(share) + os.sep) for p in seen)
    assert not share.exists()  # the wrapper deletes the shared series after each call (the demo's workaround)
    assert Path.cwd() != tmp_path / "work"


def test_off_kaggle_the_shared_series_go_to_a_temporary_folder(tmp_path, monkeypatch, fake_kaggle_evaluation):
    monkeypatch.syspath_prepend(str(fake_kaggle_evaluation))
    if os.path.exists("/kaggle"):
        pytest.skip("on Kaggle the gateway shares under /kaggle/shared")
    served = rs.serve(lambda p: _probs(os.path.basename(p)), _series(tmp_path), tmp_path / "work")
    (call,) = sys.modules["kaggle_evaluation.rsna_inference_server"].CALLS
    assert call[2].startswith(tempfile.gettempdir()) and not os.path.exists(call[2])
    assert list(pd.read_parquet(served.submission)[rs.ID_COL]) == UIDS


def test_the_kaggle_wrapper_checks_rows_and_is_named_predict(tmp_path, fake_kaggle_evaluation, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_kaggle_evaluation))
    share = tmp_path / "shared"
    (share / "x" / "1.5").mkdir(parents=True)
    wrapped = rs.kaggle_predict(lambda p: _probs(os.path.basename(p))[:13], share_root=str(share))
    assert wrapped.__name__ == "predict"
    with pytest.raises(ValueError, match="series 1.5: 13 values"):
        wrapped(str(share / "x" / "1.5"))
    assert not share.exists()  # deleted even when predict fails
    ok = rs.kaggle_predict(lambda p: _probs("1.7"))(str(tmp_path / "abc"))
    assert list(ok.columns) == LABELS and len(ok) == 1  # no ID column: the gateway adds it


def test_a_competition_rerun_serves(tmp_path, monkeypatch, fake_kaggle_evaluation):
    monkeypatch.syspath_prepend(str(fake_kaggle_evaluation))
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")
    served = rs.serve(lambda p: _probs("1.7"), out_dir=tmp_path / "work")
    assert served.mode == "kaggle-serve" and served.submission is None
    assert sys.modules["kaggle_evaluation.rsna_inference_server"].CALLS == [("serve",)]


@pytest.mark.parametrize("layout", ["", "competitions"])
def test_kaggle_evaluation_is_found_in_the_competition_folder(tmp_path, monkeypatch, fake_kaggle_evaluation, layout):
    inputs = tmp_path / "input"
    (inputs / layout).mkdir(parents=True, exist_ok=True)
    fake_kaggle_evaluation.rename(inputs / layout / rs.COMPETITION)
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(inputs))
    module = rs.find_kaggle_evaluation()
    assert module is not None and Path(module.__file__).parent.parent == inputs / layout / rs.COMPETITION
    assert sys.path[0] == str(inputs / layout / rs.COMPETITION)


def test_resolve_weights_finds_the_run_folder_in_an_attached_dataset(tmp_path, monkeypatch):
    inputs = tmp_path / "input"
    run = inputs / "datasets" / "owner" / "medimg-09-weights" / "run-1"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"weights")
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(inputs))
    assert rs.resolve_weights("/kaggle/input/medimg-09-weights") == run   # mounted deeper than written
    assert rs.resolve_weights(run / "model.pt") == run and rs.resolve_weights(run) == run
    with pytest.raises(FileNotFoundError, match="attach the weights dataset"):
        rs.resolve_weights("/kaggle/input/other-weights")
    with pytest.raises(FileNotFoundError, match="no such file"):
        rs.resolve_weights(tmp_path / "elsewhere")
